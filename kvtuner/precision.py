"""Precision pairs (key bits, value bits) and the bit accounting of a layer-wise config.

Equivalent bits is the paper's figure: mean over layers of (k + v) / 2.
Effective bits also counts scales, zero points and the full-precision residual.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8, 16)
QUANTIZED_BITS: tuple[int, ...] = (2, 4, 8)
FULL_PRECISION = 16
SCHEMES: tuple[str, ...] = ("per-token", "kivi")


@dataclass(frozen=True, order=True)
class PrecisionPair:
    """Bits for the keys and the values of one layer; 16 means left unquantized."""

    key_bits: int
    value_bits: int

    def __post_init__(self) -> None:
        for field, bits in (("key_bits", self.key_bits), ("value_bits", self.value_bits)):
            if bits not in SUPPORTED_BITS:
                raise ValueError(f"{field} must be one of 2, 4, 8, 16; got {bits}")

    @property
    def equivalent_bits(self) -> float:
        return (self.key_bits + self.value_bits) / 2

    @property
    def name(self) -> str:
        """`KV8` when both are equal, `K8V4` otherwise, `fp16` for full precision."""
        if self.key_bits == self.value_bits == FULL_PRECISION:
            return "fp16"
        if self.key_bits == self.value_bits:
            return f"KV{self.key_bits}"
        return f"K{self.key_bits}V{self.value_bits}"

    def __str__(self) -> str:
        return self.name


_SPEC = re.compile(r"^(?:KV(?P<both>\d+)|K(?P<k>\d+)V(?P<v>\d+))$", re.IGNORECASE)


def parse_pair(spec: str) -> PrecisionPair | None:
    """`fp16`/`bf16`/`KV8`/`K8V4` -> PrecisionPair; None when `spec` is not such a name.

    Raises ValueError when the name has the right shape but unsupported bits (`KV3`).
    """
    text = spec.strip()
    if text.lower() in {"fp16", "bf16", "fp32", "none", "dense"}:
        return PrecisionPair(FULL_PRECISION, FULL_PRECISION)
    match = _SPEC.match(text)
    if match is None:
        return None
    if match["both"] is not None:
        return PrecisionPair(int(match["both"]), int(match["both"]))
    return PrecisionPair(int(match["k"]), int(match["v"]))


def candidate_pairs(bits: Iterable[int] = QUANTIZED_BITS) -> tuple[PrecisionPair, ...]:
    """All (k, v) pairs over `bits`, ordered from most to fewest bits: {2,4,8}^2 gives 9."""
    values = sorted(set(bits), reverse=True)
    pairs = [PrecisionPair(k, v) for k, v in itertools.product(values, values)]
    return tuple(sorted(pairs, key=lambda p: (-p.equivalent_bits, -p.key_bits)))


def equivalent_bits(pairs: Sequence[PrecisionPair]) -> float:
    """Mean over layers of (k + v) / 2."""
    if not pairs:
        raise ValueError("a config needs at least one layer")
    return sum(p.equivalent_bits for p in pairs) / len(pairs)


def quantized_token_count(
    scheme: str, context: int, group_size: int | None, residual_length: int
) -> int:
    """How many of `context` tokens sit in packed storage (the rest is the fp residual).

    `per-token` quantizes every token; `kivi` flushes whole blocks of `group_size` tokens once
    more than `residual_length` tokens wait, so between R and R + G - 1 stay in full precision.
    """
    if scheme != "kivi":
        return context
    block = group_size or 32
    return max(context - residual_length, 0) // block * block


def effective_bits(
    pairs: Sequence[PrecisionPair],
    *,
    scheme: str,
    head_dim: int,
    group_size: int | None,
    residual_length: int,
    context: int,
    dtype_bits: int = 16,
) -> float:
    """Mean bits per KV element over layers, with scales, zeros and residual at `context` tokens.

    Scales and zero points cost `dtype_bits` each per group; residual tokens cost `dtype_bits`.
    Per-token groups run along head_dim (`group_size`, default head_dim); KIVI keys are grouped
    along tokens (`group_size` tokens per channel).
    """
    if context <= 0:
        raise ValueError("context must be positive")
    quantized = quantized_token_count(scheme, context, group_size, residual_length)
    residual = context - quantized
    channel_group = min(group_size or head_dim, head_dim)
    groups_per_token = -(-head_dim // channel_group)
    per_token_overhead = 2 * dtype_bits * groups_per_token / head_dim
    per_channel_overhead = 2 * dtype_bits / (group_size or 32)

    def cost(bits: int, per_channel: bool) -> float:
        if bits == FULL_PRECISION:
            return float(dtype_bits)
        overhead = per_channel_overhead if per_channel else per_token_overhead
        return (quantized * (bits + overhead) + residual * dtype_bits) / context

    total = 0.0
    for pair in pairs:
        total += cost(pair.key_bits, scheme == "kivi") + cost(pair.value_bits, False)
    return total / (2 * len(pairs))
