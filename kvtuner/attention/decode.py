"""One decode step's attention over a `QuantizedKVLayer` as it is held: sinks, packed stores, residual.

The layer's history is three parts, oldest first: full-precision sinks, packed stores and (KIVI) a
full-precision residual; the newest token is already in it. For queries `[b, heads, 1, d]`:

    scores = [q.k_sinks | q.k_stored (on the codes, `kernels`) | q.k_residual]   [b, kv_heads, g, n]
    p = softmax(scores + mask);   out = p_sinks v_sinks + mix(p_stored, codes) + p_residual v_residual

with the query heads of one KV head side by side (g = heads / kv_heads, as `repeat_kv` pairs them).
No dequantized copy of the history is made. Which code runs it, first that applies:

1. on the CPU, kvtuner's kernel (`native`, one call per layer, online softmax over chunks of 128
   tokens: the workspace is O(chunk) per thread);
2. once the layer has seen `compiling.COMPILE_FROM` tokens, one `torch.compile`d graph of
   `kernels.decode_parts` (CUDA: Triton; or CPU with KVTUNER_NATIVE=0);
3. the same kernels eagerly, part by part, `kernels.EAGER_CHUNK` tokens of float codes at a time
   (softcap, a store smoothed from a later token, short histories).

Paths 2 and 3 keep the scores whole (n floats per query head). The scaled scores and the softmax
are float32; the output is cast to the query's dtype.

`reference_decode_attention` is the plain path it is tested against: dequantize the visible history
(in float32), then attend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from kvtuner import compiling
from kvtuner.attention import kernels, native
from kvtuner.quant.store import PackedView, RawView, StoreView


def _call(name: str, eager: Callable, tokens: int, *args: Any) -> torch.Tensor:
    """Kernel `name` compiled (token axis dynamic) where `compiling` says so, else `eager`."""
    fn = getattr(kernels, name)
    if compiling.compiled(fn, tokens) is not None:
        for t in args[1:4]:  # the token axis: dim 2 of codes, scales and zeros
            torch._dynamo.maybe_mark_dynamic(t, 2)
        if name == "token_value_mix":  # and dim 3 of the weights
            torch._dynamo.maybe_mark_dynamic(args[0], 3)
        return compiling.run(fn, tokens, *args)
    return eager(*args)


# -- per store kind ----------------------------------------------------------------------------------
def _packed_scores(q: torch.Tensor, view: PackedView) -> torch.Tensor:
    n = view.seq_len
    args = (view.packed, view.scale, view.zero, view.bits, view.group)
    if view.per_channel:
        eager = lambda *a: kernels.chunked_scores(  # noqa: E731
            kernels.channel_key_scores, *a, per_channel=True
        )
        return _call("channel_key_scores", eager, n, q, *args)
    eager = lambda *a: kernels.chunked_scores(  # noqa: E731
        kernels.token_key_scores, *a, per_channel=False
    )
    return _call("token_key_scores", eager, n, q, *args)


def key_scores(q: torch.Tensor, view: StoreView) -> torch.Tensor:
    """Scores `[b, h, g, n]` of float32 queries `[b, h, g, d]` against a store's keys, as held."""
    if isinstance(view, RawView):
        return q @ view.data.float().transpose(-1, -2)
    if view.channel_scale is None or view.per_channel:
        return _packed_scores(q, view)
    # smoothed: tokens from smooth_from on were divided by the channel scale before quantizing
    cs = view.channel_scale.float()
    first = min(view.smooth_from, view.seq_len)
    if first == 0:
        return _packed_scores(q * cs, view)
    head, tail = _split(view, first)
    return torch.cat([_packed_scores(q, head), _packed_scores(q * cs, tail)], -1)


def value_mix(p: torch.Tensor, view: StoreView, head_dim: int) -> torch.Tensor:
    """`sum_t p_t v_t` `[b, h, g, d]` of float32 weights `[b, h, g, n]` over a store's values."""
    if isinstance(view, RawView):
        return p @ view.data.float()
    if view.channel_scale is None:
        return _packed_mix(p, view, head_dim)
    cs = view.channel_scale.float()
    first = min(view.smooth_from, view.seq_len)
    if first == 0:
        return _packed_mix(p, view, head_dim) * cs
    head, tail = _split(view, first)
    return (
        _packed_mix(p[..., :first], head, head_dim)
        + _packed_mix(p[..., first:], tail, head_dim) * cs
    )


