"""What every engine-native KV format offers, and what its quantize step returns.

A format quantizes the keys (or values) of one layer, a tensor `[..., seq, head_dim]`, the way a
serving engine writes them into its cache, and dequantizes them the way its attention reads them.
`fake_quantize` is the round trip: the error a layer sees when that engine stores its KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Encoded:
    """The parts an engine stores for one tensor `[..., seq, head_dim]`.

    data: what the cache pages hold (codes, per-token or per-block scales), counted by `nbytes`.
    meta: per-tensor numbers the engine keeps outside the pages (a checkpoint's k_scale).
    shape, dtype: the input's shape and dtype (the model dtype that dequantize returns).
    """

    data: dict[str, torch.Tensor]
    shape: tuple[int, ...]
    dtype: torch.dtype
    meta: dict[str, float] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes the cache pages really hold for this tensor."""
        return sum(t.numel() * t.element_size() for t in self.data.values())


@runtime_checkable
class KVFormat(Protocol):
    """One engine's KV storage format: a name, the math both ways, and its storage cost."""

    name: str

    def quantize(self, x: torch.Tensor) -> Encoded: ...

    def dequantize(self, enc: Encoded) -> torch.Tensor: ...

    def bits_per_element(self, head_dim: int) -> float: ...

    def check_head_dim(self, head_dim: int) -> str | None: ...


def fake_quantize(fmt: KVFormat, x: torch.Tensor) -> torch.Tensor:
    """`x` `[..., seq, head_dim]` after the engine stored and read it back (same shape and dtype)."""
    return fmt.dequantize(fmt.quantize(x))


def nbytes(fmt: KVFormat, shape: tuple[int, ...]) -> int:
    """Bytes the cache pages hold for a tensor of `shape` `[..., seq, head_dim]`."""
    numel = 1
    for n in shape:
        numel *= n
    # exact: 8 + 32 / 80 is not a binary fraction, but the byte count is an integer
    bits = Fraction(fmt.bits_per_element(shape[-1])).limit_denominator(1 << 16) * numel
    if bits.denominator != 1 or bits.numerator % 8:
        raise ValueError(f"{fmt.name}: {shape} does not fill whole bytes")
    return bits.numerator // 8


def require_head_dim(fmt: KVFormat, x: torch.Tensor) -> None:
    """Raise ValueError with the format's rule when `x`'s head_dim breaks it."""
    problem = fmt.check_head_dim(x.shape[-1])
    if problem is not None:
        raise ValueError(problem)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero, like C `roundf` (exact for every float32).

    Written as numpy's `np_roundf` in gguf: floor(|x|) + floor(2 * frac), so 0.49999997 stays 0
    where floor(|x| + 0.5) would round up.
    """
    a = x.abs()
    whole = a.floor()
    return torch.sign(x) * (whole + (2 * (a - whole)).floor())


def max_magnitude(x: torch.Tensor) -> float:
    """Largest magnitude of `x` (0.0 when empty): what max calibration scales by."""
    return float(x.detach().float().abs().max()) if x.numel() else 0.0
