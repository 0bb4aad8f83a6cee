"""kvtuner: layer-wise mixed-precision KV-cache quantization.

>>> import kvtuner
>>> cfg = kvtuner.load_config("searched_configs/gemma-3-270m/per-token/kvtuner_c3.5.yaml")
>>> cache = kvtuner.quantized_cache(model, cfg)  # or a path, or "KV4"
>>> out = model.generate(**inputs, cache=cache, max_new_tokens=64)  # past_key_values= before 5.24
>>> cache.nbytes()  # bytes the cache really holds

Names are imported on first use: reading a config or a study does not load torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS = {
    "KVTunerCache": "kvtuner.cache",
    "QuantizedKVLayer": "kvtuner.cache",
    "quantized_cache": "kvtuner.cache",
    "PrecisionConfig": "kvtuner.config",
    "load_config": "kvtuner.config",
    "PrecisionPair": "kvtuner.precision",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvtuner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
