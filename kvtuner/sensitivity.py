"""Per-layer, per-pair quantization errors of attention: the math of `kvtuner calibrate`, on tensors.

For one layer with queries Q, keys K and values V (as the attention saw them, after RoPE),
and K̂, V̂ their quantize-dequantize at a precision pair:

    e_o = ||A(Q, K̂, V̂) - A(Q, K, V)||_F / ||A(Q, K, V)||_F,   A = softmax(mask(scale * Q Kᵀ)) V
    e_k = ||K̂ - K||_F / ||K||_F,   e_v = ||V̂ - V||_F / ||V||_F

Grouped-query attention: query head h reads KV head h // (heads / kv_heads), as transformers'
`repeat_kv` (repeat_interleave) does. The mask is causal, plus the layer's sliding window: a query
at position t sees keys max(0, t - window + 1) .. t. A query at t sees the keys and values the
cache holds quantized at that step (`kvtuner.memory.held_tokens(t + 1)`: after the full-precision
sinks, and under KIVI before the full-precision residual) quantized, the others exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from tqdm.auto import tqdm

from kvtuner.memory import HeldTokens, held_tokens
from kvtuner.precision import FULL_PRECISION, Layout, PrecisionPair
from kvtuner.quant import fake_quantize

COLUMNS = ("layer", "key_bits", "value_bits", "equivalent_bits", "e_o", "e_k", "e_v")


@dataclass(frozen=True)
class LayerCapture:
    """What one attention layer saw during calibration.

    query: `[samples, heads, query_tokens, head_dim]`, the last `query_tokens` positions.
    key, value: `[samples, kv_heads, seq, head_dim]`, the whole sample.
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    sliding_window: int | None = None
    softcap: float | None = None

    @property
    def query_offset(self) -> int:
        """Position of the first captured query in its sample."""
        return self.key.shape[-2] - self.query.shape[-2]


@dataclass(frozen=True)
class QuantScheme:
    """How the cache quantizes one layer's history: a `Layout` (sinks, groups, KIVI blocks and
    residual) applied to a whole captured sequence."""

    layout: Layout = Layout()

    def held(self, context: int) -> HeldTokens:
        """Sinks, quantized and residual tokens among the first `context` (full attention)."""
        return held_tokens(self.layout, PrecisionPair(2, 2), context)

    def quantize(self, x: torch.Tensor, bits: int, *, is_key: bool) -> torch.Tensor:
        """Quantize-dequantize the stored part of `[..., seq, head_dim]`; sinks and residual stay exact."""
        if bits == FULL_PRECISION:
            return x
        held = self.held(x.shape[-2])
        if held.quantized == 0:
            return x
        begin, end = held.sinks, held.sinks + held.quantized
        part = x[..., begin:end, :]
        if self.layout.kivi and is_key:
            part = fake_quantize(part, bits, per_channel=True, group_size=self.layout.block_size)
        else:
            group = self.layout.channel_group(x.shape[-1])
            scale = channel_scale(part) if self.layout.smooth else None
            if scale is None:
                part = fake_quantize(part, bits, group_size=group)
            else:  # as a smoothed store: the stored tokens' per-channel peak (the prompt's)
                part = fake_quantize(part / scale, bits, group_size=group) * scale
        return torch.cat([x[..., :begin, :], part, x[..., end:, :]], dim=-2)

    def stored_mask(self, query_positions: torch.Tensor, seq_len: int) -> torch.Tensor | None:
        """Bool `[queries, seq]`: key j is held quantized when query t runs; None when all are."""
        layout = self.layout
        if not layout.kivi and layout.sink_tokens == 0:
            return None
        bounds = [self.held(int(t) + 1) for t in query_positions]
        begin = torch.tensor([h.sinks for h in bounds], device=query_positions.device)
        end = torch.tensor([h.sinks + h.quantized for h in bounds], device=query_positions.device)
        keys = torch.arange(seq_len, device=query_positions.device)[None, :]
        return (keys >= begin[:, None]) & (keys < end[:, None])


