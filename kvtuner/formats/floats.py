"""Small float formats the engines store: FP8 E4M3 (saturating) and FP4 E2M1 (NVFP4 values).

E2M1 nibble: bit 3 the sign, bits 0-2 the magnitude index into 0, 0.5, 1, 1.5, 2, 3, 4, 6.
Rounding is to nearest, ties to the even code (PTX `cvt.rn.satfinite.e2m1x2.f32`), saturating at 6.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# midpoints between neighbouring magnitudes; a tie goes to the even code, so it rounds down
# at the midpoints below an odd code (0.25, 1.25, 2.5, 5.0) and up at the others
_E2M1_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_E2M1_TIE_UP = (0.75, 1.75, 3.5)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """float -> float8_e4m3fn, round to nearest even, saturating at +-448 (`__NV_SATFINITE`).

    torch's own cast turns anything at or above 464 into NaN, hence the clamp first.
    """
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """float `[...]` -> uint8 E2M1 nibbles `[...]` (values 0..15), RNE, saturating at +-6."""
    a = x.float().abs()
    code = torch.zeros_like(a, dtype=torch.uint8)
    for t in _E2M1_TIE_DOWN:
        code += (a > t).to(torch.uint8)
    for t in _E2M1_TIE_UP:
        code += (a >= t).to(torch.uint8)
    # the sign survives rounding to zero, as in an IEEE conversion (-0.1 -> -0)
    sign = torch.signbit(x).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """uint8 E2M1 nibbles `[...]` -> float32 values `[...]`."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=code.device)
    mag = table[(code & 0x7).long()]
    return torch.where((code & 0x8) > 0, -mag, mag)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes `[..., n]` (n even) -> `[..., n / 2]`, element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: `[..., m]` -> `[..., 2m]`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
