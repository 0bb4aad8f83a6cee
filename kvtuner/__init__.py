"""kvtuner: layer-wise mixed-precision KV-cache quantization.

>>> import kvtuner
>>> cfg = kvtuner.load_config("searched_configs/gemma-3-270m/per-token/kvtuner_c3.5.yaml")
>>> cache = kvtuner.quantized_cache(model, cfg)  # or a path, or "KV4"
>>> out = model.generate(**inputs, cache=cache, max_new_tokens=64)  # past_key_values= before 5.24
>>> cache.nbytes()  # bytes the cache really holds
"""

from kvtuner.cache import KVTunerCache, QuantizedKVLayer, quantized_cache
from kvtuner.config import PrecisionConfig, load_config
from kvtuner.precision import PrecisionPair

__version__ = "0.1.0"

__all__ = [
    "KVTunerCache",
    "PrecisionConfig",
    "PrecisionPair",
    "QuantizedKVLayer",
    "load_config",
    "quantized_cache",
]
