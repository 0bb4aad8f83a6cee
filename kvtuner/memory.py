"""What a config's cache really holds at a context length: bytes, and effective bits.

A pure function of (config, model shape, context, dtype), written to match `KVTunerCache` byte for
byte (tests/test_memory.py fills real caches and compares with `nbytes()`):

- every layer holds its tokens in three parts: the first `sink_tokens` in full precision, packed
  quantized tokens, and (KIVI) a full-precision residual of the newest tokens;
- a sliding-window layer holds only its window (`window - 1` past tokens, as transformers'
  dynamic sliding layer; KIVI drops whole blocks, so it may keep up to a block more);
- codes are packed `bits` per element; each per-token group of channels stores a scale and a zero
  point, each KIVI key block one per channel, in the cache dtype; 16 bits means kept as is; a
  smoothed per-token tensor also holds one per-channel scale per head.

Effective bits = dtype bits x bytes held / bytes a dense cache of the same dtype holds: the bits per
cached element, 16 for a dense 16-bit cache. It is additive over layers (`layer_costs`), so a bit
budget on it is a knapsack over layers.

Engine storage (`engine_effective_bits`): a layer an engine stores in formats K and V
(`kvtuner.targets.Choice`) holds each format's real bits per element (`kvtuner.formats`: codes and
per-token or per-block scales; q4_0 4.5, nvfp4 4.5, int4_per_token_head 4 + 32/head_dim), 16 where
it keeps the model dtype; layers weigh by the tokens they hold. tests/test_engine_cache.py checks
it against `EngineKVCache.nbytes()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvtuner.precision import FULL_PRECISION, Layout, PrecisionPair


@dataclass(frozen=True)
class ModelShape:
    """The attention shapes that decide a KV cache's size: per layer, its sliding window or None."""

    num_layers: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", tuple(self.windows))
        if len(self.windows) != self.num_layers:
            raise ValueError(f"{len(self.windows)} windows for {self.num_layers} layers")


@dataclass(frozen=True)
class HeldTokens:
    """Tokens one layer holds: full-precision sinks, packed quantized tokens, full-precision residual."""

    sinks: int
    quantized: int
    residual: int

    @property
    def total(self) -> int:
        return self.sinks + self.quantized + self.residual