def _packed_mix(p: torch.Tensor, view: PackedView, head_dim: int) -> torch.Tensor:
    args = (view.packed, view.scale, view.zero, view.bits, view.group, head_dim)
    return _call("token_value_mix", kernels.chunked_value_mix, view.seq_len, p, *args)


def _split(view: PackedView, first: int) -> tuple[PackedView, PackedView]:
    """Per-token view -> tokens `[:first]`, `[first:]`."""

    def part(rows: slice) -> PackedView:
        return PackedView(
            view.packed[..., rows, :],
            view.scale[..., rows, :],
            view.zero[..., rows, :],
            view.bits,
            view.head_dim,
            view.group,
            False,
        )

    return part(slice(0, first)), part(slice(first, None))


# -- one layer ---------------------------------------------------------------------------------------
def decode_attention(
    query: torch.Tensor,
    layer: Any,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    visible: int | None = None,
) -> torch.Tensor:
    """Attention of one new token per row over `layer`'s held history -> `[b, 1, heads, d]`.

    query `[b, heads, 1, d]`; `layer` a QuantizedKVLayer whose update stored the new token;
    `attention_mask` None, bool (True = attend) or additive float, `[b or 1, 1, 1, visible]`,
    over the last `visible` tokens (default `layer.pending`, what the layer's update left).
    """
    b, heads, _, d = query.shape
    kv_heads = layer._heads
    g = heads // kv_heads
    visible = layer.pending if visible is None else visible
    # contiguous: the kernels index it densely (a batch's query may come in any layout)
    q = (query.float().reshape(b, kv_heads, g, d) * scaling).contiguous()
    sink, res = layer._sink, layer._res
    stored = layer.stores.seq_len
    # a prompt shorter than the sinks (or KIVI's residual) leaves the stores empty for a while
    keys, values = layer.stores.views() if stored else (None, None)
    counts = (sink.shape[-2], stored, res.shape[-2])
    if stored and _native_layer(q, sink, res, keys, values, stored, softcap):
        bias = _bias(attention_mask, sum(counts) - visible, visible, q)
        out = native.decode_layer(q, sink, res, *_store_args(keys, values, bias))
        return out.reshape(b, heads, 1, d).transpose(1, 2).to(query.dtype)
    # compiled once the layer has seen COMPILE_FROM tokens: a sliding layer holds only its window
    # but keeps decoding for as long as the full layers do
    if stored and _whole_layer(keys, values, stored, layer.cumulative_length, softcap):
        bias = _bias(attention_mask, sum(counts) - visible, visible, q)
        out = _decode_layer(q, sink, res, keys, values, bias)
        return out.reshape(b, heads, 1, d).transpose(1, 2).to(query.dtype)
    parts = []
    if counts[0]:
        parts.append(q @ sink[0].float().transpose(-1, -2))
    if counts[1]:
        parts.append(key_scores(q, keys))
    if counts[2]:
        parts.append(q @ res[0].float().transpose(-1, -2))
    scores = torch.cat(parts, -1) if len(parts) > 1 else parts[0]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    bias = _bias(attention_mask, sum(counts) - visible, visible, q)
    p = torch.softmax(scores if bias is None else scores + bias, dim=-1)
    out = None
    first = 0
    for count, part in zip(counts, ("sink", "stored", "residual")):
        if not count:
            continue
        weights = p[..., first : first + count]
        if part == "sink":
            mixed = weights @ sink[1].float()
        elif part == "residual":
            mixed = weights @ res[1].float()
        else:
            mixed = value_mix(weights, values, d)
        out = mixed if out is None else out + mixed
        first += count
    return out.reshape(b, heads, 1, d).transpose(1, 2).to(query.dtype)


def _native_layer(q, sink, res, keys, values, stored: int, softcap: float | None) -> bool:
    """Whether kvtuner's CPU kernel (`native`) runs the layer: packed keys and values on the
    CPU, smoothed from their first token or not at all, one dtype for sinks, residual, scales."""
    if softcap or stored == 0 or q.device.type != "cpu":
        return False
    if not isinstance(keys, PackedView) or not isinstance(values, PackedView):
        return False
    if any(v.channel_scale is not None and v.smooth_from for v in (keys, values)):
        return False
    dtypes = {t.dtype for t in (sink, res, keys.scale, keys.zero, values.scale, values.zero)}
    return len(dtypes) == 1 and native.enabled() and native.available()


