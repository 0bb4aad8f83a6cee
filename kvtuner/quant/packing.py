"""Bit packing of integer codes into uint8 along the last axis, in planes.

A row of n codes is cut into `8 // bits` planes of m = ceil(n * bits / 8) consecutive codes;
byte i holds code i of every plane (plane 0 in the low bits):

    4 bits:  byte i = c[i]   | c[m + i] << 4
    2 bits:  byte i = c[i]   | c[m + i] << 2 | c[2m + i] << 4 | c[3m + i] << 6
    8 bits:  byte i = c[i]

Planes (rather than neighbouring codes in one byte) make unpacking a few contiguous passes,
`(byte >> shift) & mask` per plane, each writing one contiguous slice of the row: no interleaving.
A row whose length is not a multiple of the codes per byte is padded with zero codes. Packing
along the last axis (head_dim) means appending tokens is a plain concatenation of packed rows.
"""

from __future__ import annotations

import torch

PACKABLE_BITS = (2, 4, 8)


def codes_per_byte(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}; got {bits}")
    return 8 // bits


def packed_size(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take."""
    per = codes_per_byte(bits)
    return -(-n // per)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes `[..., n]` (each < 2**bits; uint8 or float) -> packed uint8 `[..., ceil(n * bits / 8)]`."""
    per = codes_per_byte(bits)
    if per == 1:
        return codes.to(torch.uint8).contiguous()
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    planes = codes.reshape(*codes.shape[:-1], per, -1)
    # byte = sum of plane p << (p * bits); the sum never exceeds 255, so it is exact in uint8 too
    packed = torch.add(planes[..., 0, :], planes[..., 1, :], alpha=1 << bits)
    for plane in range(2, per):
        packed.add_(planes[..., plane, :], alpha=1 << (plane * bits))
    return packed.to(torch.uint8)


def unpack_planes(packed: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """The code planes of packed uint8 `[..., m]`: `8 // bits` tensors `[..., m]`, in row order."""
    per = codes_per_byte(bits)
    if per == 1:
        return [packed]
    mask = (1 << bits) - 1
    planes = [packed & mask]
    planes += [(packed >> (plane * bits)) & mask for plane in range(1, per - 1)]
    planes.append(packed >> ((per - 1) * bits))  # the top plane needs no mask
    return planes


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packed uint8 `[..., m]` -> uint8 codes `[..., n]` (inverse of `pack`)."""
    if codes_per_byte(bits) == 1:
        return packed[..., :n]
    codes = torch.cat(unpack_planes(packed, bits), dim=-1)
    return codes[..., :n] if codes.shape[-1] != n else codes
