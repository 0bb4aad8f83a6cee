"""Bit packing of integer codes into uint8 along the last axis.

Layout, for codes c0, c1, c2, c3 ... along the last axis (little end first):

    4 bits:  byte i = c[2i]   | c[2i+1] << 4
    2 bits:  byte i = c[4i]   | c[4i+1] << 2 | c[4i+2] << 4 | c[4i+3] << 6
    8 bits:  byte i = c[i]

A last axis whose length is not a multiple of the codes per byte is padded with zero codes,
so a row of n codes takes ceil(n * bits / 8) bytes. Packing along the last axis (head_dim) means
appending tokens is a plain concatenation of packed rows.
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


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes `[..., n]` (each < 2**bits) -> packed uint8 `[..., ceil(n * bits / 8)]`."""
    per = codes_per_byte(bits)
    codes = codes.to(torch.uint8)
    if per == 1:
        return codes.contiguous()
    n = codes.shape[-1]
    pad = (-n) % per
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.reshape(*codes.shape[:-1], -1, per)
    shifted = grouped << _shifts(bits, codes.device)
    # the shifted codes occupy disjoint bits, so a sum is a bitwise or
    return shifted.sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """packed uint8 `[..., m]` -> uint8 codes `[..., n]` (inverse of `pack`)."""
    per = codes_per_byte(bits)
    if per == 1:
        return packed[..., :n]
    mask = (1 << bits) - 1
    # one shift per code position, unrolled in Python so a compiled kernel sees constants
    parts = [(packed >> shift) & mask for shift in range(0, 8, bits)]
    codes = torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)
    return codes[..., :n] if codes.shape[-1] != n else codes
