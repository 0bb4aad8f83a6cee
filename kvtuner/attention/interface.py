"""kvtuner's attention function for transformers, registered with `AttentionInterface`.

`enable(model)` switches a model whose attention is `sdpa` (or `eager`) to `kvtuner` (or
`kvtuner_eager`): the same function for every call, except a decode step of a `KVTunerCache`
layer, which it answers with `decode_attention` on the packed stores. A forward pre-hook (`attach`)
tells each `KVTunerCache` the forward's attention mask and whether its attention is kvtuner's,
and makes the cache the one the attention function reads (a context variable, reset by a forward
hook). Everything else (prefill, chunked forwards, other caches, training) goes to the model's own
implementation, unchanged.
"""

from __future__ import annotations

import sys
import warnings
from contextvars import ContextVar
from typing import Any

import torch

from kvtuner.attention.decode import decode_attention

FUSED = {"kvtuner": "sdpa", "kvtuner_eager": "eager"}  # name -> the implementation it wraps
_ACTIVE: ContextVar[Any] = ContextVar("kvtuner_active_cache", default=None)
_WARNED: set[str] = set()


def _base_attention(module: Any, base: str) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base == "eager":  # each model file has its own eager function
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[base]


def _attention(base: str) -> Any:
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cache = _ACTIVE.get()
        index = getattr(module, "layer_idx", None)
        if cache is not None and index is not None:
            layer = cache.layers[index]
            if getattr(layer, "pending", None) is not None:
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                try:
                    out = decode_attention(
                        query, layer, attention_mask, scale, softcap=kwargs.get("softcap")
                    )
                finally:
                    layer.finish_attention()
                return out, None
        fn = _base_attention(module, base)
        return fn(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    attention.__name__ = f"kvtuner_attention_over_{base}"
    return attention


def register() -> None:
    """Register `kvtuner` and `kvtuner_eager` with transformers (attention and mask functions)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask, sdpa_mask

    masks = {"sdpa": sdpa_mask, "eager": eager_mask}
    for name, base in FUSED.items():
        AttentionInterface.register(name, _attention(base))
        AttentionMaskInterface.register(name, masks[base])


def enable(model: Any) -> bool:
    """Give `model` kvtuner's attention (wrapping its sdpa or eager one); False, with one warning
    line, where its implementation is another (flash, flex): decoding then dequantizes."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in FUSED:
        return True
    target = {base: name for name, base in FUSED.items()}.get(current)
    if target is None or not hasattr(model, "set_attn_implementation"):
        warn_once(
            f"kvtuner: decode attention on packed codes needs attn_implementation 'sdpa' or "
            f"'eager' (this model has {current!r}); each decode step dequantizes the history"
        )
        return False
    register()
    model.set_attn_implementation(target)
    return True


def fused_attention(model: Any) -> bool:
    """Whether `model`'s attention is kvtuner's."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None) in FUSED


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


# -- the forward hooks -------------------------------------------------------------------------------
def _enter(module: Any, args: tuple, kwargs: dict) -> None:
    from kvtuner.cache import KVTunerCache

    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    tokens = module.__dict__.setdefault("_kvtuner_tokens", [])
    if not isinstance(cache, KVTunerCache):
        tokens.append(None)
        return
    cache.observe_attention_mask(kwargs.get("attention_mask"))
    fused = cache.fused_attention and fused_attention(module) and not module.training
    cache.set_fused(fused)
    tokens.append((cache, _ACTIVE.set(cache if fused else None)))


def _leave(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
    tokens = module.__dict__.get("_kvtuner_tokens")
    entry = tokens.pop() if tokens else None
    if entry is not None:
        cache, token = entry
        cache.set_fused(False)
        _ACTIVE.reset(token)


def attach(model: Any) -> None:
    """Register the forward hooks on `model` (once)."""
    if getattr(model, "_kvtuner_hooks", False) or not hasattr(model, "register_forward_pre_hook"):
        return
    model.register_forward_pre_hook(_enter, with_kwargs=True)
    model.register_forward_hook(_leave, with_kwargs=True, always_call=True)
    model._kvtuner_hooks = True
