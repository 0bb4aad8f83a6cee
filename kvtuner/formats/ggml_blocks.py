"""ggml's 32-value block quantizers, byte for byte as `quantize_row_<type>_ref` writes them.

Every block: an fp16 scale d (little endian), then per type (ggml/src/ggml-quants.c):
    q8_0   d = amax / 127            q = roundf(x / d)                 int8 q         34 bytes
    q4_0   d = max / -8 (signed)     q = min(15, (int)(x / d + 8.5))   nibbles        18 bytes
    q4_1   d = (max - min) / 15, m   q = (int)((x - min) / d + 0.5)    m, nibbles     20 bytes
    q5_0   d = max / -16             q = min(31, (int)(x / d + 16.5))  qh, nibbles    22 bytes
    q5_1   d = (max - min) / 31, m   q = (int)((x - min) / d + 0.5)    m, qh, nibbles 24 bytes
    iq4_nl d searched (see iq4_nl)   q = nearest of 16 fixed levels    nibbles        18 bytes
Nibble byte j holds value j (low) and value j + 16 (high); qh bit j is bit 4 of value j. Codes are
computed with the float32 d, the block stores fp16(d); "/ d" is a multiply by 1 / d (0 when d = 0).
"""

from __future__ import annotations

import torch

from kvtuner.formats.base import round_half_away

QK = 32
TYPE_SIZE = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "iq4_nl": 18}
IQ4_NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 `[n]` -> uint8 `[n, 2]`, fp16 round to nearest even, little endian."""
    return v.to(torch.float16).view(torch.uint8).reshape(-1, 2)


def _fp16_from(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).reshape(-1).float()


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _signed_max(blocks: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block, the first one on ties: `[n, 32]` -> `[n, 1]`."""
    return blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[n, 32]` -> `[n, 16]`: low nibble value j, high nibble value j + 16."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _unnibble(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """Bit 4 of 32 codes `[n, 32]` as a little-endian uint32, `[n, 4]` bytes."""
    bit = ((q >> 4) & 1).to(torch.int64)
    word = (bit << torch.arange(QK, device=q.device)).sum(-1)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(4)], -1).to(torch.uint8)


def _unhigh_bits(qh: torch.Tensor) -> torch.Tensor:
    word = sum(qh[:, i].to(torch.int64) << (8 * i) for i in range(4))
    return ((word[:, None] >> torch.arange(QK, device=qh.device)) & 1).to(torch.uint8)


def quantize_blocks(kind: str, blocks: torch.Tensor) -> torch.Tensor:
    """float32 blocks `[n, 32]` -> ggml block bytes uint8 `[n, TYPE_SIZE[kind]]`."""
    if kind == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        q = round_half_away(blocks * _inverse(d)).to(torch.int8).view(torch.uint8)
        return torch.cat([_fp16_bytes(d), q], -1)
    if kind in ("q4_0", "q5_0"):
        half = 8 if kind == "q4_0" else 16
        d = _signed_max(blocks) / -half
        q = (blocks * _inverse(d) + (half + 0.5)).trunc().clamp(0, 2 * half - 1).to(torch.uint8)
        parts = [_fp16_bytes(d)] + ([_high_bits(q)] if kind == "q5_0" else []) + [nibbles(q)]
        return torch.cat(parts, -1)
    if kind in ("q4_1", "q5_1"):
        levels = 15 if kind == "q4_1" else 31
        lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
        d = (hi - lo) / levels
        q = ((blocks - lo) * _inverse(d) + 0.5).trunc().clamp(0, levels).to(torch.uint8)
        parts = [_fp16_bytes(d), _fp16_bytes(lo)]
        parts += ([_high_bits(q)] if kind == "q5_1" else []) + [nibbles(q)]
        return torch.cat(parts, -1)
    if kind == "iq4_nl":
        from kvtuner.formats.iq4_nl import quantize_iq4_nl

        d, q = quantize_iq4_nl(blocks)
        return torch.cat([_fp16_bytes(d), nibbles(q)], -1)
    raise ValueError(f"unknown ggml type {kind!r}; known: {', '.join(TYPE_SIZE)}")


def dequantize_blocks(kind: str, raw: torch.Tensor) -> torch.Tensor:
    """ggml block bytes uint8 `[n, TYPE_SIZE[kind]]` -> float32 `[n, 32]` (`dequantize_row_*`)."""
    d = _fp16_from(raw[:, :2])[:, None]
    if kind == "q8_0":
        return d * raw[:, 2:].contiguous().view(torch.int8).float()
    if kind == "q4_0":
        return d * (_unnibble(raw[:, 2:]).float() - 8)
    if kind == "q4_1":
        return d * _unnibble(raw[:, 4:]).float() + _fp16_from(raw[:, 2:4])[:, None]
    if kind == "q5_0":
        q = _unnibble(raw[:, 6:]) | (_unhigh_bits(raw[:, 2:6]) << 4)
        return d * (q.float() - 16)
    if kind == "q5_1":
        q = _unnibble(raw[:, 8:]) | (_unhigh_bits(raw[:, 4:8]) << 4)
        return d * q.float() + _fp16_from(raw[:, 2:4])[:, None]
    if kind == "iq4_nl":
        levels = torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32, device=raw.device)
        return d * levels[_unnibble(raw[:, 2:]).long()]
    raise ValueError(f"unknown ggml type {kind!r}; known: {', '.join(TYPE_SIZE)}")