def _store_args(keys: PackedView, values: PackedView, bias: torch.Tensor | None) -> tuple:
    """The stores' arguments of `kernels.decode_layer` (and the native kernel), after q, sink, res."""
    return (
        keys.packed,
        keys.scale,
        keys.zero,
        keys.channel_scale,
        values.packed,
        values.scale,
        values.zero,
        values.channel_scale,
        bias,
        keys.bits,
        keys.group,
        values.bits,
        values.group,
        keys.per_channel,
    )


def _whole_layer(
    keys: StoreView, values: StoreView, stored: int, seen: int, softcap: float | None
) -> bool:
    """Whether one compiled graph runs the layer: packed keys and values, smoothed from their
    first token or not at all, and a compiled kernel would run (see `kvtuner.compiling`)."""
    if softcap or stored == 0:
        return False
    if not isinstance(keys, PackedView) or not isinstance(values, PackedView):
        return False
    if any(v.channel_scale is not None and v.smooth_from for v in (keys, values)):
        return False
    return compiling.compiled(kernels.decode_parts, seen) is not None


def _bias(
    attention_mask: torch.Tensor | None, skip: int, visible: int, like: torch.Tensor
) -> torch.Tensor | None:
    """Additive float32 `[b or 1, 1, 1, skip + visible]` over the held tokens, or None: -inf for
    the `skip` oldest (out of a sliding window) and where the mask (bool, True = attend, or
    additive, over the last `visible`) says so."""
    if not skip and attention_mask is None:
        return None
    rows = attention_mask.shape[0] if attention_mask is not None else 1
    bias = like.new_zeros((rows, 1, 1, skip + visible))
    bias[..., :skip] = -torch.inf
    if attention_mask is not None:
        mask = attention_mask.reshape(rows, 1, 1, -1)[..., -visible:]
        seen = bias[..., skip:]
        if mask.dtype == torch.bool:
            seen.masked_fill_(~mask, -torch.inf)
        else:
            seen.add_(mask.float())
    return bias


def _decode_layer(q, sink, res, keys, values, bias) -> torch.Tensor:
    nr = res.shape[-2]
    sink, res, bias = kernels.split_parts(sink, res, bias)
    if bias is not None:  # each part its own storage: a view's strides follow the whole bias's
        # length, and the guard on the (static) sinks' part would recompile at every step
        bias = tuple(None if part is None else part.contiguous() for part in bias)
    args = (q, sink, res, *_store_args(keys, values, bias))
    # the token axis of the stores (and of their bias) is unbacked: no guard on its size, so a
    # growing context does not recompile (once, when a store's buffer first holds spare rows:
    # dynamo guards whether the codes' batch stride equals their length; measured, torch 2.13)
    for t in (keys.packed, keys.scale, keys.zero, values.packed, values.scale, values.zero):
        if t.shape[2] > 1:
            torch._dynamo.decorators.mark_unbacked(t, 2)
    if bias is not None and bias[2] is not None and bias[2].shape[-1] > 1:
        torch._dynamo.decorators.mark_unbacked(bias[2], 3)
    if nr > 1:
        torch._dynamo.maybe_mark_dynamic(res, 3)
        if bias is not None and bias[1] is not None:
            torch._dynamo.maybe_mark_dynamic(bias[1], 3)
    return compiling.run(kernels.decode_parts, compiling.COMPILE_FROM, *args)


def reference_decode_attention(
    query: torch.Tensor,
    layer: Any,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    visible: int | None = None,
) -> torch.Tensor:
    """The plain path: dequantize the last `visible` tokens in float32, then attend (float32)."""
    b, heads, _, d = query.shape
    visible = layer.pending if visible is None else visible
    keys, values = layer._read(visible, dtype=torch.float32)
    g = heads // keys.shape[1]
    keys, values = keys.repeat_interleave(g, 1), values.repeat_interleave(g, 1)
    scores = (query.float() @ keys.transpose(-1, -2)) * scaling  # [b, heads, 1, visible]
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, -1)[..., -visible:]
        scores = (
            scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
        )
    out = torch.softmax(scores, -1) @ values
    return out.transpose(1, 2).to(query.dtype)
