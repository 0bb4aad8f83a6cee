"""NVFP4 KV: E2M1 values in blocks of 16 along head_dim, an E4M3 scale per block, a per-tensor scale.

    block_scale = e4m3((block_amax / tensor_scale) / 6)      (saturating, round to nearest even)
    code        = e2m1(x / (block_scale * tensor_scale))      (RNE, saturating at 6)
    x_hat       = e2m1_value * (block_scale * tensor_scale)

Storage per 16 values: 8 bytes of nibbles + 1 byte of scale = 4.5 bits a value; the per-tensor
scale (the checkpoint's k_scale / v_scale, amax / (448 * 6) under max calibration) lives outside.
Sources: vLLM nvfp4 KV (#40177; read path `dequant_nvfp4_kv_cache` in
tests/kernels/quantization/nvfp4_utils.py: fp4 * (block_scale * global_scale), head_size % 16 == 0)
and NVIDIA ModelOpt's NVFP4 KV (the same two-level scaling, shared by TensorRT-LLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtuner.formats.base import Encoded, max_magnitude, require_head_dim
from kvtuner.formats.floats import (
    E2M1_MAX,
    E4M3_MAX,
    e2m1_decode,
    e2m1_encode,
    pack_nibbles,
    to_e4m3,
    unpack_nibbles,
)

BLOCK = 16


def calibrate_nvfp4_scale(x: torch.Tensor) -> float:
    """Per-tensor scale under max calibration: amax / (448 * 6) (1.0 for an all-zero tensor)."""
    amax = max_magnitude(x)
    return amax / (E4M3_MAX * E2M1_MAX) if amax > 0 else 1.0


@dataclass(frozen=True)
class NVFP4:
    """NVFP4 K or V. `tensor_scale` None: calibrate on the tensor quantized (amax / 2688)."""

    name: str = "nvfp4"
    engine_value: str = "nvfp4"
    tensor_scale: float | None = None

    def quantize(self, x: torch.Tensor) -> Encoded:
        """`[..., seq, head_dim]` -> codes uint8 `[..., seq, head_dim / 2]`,
        block_scale float8_e4m3fn `[..., seq, head_dim / 16]`, meta tensor_scale."""
        require_head_dim(self, x)
        scale = self.tensor_scale if self.tensor_scale is not None else calibrate_nvfp4_scale(x)
        d = x.shape[-1]
        blocks = x.float().reshape(*x.shape[:-1], d // BLOCK, BLOCK)
        block_scale = to_e4m3(blocks.abs().amax(-1) / scale / E2M1_MAX)
        step = block_scale.float() * scale
        # a block of zeros has scale 0; its values encode as zeros, not 0/0
        scaled = torch.where(step[..., None] > 0, blocks / step[..., None], 0.0)
        codes = e2m1_encode(scaled).reshape(x.shape)
        return Encoded(
            data={"codes": pack_nibbles(codes), "block_scale": block_scale},
            shape=tuple(x.shape),
            dtype=x.dtype,
            meta={"tensor_scale": scale},
        )

    def dequantize(self, enc: Encoded) -> torch.Tensor:
        """Back to `[..., seq, head_dim]` in the input's dtype."""
        d = enc.shape[-1]
        values = e2m1_decode(unpack_nibbles(enc.data["codes"]))
        values = values.reshape(*enc.shape[:-1], d // BLOCK, BLOCK)
        step = enc.data["block_scale"].float() * enc.meta["tensor_scale"]
        return (values * step[..., None]).reshape(enc.shape).to(enc.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        return 4 + 8 / BLOCK

    def check_head_dim(self, head_dim: int) -> str | None:
        if head_dim % BLOCK:
            return f"{self.name} stores blocks of 16 along head_dim: head_dim must be a multiple of 16; this model has {head_dim}"
        return None
