"""Min/max quantization of KV tensors into packed codes, a scale and a zero point per group.

Two groupings of a `[..., seq, head_dim]` tensor:
- per token: groups of `group_size` channels along head_dim (default: one group per head);
- per channel (KIVI keys): groups of `group_size` tokens along seq, one scale per channel per block.

Asymmetric:  x ≈ code * scale + zero, code in [0, 2**bits - 1], zero = group min.
Symmetric:   x ≈ (code - 2**(bits-1)) * scale, scale = absmax / (2**(bits-1) - 1), no zero stored.
Scales and zeros are stored in the tensor's dtype; codes are rounded against the stored values,
so dequantization is within half a step of the input for every finite element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtuner.quant.packing import pack, packed_size, unpack, unpack_planes


@dataclass
class QuantizedTensor:
    """Packed codes of a `[..., seq, head_dim]` tensor plus its group scales and zeros.

    packed: uint8 `[..., seq, ceil(head_dim * bits / 8)]`
    scale, zero: per token `[..., seq, head_dim / group]`; per channel `[..., seq / group, head_dim]`
    (zero is None when symmetric).
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    head_dim: int
    group_size: int
    per_channel: bool

    @property
    def seq_len(self) -> int:
        return self.packed.shape[-2]

    def nbytes(self) -> int:
        """Bytes really held: codes + scales + zeros."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.scale, self.zero) if t is not None]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Back to `[..., seq, head_dim]` in `dtype` (default: the scale's dtype)."""
        return dequantize(self, dtype)


def _qmax(bits: int) -> int:
    return (1 << bits) - 1


