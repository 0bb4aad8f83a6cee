"""Precision pairs (key bits, value bits), and the layout a scheme stores them in.

Equivalent bits is the paper's figure: mean over layers of (k + v) / 2. What a cache really holds
(effective bits: scales, zero points, full-precision sinks and residual, sliding windows) is
counted in `kvtuner.memory`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvtuner import defaults

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


@dataclass(frozen=True)
class Layout:
    """How a cache layer holds its tokens, whatever their bits.

    - `scheme`: `per-token` (K and V quantized per token over groups of channels) or `kivi` (K per
      channel over blocks of `block_size` tokens, V per token; the newest `residual_length` tokens
      up to `residual_length + block_size - 1` wait in full precision).
    - `group_size`: channels per scale and zero point of per-token groups (None: one group per
      head; default 64 per-token, 32 KIVI). A size that does not divide head_dim falls to its
      largest divisor below (32 on 80: 20).
    - `sink_tokens`: the first tokens of the sequence, kept in full precision (attention sinks).
    - `smooth`: per-token groups quantize channels divided by a per-channel scale (each channel's
      peak magnitude over the first stored tokens), so one outlier channel does not set the step
      of its whole group; the scale is multiplied back on reading (default on per-token, off KIVI).
    """

    scheme: str = defaults.SCHEME
    group_size: Any = defaults.SCHEME_DEFAULT  # int, or None for one group per head
    block_size: int = defaults.KIVI_BLOCK_SIZE
    residual_length: int = 0
    sink_tokens: int = defaults.SINK_TOKENS
    smooth: Any = defaults.SCHEME_DEFAULT  # bool

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        if self.group_size is defaults.SCHEME_DEFAULT:
            object.__setattr__(self, "group_size", defaults.group_size(self.scheme))
        if self.smooth is defaults.SCHEME_DEFAULT:
            object.__setattr__(self, "smooth", defaults.smooth(self.scheme))
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be positive or null; got {self.group_size}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive; got {self.block_size}")
        if self.residual_length < 0 or self.sink_tokens < 0:
            raise ValueError("residual_length and sink_tokens must be >= 0")
        if self.scheme != "kivi":
            object.__setattr__(self, "residual_length", 0)

    @property
    def kivi(self) -> bool:
        return self.scheme == "kivi"

    def block(self, pair: PrecisionPair) -> int:
        """Tokens a layer at `pair` moves into storage together: KIVI's blocks, else 1 (a layer
        that quantizes nothing has no blocks either)."""
        quantized = pair.key_bits != FULL_PRECISION or pair.value_bits != FULL_PRECISION
        return self.block_size if self.kivi and quantized else 1

    def channel_group(self, head_dim: int) -> int:
        """Channels per scale/zero of per-token groups on heads of `head_dim` channels."""
        return channel_group(self.group_size, head_dim)


def channel_group(group_size: int | None, head_dim: int) -> int:
    """`group_size` channels, at most `head_dim`, lowered to the largest divisor of head_dim
    (None: the whole head). 32 on 64 -> 32; 32 on 80 -> 20; 32 on 16 -> 16."""
    if group_size is None or group_size >= head_dim:
        return head_dim
    return max(d for d in range(1, group_size + 1) if head_dim % d == 0)
