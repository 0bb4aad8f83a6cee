"""NVIDIA ModelOpt's hf_quant_config.json with a per-layer KV-cache map (KV AutoQuantize, #2272):

    {"producer": {...}, "quantization": {"quant_algo": null,
      "kv_cache_quant_algo": "MIXED_PRECISION",
      "kv_cache_quantized_layers": {"model.layers.0.self_attn": {"quant_algo": "FP8"}, ...},
      "kv_cache_schema_version": 1}}

Per-layer algos "FP8", "NVFP4", "FP8_K_NVFP4_V"; when every layer has the same one, that name is
the kv_cache_quant_algo [NVIDIA/Model-Optimizer tests/unit/torch/export/test_convert_hf_config.py].
vLLM reads the per-layer map only with the open PR #56116; TensorRT-LLM with its PR #13695.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kvtuner import __version__
from kvtuner.io import atomic_write_text

LAYER_ALGOS = ("FP8", "NVFP4", "FP8_K_NVFP4_V")
MIXED = "MIXED_PRECISION"
SCHEMA_VERSION = 1
ATTENTION_MODULE = "model.layers.{}.self_attn"


def hf_quant_config(
    layer_algos: Sequence[str | None],
    module_name: str = ATTENTION_MODULE,
    producer: str = "kvtuner",
) -> dict[str, object]:
    """Per-layer KV algos (None: layer left unquantized) -> the hf_quant_config.json dict.

    `module_name` formats a layer index into the attention module's name in the checkpoint.
    """
    for i, algo in enumerate(layer_algos):
        if algo is not None and algo not in LAYER_ALGOS:
            raise ValueError(
                f"ModelOpt's per-layer KV algo is one of {', '.join(LAYER_ALGOS)}; layer {i} has {algo!r}"
            )
    layers = {
        module_name.format(i): {"quant_algo": algo}
        for i, algo in enumerate(layer_algos)
        if algo is not None
    }
    distinct = set(layer_algos)
    if not layers:
        kv_algo = None
    elif len(distinct) == 1:
        kv_algo = next(iter(distinct))
    else:
        kv_algo = MIXED
    quantization: dict[str, object] = {"quant_algo": None, "kv_cache_quant_algo": kv_algo}
    if layers:
        quantization["kv_cache_quantized_layers"] = layers
        quantization["kv_cache_schema_version"] = SCHEMA_VERSION
    return {
        "producer": {"name": producer, "version": __version__},
        "quantization": quantization,
    }


def write_hf_quant_config(path: str | Path, config: dict[str, object]) -> Path:
    """Write `config` as JSON to `path` (hf_quant_config.json beside the weights) atomically."""
    return atomic_write_text(path, json.dumps(config, indent=4) + "\n")