def _quantize_groups(
    x: torch.Tensor,
    dim: int,
    bits: int,
    symmetric: bool,
    dtype: torch.dtype,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float codes of float32 `x` with scale and zero over `dim` (kept), stored in `dtype`.

    Few kernels and no host synchronisation on purpose: the cache quantizes one token per layer
    per decode step, where the number of ops, not their size, is the cost. Non-finite inputs
    propagate as in a dense cache: a group holding NaN or inf gets a non-finite scale or zero, so
    it dequantizes to non-finite values and attention over it is non-finite, as it would be over
    the exact values. `valid` (bool, broadcastable to `x`) leaves elements out of the min and max
    (padding); a group with no valid element gets the range [0, 0].
    """
    if valid is None:
        lo, hi = torch.aminmax(x, dim=dim, keepdim=True)
    else:
        lo = torch.where(valid, x, torch.inf).amin(dim, keepdim=True)
        hi = torch.where(valid, x, -torch.inf).amax(dim, keepdim=True)
        empty = lo > hi
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    span = hi - lo
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / ((1 << (bits - 1)) - 1)).to(dtype)
        zero = None
    else:
        scale, zero = (span / _qmax(bits)).to(dtype), lo.to(dtype)
    # codes are rounded against the stored scale/zero; a zero scale means a constant group
    # (x - zero is 0 there), so dividing by the smallest normal number is exact
    safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny)
    if zero is None:
        codes = (x / safe).round_().add_(1 << (bits - 1))
    else:
        codes = (x - zero.float()).div_(safe).round_()
    # NaN codes (only in non-finite groups, whose scale or zero already carries it) become 0
    return codes.nan_to_num_(nan=0.0).clamp_(0, _qmax(bits)), scale, zero


@torch.no_grad()  # codes have no gradient; this also keeps the range check off the autograd graph
def quantize_per_token(
    x: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False
) -> QuantizedTensor:
    """Quantize `[..., seq, head_dim]` with one scale/zero per token per `group_size` channels."""
    head_dim = x.shape[-1]
    group = group_size or head_dim
    if head_dim % group:
        raise ValueError(f"group_size {group} must divide head_dim {head_dim}")
    x32 = x.float().reshape(*x.shape[:-1], head_dim // group, group)
    codes, scale, zero = _quantize_groups(x32, -1, bits, symmetric, x.dtype)
    codes = codes.reshape(x.shape)
    return QuantizedTensor(
        packed=pack(codes, bits),
        scale=scale.squeeze(-1),
        zero=None if zero is None else zero.squeeze(-1),
        bits=bits,
        head_dim=head_dim,
        group_size=group,
        per_channel=False,
    )


@torch.no_grad()
def quantize_per_channel(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    valid: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize `[..., seq, head_dim]` with one scale/zero per channel per block of `group_size` tokens.

    `seq` must be a multiple of `group_size` (the cache quantizes whole blocks only). `valid`, bool
    `[..., seq, 1]` (broadcastable), marks the tokens that count for a block's min and max (the
    cache leaves left-padding out).
    """
    seq, head_dim = x.shape[-2], x.shape[-1]
    if seq % group_size:
        raise ValueError(f"seq {seq} must be a multiple of group_size {group_size}")
    x32 = x.float().reshape(*x.shape[:-2], seq // group_size, group_size, head_dim)
    if valid is not None:
        valid = valid.reshape(*valid.shape[:-2], seq // group_size, group_size, valid.shape[-1])
    codes, scale, zero = _quantize_groups(x32, -2, bits, symmetric, x.dtype, valid)
    codes = codes.reshape(x.shape)
    return QuantizedTensor(
        packed=pack(codes, bits),
        scale=scale.squeeze(-2),
        zero=None if zero is None else zero.squeeze(-2),
        bits=bits,
        head_dim=head_dim,
        group_size=group_size,
        per_channel=True,
    )


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """QuantizedTensor -> `[..., seq, head_dim]` in `dtype` (default: the scale's dtype)."""
    return dequantize_parts(
        q.packed, q.scale, q.zero, q.bits, q.head_dim, q.group_size, q.per_channel, dtype
    )


@torch.no_grad()  # quantization is not differentiable; in-place writes refuse autograd inputs
def dequantize_parts(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    head_dim: int,
    group_size: int,
    per_channel: bool,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize from raw parts (see QuantizedTensor for the shapes) -> `[..., seq, head_dim]`.

    `out`, when given, is written in place and returned (a `[..., seq, head_dim]` view, e.g. a
    slice of a larger buffer along seq, so a caller can put other rows around it without a copy).

    This is the decode hot path, three kinds of pass, each a vectorized kernel on one dtype:
    every code plane of the packed bytes (see `packing`) is unpacked and converted straight into
    its contiguous slice of a preallocated output, then the whole output is scaled and shifted in
    place by group (`code * scale + zero`). No float copy of the codes, no interleaving, no
    mixed-dtype arithmetic (which PyTorch runs element by element on CPU).
    """
    dtype = out.dtype if out is not None else dtype or scale.dtype
    scale = scale.to(dtype)
    if zero is None:  # symmetric: x = (code - 2**(bits-1)) * scale
        zero = scale * -float(1 << (bits - 1))
    else:
        zero = zero.to(dtype)
    seq, width = packed.shape[-2], packed.shape[-1]
    if out is None:
        out = torch.empty((*packed.shape[:-1], head_dim), dtype=dtype, device=packed.device)
    for index, plane in enumerate(unpack_planes(packed, bits)):
        lo = index * width
        hi = min(lo + width, head_dim)
        if lo >= hi:
            break  # a plane of padding codes only
        out[..., lo:hi].copy_(plane[..., : hi - lo])
    if per_channel:
        grouped = out.view(*out.shape[:-2], seq // group_size, group_size, head_dim)
        s, z = scale.unsqueeze(-2), zero.unsqueeze(-2)  # [..., blocks, 1, head_dim]
    else:
        grouped = out.view(*out.shape[:-1], head_dim // group_size, group_size)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)  # [..., seq, groups, 1]
    grouped.mul_(s).add_(z)
    return out


def dequantize_reference(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    head_dim: int,
    group_size: int,
    per_channel: bool,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain path: unpack every code to float, then scale and shift by group.

    Same numbers as `dequantize_parts`, which the cache uses; kept for tests and as the spec.
    """
    if out is not None:
        args = (packed, scale, zero, bits, head_dim, group_size, per_channel, out.dtype)
        return out.copy_(dequantize_reference(*args))
    dtype = dtype or scale.dtype
    codes = unpack(packed, bits, head_dim).to(dtype)
    if zero is None:
        codes = codes - (1 << (bits - 1))
    seq = packed.shape[-2]
    if per_channel:
        grouped = codes.reshape(*codes.shape[:-2], seq // group_size, group_size, head_dim)
        s, z = scale.to(dtype).unsqueeze(-2), None if zero is None else zero.to(dtype).unsqueeze(-2)
    else:
        grouped = codes.reshape(*codes.shape[:-1], head_dim // group_size, group_size)
        s, z = scale.to(dtype).unsqueeze(-1), None if zero is None else zero.to(dtype).unsqueeze(-1)
    out = grouped * s if z is None else grouped * s + z
    return out.reshape(*packed.shape[:-1], head_dim)


def fake_quantize(
    x: torch.Tensor,
    bits: int,
    *,
    per_channel: bool = False,
    group_size: int | None = None,
    symmetric: bool = False,
) -> torch.Tensor:
    """Quantize then dequantize `[..., seq, head_dim]`; 16 bits returns `x` unchanged.

    per_channel groups run along seq in blocks of `group_size` tokens (default 32); a partial last
    block gets its own statistics. Per-token groups run along head_dim.
    """
    if bits == 16:
        return x
    if not per_channel:
        return quantize_per_token(x, bits, group_size, symmetric).dequantize(x.dtype)
    block = group_size or 32
    seq = x.shape[-2]
    full = seq // block * block
    parts = []
    if full:
        parts.append(
            quantize_per_channel(x[..., :full, :], bits, block, symmetric).dequantize(x.dtype)
        )
    if full < seq:
        rest = x[..., full:, :]
        parts.append(quantize_per_channel(rest, bits, seq - full, symmetric).dequantize(x.dtype))
    return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]


__all__ = [
    "QuantizedTensor",
    "dequantize",
    "dequantize_parts",
    "fake_quantize",
    "packed_size",
    "quantize_per_channel",
    "quantize_per_token",
]
