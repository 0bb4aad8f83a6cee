"""LMDeploy's `quant_policy` 4 and 8: asymmetric per (token, KV head) over the whole head_dim.

    scale = (max - min) / (2^n - 1)      zero = -min / scale (not rounded)
    code  = (int)(x / scale + zero + 0.5)                (truncated, saturating to [0, 2^n - 1])
    x_hat = code * scale - scale * zero                  (the read kernel's order)
Scale and zero are stored in the model dtype. int4 works in float32 and packs value d with value
d + D/2 (low nibble d); int8 does its arithmetic in the model dtype itself (no upcast), so for
bf16 / fp16 inputs every step rounds to that dtype. Source: lmdeploy/pytorch/kernels/cuda/
fill_kv_cache.py `_quant_int8` / `_quant_int4` (write) and flatten_kv_cache.py (read).
A constant row (max == min) divides by zero in the engine (scale 0, zero -min/0) and reads back as
NaN there; here too, so an evaluation shows it instead of hiding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kvtuner.formats.base import Encoded, require_head_dim


def _in(dtype: torch.dtype):
    """Round a float32 result to `dtype` and back: one op done in that dtype."""
    return lambda t: t.to(dtype).float()


@dataclass(frozen=True)
class LmdeployPolicy:
    """quant_policy 4 (int4) or 8 (int8) of LMDeploy's PyTorch engine."""

    name: str
    engine_value: int
    bits: Literal[4, 8]

    def quantize(self, x: torch.Tensor) -> Encoded:
        """`[..., seq, head_dim]` -> codes uint8 `[..., seq, head_dim]` (int8) or
        `[..., seq, head_dim / 2]` (int4), scale and zero `[..., seq]` in x's dtype."""
        require_head_dim(self, x)
        levels = (1 << self.bits) - 1
        r = _in(torch.float32 if self.bits == 4 else x.dtype)
        v = x.float()
        lo, hi = v.amin(-1), v.amax(-1)
        scale = r(r(hi - lo) / levels)
        zero = r(-lo / scale)
        q = r(r(r(v / scale[..., None]) + zero[..., None]) + 0.5)
        codes = torch.nan_to_num(q, nan=0.0).trunc().clamp(0, levels).to(torch.uint8)
        if self.bits == 4:
            half = x.shape[-1] // 2
            codes = codes[..., :half] | (codes[..., half:] << 4)
        data = {"codes": codes, "scale": scale.to(x.dtype), "zero": zero.to(x.dtype)}
        return Encoded(data, tuple(x.shape), x.dtype)

    def dequantize(self, enc: Encoded) -> torch.Tensor:
        """Back to `[..., seq, head_dim]` in the input's dtype."""
        codes = enc.data["codes"]
        if self.bits == 4:
            codes = torch.cat([codes & 0xF, codes >> 4], dim=-1)
        r = _in(enc.dtype)
        scale = enc.data["scale"].float()[..., None]
        zero = enc.data["zero"].float()[..., None]
        return r(r(codes.float() * scale) - r(scale * zero)).to(enc.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        """Codes plus a 16-bit scale and zero per (token, head), for an fp16 / bf16 model."""
        return self.bits + 2 * 16 / head_dim

    def check_head_dim(self, head_dim: int) -> str | None:
        if self.bits == 4 and head_dim % 2:
            return f"{self.name} packs value d with value d + head_dim/2: head_dim must be even; this model has {head_dim}"
        return None


INT4 = LmdeployPolicy("lmdeploy:int4", 4, 4)
INT8 = LmdeployPolicy("lmdeploy:int8", 8, 8)