def channel_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-channel peak |x| over tokens, `[..., 1, head_dim]`, floored as `TokenStore` floors it."""
    peak = x.abs().amax(dim=-2, keepdim=True).float()
    return torch.maximum(peak, peak.mean(-1, keepdim=True) * 1e-2 + 1e-12).to(x.dtype)


def visible_mask(
    query_positions: torch.Tensor, seq_len: int, sliding_window: int | None
) -> torch.Tensor:
    """Bool `[queries, seq]`: causal, and inside the sliding window when there is one."""
    keys = torch.arange(seq_len, device=query_positions.device)[None, :]
    queries = query_positions[:, None]
    mask = keys <= queries
    if sliding_window is not None:
        mask &= keys > queries - sliding_window
    return mask


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    scaling: float,
    query_offset: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    key_hat: torch.Tensor | None = None,
    stored: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention weights `[samples, kv_heads, group, queries, seq]` in float32.

    query `[samples, heads, queries, head_dim]` sits at positions `query_offset + i`; key
    `[samples, kv_heads, seq, head_dim]`. With `key_hat`, keys marked in `stored` (`[queries, seq]`,
    None = all) are read from `key_hat` instead.
    """
    samples, heads, queries, head_dim = query.shape
    kv_heads, seq_len = key.shape[1], key.shape[2]
    grouped = query.float().reshape(samples, kv_heads, heads // kv_heads, queries, head_dim)

    def scores(k: torch.Tensor) -> torch.Tensor:
        return grouped @ k.float()[:, :, None].transpose(-1, -2)

    logits = scores(key if key_hat is None else key_hat)
    if key_hat is not None and stored is not None:
        logits = torch.where(stored, logits, scores(key))
    logits = logits * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    positions = torch.arange(query_offset, query_offset + queries, device=query.device)
    logits = logits.masked_fill(~visible_mask(positions, seq_len, sliding_window), float("-inf"))
    return torch.softmax(logits, dim=-1)


def attend(
    probs: torch.Tensor,
    value: torch.Tensor,
    *,
    value_hat: torch.Tensor | None = None,
    stored: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output `[samples, heads, queries, head_dim]` from `attention_probs` and values.

    value `[samples, kv_heads, seq, head_dim]`; with `value_hat`, values marked in `stored` are read
    from it (None = all).
    """
    samples, kv_heads, group, queries, _ = probs.shape

    def weighted(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return weights @ v.float()[:, :, None]

    if value_hat is None:
        out = weighted(probs, value)
    elif stored is None:
        out = weighted(probs, value_hat)
    else:
        out = weighted(probs * stored, value_hat) + weighted(probs * ~stored, value)
    return out.reshape(samples, kv_heads * group, queries, value.shape[-1])


def attention_output(capture: LayerCapture) -> torch.Tensor:
    """Full-precision attention output of a capture: `[samples, heads, query_tokens, head_dim]`."""
    probs = attention_probs(
        capture.query,
        capture.key,
        scaling=capture.scaling,
        query_offset=capture.query_offset,
        sliding_window=capture.sliding_window,
        softcap=capture.softcap,
    )
    return attend(probs, capture.value)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||_F / ||exact||_F (0 when both are zero)."""
    norm = torch.linalg.vector_norm(exact.float())
    diff = torch.linalg.vector_norm(approx.float() - exact.float())
    return float(diff / norm) if norm > 0 else float(diff)


def layer_errors(
    capture: LayerCapture, pairs: Sequence[PrecisionPair], scheme: QuantScheme
) -> list[dict[str, float]]:
    """One row per pair: layer, key_bits, value_bits, equivalent_bits, e_o, e_k, e_v.

    Keys and values are quantized once per bit width; the attention weights once per key width.
    """
    seq_len = capture.key.shape[-2]
    positions = torch.arange(capture.query_offset, seq_len, device=capture.key.device)
    stored = scheme.stored_mask(positions, seq_len)
    key_bits = sorted({p.key_bits for p in pairs})
    value_bits = sorted({p.value_bits for p in pairs})
    key_hats = {b: scheme.quantize(capture.key, b, is_key=True) for b in key_bits}
    value_hats = {b: scheme.quantize(capture.value, b, is_key=False) for b in value_bits}
    e_k = {b: relative_error(k, capture.key) for b, k in key_hats.items()}
    e_v = {b: relative_error(v, capture.value) for b, v in value_hats.items()}
    reference = attention_output(capture)
    rows = []
    for kb in key_bits:
        probs = attention_probs(
            capture.query,
            capture.key,
            scaling=capture.scaling,
            query_offset=capture.query_offset,
            sliding_window=capture.sliding_window,
            softcap=capture.softcap,
            key_hat=key_hats[kb],
            stored=stored,
        )
        for vb in value_bits:
            pair = PrecisionPair(kb, vb)
            if pair not in pairs:
                continue
            out = attend(probs, capture.value, value_hat=value_hats[vb], stored=stored)
            rows.append(
                {
                    "layer": capture.layer,
                    "key_bits": kb,
                    "value_bits": vb,
                    "equivalent_bits": pair.equivalent_bits,
                    "e_o": relative_error(out, reference),
                    "e_k": e_k[kb],
                    "e_v": e_v[vb],
                }
            )
    return rows


def sensitivity_table(
    captures: Iterable[LayerCapture],
    pairs: Sequence[PrecisionPair],
    scheme: QuantScheme,
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """Tidy table over layers x pairs with columns `COLUMNS`, sorted by layer then most bits first."""
    rows: list[dict[str, float]] = []
    captures = list(captures)
    for capture in tqdm(captures, desc="sensitivity", unit="layer", disable=not progress):
        rows.extend(layer_errors(capture, pairs, scheme))
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    order = {p: i for i, p in enumerate(pairs)}
    table["_order"] = [order[PrecisionPair(k, v)] for k, v in zip(table.key_bits, table.value_bits)]
    return table.sort_values(["layer", "_order"]).drop(columns="_order").reset_index(drop=True)