def held_tokens(
    layout: Layout, pair: PrecisionPair, context: int, window: int | None = None
) -> HeldTokens:
    """What a layer at `pair` holds after `context` tokens went in (one prefill), windows included.

    Mirrors `QuantizedKVLayer`: sinks first, then whole blocks flushed from the residual beyond
    `residual_length`; a sliding layer then drops sinks, whole blocks, and (only when no block is
    left) residual tokens, down to `window - 1`.
    """
    if context < 0:
        raise ValueError(f"context must be >= 0; got {context}")
    sinks = min(layout.sink_tokens, context)
    rest = context - sinks
    block = layout.block(pair)
    quantized = max(rest - layout.residual_length, 0) // block * block
    residual = rest - quantized
    if window is not None:
        excess = sinks + quantized + residual - (window - 1)
        if excess > 0:
            dropped = min(sinks, excess)
            sinks, excess = sinks - dropped, excess - dropped
            dropped = min(excess // block * block, quantized)
            quantized, excess = quantized - dropped, excess - dropped
            if excess > 0 and quantized == 0:
                residual -= excess
    return HeldTokens(sinks, quantized, residual)


def tensor_bytes(
    bits: int, held: HeldTokens, layout: Layout, shape: ModelShape, dtype_bytes: int, *, key: bool
) -> int:
    """Bytes of the keys (`key=True`) or the values of one layer, batch 1."""
    heads, head_dim = shape.kv_heads, shape.head_dim
    raw_row = heads * head_dim * dtype_bytes
    if bits == FULL_PRECISION:
        return held.total * raw_row
    codes = heads * -(-head_dim * bits // 8)  # packed bytes of one token's row
    if key and layout.kivi:  # per channel: one scale and zero per channel per block
        params = heads * head_dim * 2 * dtype_bytes * (held.quantized // layout.block_size)
    else:
        groups = head_dim // layout.channel_group(head_dim)
        params = held.quantized * heads * groups * 2 * dtype_bytes
        if layout.smooth and held.quantized:  # one per-channel scale per head
            params += heads * head_dim * dtype_bytes
    return (held.sinks + held.residual) * raw_row + held.quantized * codes + params


def layer_bytes(
    pair: PrecisionPair,
    layout: Layout,
    shape: ModelShape,
    context: int,
    layer: int,
    dtype_bytes: int = 2,
) -> int:
    """Bytes layer `layer` holds at `pair` after `context` tokens (batch 1)."""
    held = held_tokens(layout, pair, context, shape.windows[layer])
    return tensor_bytes(pair.key_bits, held, layout, shape, dtype_bytes, key=True) + tensor_bytes(
        pair.value_bits, held, layout, shape, dtype_bytes, key=False
    )


def dense_layer_bytes(shape: ModelShape, context: int, layer: int, dtype_bytes: int = 2) -> int:
    """Bytes a dense (DynamicCache) layer holds after `context` tokens: a sliding one `window - 1`."""
    window = shape.windows[layer]
    tokens = context if window is None else min(context, window - 1)
    return 2 * tokens * shape.kv_heads * shape.head_dim * dtype_bytes


def cache_bytes(
    pairs: Sequence[PrecisionPair],
    layout: Layout,
    shape: ModelShape,
    context: int,
    dtype_bytes: int = 2,
) -> int:
    """Bytes a cache of per-layer `pairs` holds after `context` tokens (batch 1)."""
    _check(pairs, shape)
    return sum(
        layer_bytes(pair, layout, shape, context, i, dtype_bytes) for i, pair in enumerate(pairs)
    )


def dense_bytes(shape: ModelShape, context: int, dtype_bytes: int = 2) -> int:
    """Bytes a dense cache holds after `context` tokens (batch 1)."""
    return sum(dense_layer_bytes(shape, context, i, dtype_bytes) for i in range(shape.num_layers))


def layer_costs(
    candidates: Sequence[Sequence[PrecisionPair]],
    layout: Layout,
    shape: ModelShape,
    context: int,
    dtype_bits: int = 16,
) -> list[dict[PrecisionPair, float]]:
    """Per layer, the effective bits each candidate pair adds: they sum to `effective_bits`."""
    dtype_bytes = dtype_bits // 8
    dense = dense_bytes(shape, context, dtype_bytes)
    return [
        {
            pair: dtype_bits * layer_bytes(pair, layout, shape, context, i, dtype_bytes) / dense
            for pair in pairs
        }
        for i, pairs in enumerate(candidates)
    ]


BUDGETS = ("effective", "equivalent")


def budget_costs(
    candidates: Sequence[Sequence[PrecisionPair]],
    layout: Layout,
    shape: ModelShape,
    *,
    budget: str = "effective",
    context: int = 4096,
    dtype_bits: int = 16,
) -> list[dict[PrecisionPair, float]]:
    """Per layer, what each candidate adds to the budget: effective bits at `context`
    (`layer_costs`) or the paper's equivalent bits ((k + v) / 2 over the layer count)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}; got {budget!r}")
    if budget == "effective":
        return layer_costs(candidates, layout, shape, context, dtype_bits)
    return [{p: p.equivalent_bits / len(candidates) for p in pairs} for pairs in candidates]


def effective_bits(
    pairs: Sequence[PrecisionPair],
    layout: Layout,
    shape: ModelShape,
    context: int,
    dtype_bits: int = 16,
) -> float:
    """Bits per cached element after `context` tokens: dtype_bits x bytes held / dense bytes."""
    if context <= 0:
        raise ValueError(f"context must be positive; got {context}")
    dtype_bytes = dtype_bits // 8
    held = cache_bytes(pairs, layout, shape, context, dtype_bytes)
    return dtype_bits * held / dense_bytes(shape, context, dtype_bytes)


def _check(pairs: Sequence[PrecisionPair], shape: ModelShape) -> None:
    if len(pairs) != shape.num_layers:
        raise ValueError(f"{len(pairs)} pairs for a model of {shape.num_layers} layers")


# -- engine storage (kvtuner.targets.Choice: an engine's K and V formats for one layer) --------


def token_shares(windows: Sequence[int | None], context: int) -> list[float]:
    """Each layer's share of the cached tokens at `context` (sliding layers hold `window - 1`)."""
    tokens = [context if w is None else min(context, w - 1) for w in windows]
    total = sum(tokens)
    return [t / total for t in tokens]


def engine_layer_costs(
    candidates: Sequence[Any], head_dim: int, windows: Sequence[int | None], context: int
) -> list[dict[Any, float]]:
    """Per layer, the effective bits each candidate adds: they sum to `effective_bits`."""
    return [{c: w * c.bits(head_dim) for c in candidates} for w in token_shares(windows, context)]


def engine_effective_bits(
    choices: Sequence[Any], head_dim: int, windows: Sequence[int | None], context: int
) -> float:
    """Bits per cached element of an engine holding `choices` after `context` tokens."""
    if len(choices) != len(windows):
        raise ValueError(f"{len(choices)} choices for a model of {len(windows)} layers")
    weights = token_shares(windows, context)
    return sum(w * c.bits(head_dim) for w, c in zip(weights, choices))
