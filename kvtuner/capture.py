"""Capture inside attention: each layer's queries, keys and values as attention receives them.

A custom entry of transformers' `AttentionInterface` records its inputs (after RoPE and q/k norms,
with the scaling, sliding window and soft-capping the model passes) and then runs SDPA (or the same
math in float32 for soft-capped models). Hooks may also return an output of their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from kvtuner.compat import text_config
from kvtuner.errors import ConfigError
from kvtuner.sensitivity import LayerCapture, attend, attention_probs

IMPLEMENTATION = "kvtuner_capture"
# hook(module, query, key, value, kwargs) -> attention output `[batch, seq, heads, head_dim]` or None
AttentionHook = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor | None]
_HOOKS: list[AttentionHook] = []


# -- the attention entry ----------------------------------------------------------------------


def _attention(module, query, key, value, attention_mask, **kwargs):  # transformers' signature
    """Run the innermost hook; where it returns None, SDPA (or the same math for softcapped models)."""
    if _HOOKS:
        out = _HOOKS[-1](module, query, key, value, kwargs)
        if out is not None:
            return out, None
    if kwargs.get("softcap") is not None:
        # SDPA has no softcap: the same math in float32 (unpadded causal batches only)
        out = _attention_math(query, key, value, kwargs)
        return out.transpose(1, 2).to(query.dtype).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _attention_math(query, key, value, kwargs, key_hat=None, value_hat=None, stored=None):
    """`[batch, heads, q, head_dim]` output of `sensitivity.attention_probs` + `attend`."""
    probs = attention_probs(
        query,
        key,
        scaling=_scaling(query, kwargs),
        query_offset=key.shape[-2] - query.shape[-2],
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
        key_hat=key_hat,
        stored=stored,
    )
    return attend(probs, value, value_hat=value_hat, stored=stored)


def _scaling(query: torch.Tensor, kwargs: dict) -> float:
    scaling = kwargs.get("scaling")
    return float(scaling) if scaling is not None else query.shape[-1] ** -0.5


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def attention_hook(model: Any, hook: AttentionHook) -> Iterator[None]:
    """Route `model`'s attention through `hook` inside the block; restore its implementation after."""
    _register()
    previous = model.config._attn_implementation
    model.config._attn_implementation = IMPLEMENTATION
    _HOOKS.append(hook)
    try:
        yield
    finally:
        _HOOKS.remove(hook)
        model.config._attn_implementation = previous


def _layer_index(module: Any) -> int:
    index = getattr(module, "layer_idx", None)
    if index is None:
        raise ConfigError(
            f"{type(module).__name__} has no layer_idx: this architecture cannot be calibrated"
        )
    return int(index)


# -- capture ----------------------------------------------------------------------------------


def capture_layers(
    model: Any, samples: torch.Tensor, *, query_tokens: int = 64, progress: bool = True
) -> list[LayerCapture]:
    """Run `samples` `[n, seq]` through `model` and return each layer's capture, in layer order.

    Queries are the last `query_tokens` positions `[n, heads, query_tokens, head_dim]`; keys and
    values the whole sample `[n, kv_heads, seq, head_dim]`, as the attention received them.
    """
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    options: dict[int, tuple[float, int | None, float | None]] = {}

    def record(module, query, key, value, kwargs):
        layer = _layer_index(module)
        # clone the query slice so the full query tensor can be freed; keys and values are whole
        parts.setdefault(layer, []).append((query[:, :, -query_tokens:].clone(), key, value))
        options[layer] = (
            _scaling(query, kwargs),
            kwargs.get("sliding_window"),
            kwargs.get("softcap"),
        )
        return None

    base = getattr(model, "base_model", model)  # the decoder without the LM head: no logits needed
    device = next(model.parameters()).device
    with torch.inference_mode(), attention_hook(model, record):
        for sample in tqdm(samples, desc="capture", unit="sample", disable=not progress):
            base(input_ids=sample[None].to(device), use_cache=False)
    num_layers = int(text_config(model.config).num_hidden_layers)
    if sorted(parts) != list(range(num_layers)):
        raise ConfigError(
            f"captured attention in layers {sorted(parts)}, expected 0..{num_layers - 1}"
        )
    captures = []
    for layer in range(num_layers):
        q, k, v = (torch.cat(t) for t in zip(*parts.pop(layer)))
        scaling, window, softcap = options[layer]
        captures.append(LayerCapture(layer, q, k, v, scaling, window, softcap))
    return captures
