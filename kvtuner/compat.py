"""Differences between transformers 5.x releases, kept in one place.

- which layers use a sliding window (5.24 has `get_layer_types_and_kwargs`; 5.0 read the config),
- the name of the cache keyword of `forward`/`generate` (`cache=` from 5.24, `past_key_values=` before).
"""

from __future__ import annotations

import inspect
from typing import Any

from transformers import cache_utils

from kvtuner.errors import ConfigError

SLIDING_TYPES = ("sliding_attention", "chunked_attention")
FULL_TYPES = ("full_attention",)


def text_config(config: Any) -> Any:
    """The decoder text config of a model config (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if getter is not None else config


def sliding_windows(config: Any) -> list[int | None]:
    """Per decoder layer: its sliding window in tokens, or None for full attention.

    Chunked attention keeps a window of one chunk, as transformers' own dynamic cache does. Any
    other layer type (linear attention, convolution states, KV-shared "dummy" layers, ...) is a
    ConfigError naming the layer: its cache is not keys and values to quantize.
    """
    cfg = text_config(config)
    helper = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    if helper is not None:
        layer_types, kwargs = helper(cfg)
        windows = [kw.get("sliding_window") for kw in kwargs]
    else:
        window = getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None)
        layer_types = getattr(cfg, "layer_types", None) or (
            ["sliding_attention" if window else "full_attention"] * cfg.num_hidden_layers
        )
        windows = [window] * len(layer_types)
    for index, kind in enumerate(layer_types):
        if kind not in SLIDING_TYPES + FULL_TYPES:
            raise ConfigError(
                f"layer {index} is a '{kind}' layer: kvtuner quantizes full, sliding and chunked "
                "attention layers only"
            )
    return [w if t in SLIDING_TYPES else None for t, w in zip(layer_types, windows)]


def head_dim(config: Any) -> int:
    """Channels per attention head."""
    cfg = text_config(config)
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def model_shape(config: Any) -> Any:
    """The `kvtuner.memory.ModelShape` of a model config: layers, KV heads, head_dim, windows."""
    from kvtuner.memory import ModelShape

    cfg = text_config(config)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return ModelShape(
        num_layers=int(cfg.num_hidden_layers),
        kv_heads=int(heads),
        head_dim=head_dim(cfg),
        windows=tuple(sliding_windows(cfg)),
    )


def cache_kwarg(model: Any) -> str:
    """`cache` where the model's forward takes it (transformers >= 5.24), else `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model: Any, cache: Any, **kwargs: Any) -> dict[str, Any]:
    """`kwargs` plus the cache under the keyword this transformers release expects."""
    return {**kwargs, cache_kwarg(model): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a forward returned, under either name."""
    return getattr(outputs, "cache", None) or getattr(outputs, "past_key_values", None)
