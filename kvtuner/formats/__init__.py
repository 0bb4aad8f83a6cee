"""Engine-native KV formats by name: what vLLM, llama.cpp, LMDeploy and ModelOpt store.

>>> from kvtuner.formats import get_format, fake_quantize
>>> fmt = get_format("vllm:int4_per_token_head")
>>> fmt.check_head_dim(80)   # a one-line reason, or None
>>> k_hat = fake_quantize(fmt, k)          # k `[batch, kv_heads, seq, head_dim]`
>>> fmt.bits_per_element(128)              # real storage, scales included: 4.25

Every format has `quantize(x) -> Encoded`, `dequantize(Encoded)`, `bits_per_element(head_dim)`,
`check_head_dim(head_dim)`; `nbytes(fmt, shape)` is what the parts hold. K/V pairs that an engine
names as one per-layer choice (ModelOpt's FP8_K_NVFP4_V) are in `PAIRS`.
"""

from __future__ import annotations

import dataclasses

from kvtuner.formats import llamacpp, lmdeploy, modelopt, vllm
from kvtuner.formats.base import Encoded, KVFormat, fake_quantize, nbytes

FORMATS: dict[str, KVFormat] = {
    f.name: f
    for f in (
        vllm.FP8_E4M3,
        vllm.INT8_PER_TOKEN_HEAD,
        vllm.FP8_PER_TOKEN_HEAD,
        vllm.INT4_PER_TOKEN_HEAD,
        vllm.NVFP4_KV,
        *llamacpp.FORMATS.values(),
        lmdeploy.INT4,
        lmdeploy.INT8,
        modelopt.FP8,
        modelopt.NVFP4_KV,
    )
}
PAIRS = modelopt.PAIRS


def get_format(name: str, **overrides) -> KVFormat:
    """The format called `name`, with fields replaced (`role="v"`, `rotate=False`, `scale=...`)."""
    if name not in FORMATS:
        raise KeyError(f"unknown KV format {name!r}; known: {', '.join(sorted(FORMATS))}")
    fmt = FORMATS[name]
    return dataclasses.replace(fmt, **overrides) if overrides else fmt


def check_head_dim(name: str, head_dim: int) -> str | None:
    """The rule a model with `head_dim` breaks for format or pair `name`, or None."""
    fmt = PAIRS[name] if name in PAIRS else get_format(name)
    return fmt.check_head_dim(head_dim)


__all__ = [
    "FORMATS",
    "PAIRS",
    "Encoded",
    "KVFormat",
    "check_head_dim",
    "fake_quantize",
    "get_format",
    "nbytes",
]
