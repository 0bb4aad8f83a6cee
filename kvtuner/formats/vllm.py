"""vLLM's `--kv-cache-dtype` formats, as its cache write kernels store K/V and attention reads them.

- fp8_e4m3: one scale per tensor (k_scale / v_scale from the checkpoint, 1.0 when absent);
  code = e4m3_satfinite(x / scale), x_hat = code * scale
  [csrc/quantization/fp8/nvidia/quant_utils.cuh `scaled_vec_conversion<uint8_t, float>`].
- int8_per_token_head / fp8_per_token_head (#38378): one fp32 scale per (token, KV head),
  scale = max(absmax / QMAX, 1e-6), code = clamp(x * (1 / scale), QMIN, QMAX) stored as the cache
  dtype: int8 truncates (a Triton float->int8 store), fp8 rounds to nearest even
  [vllm/v1/attention/ops/triton_reshape_and_cache_flash.py `_reshape_cache_per_token_head`].
- int4_per_token_head (#40835): rotate (random signs, unnormalised Hadamard, back to the model
  dtype), then asymmetric min/max per (token, head) with the zero point hidden in the scale's low
  mantissa bits; the read side rotates back [vllm/v1/attention/ops/int4_per_token_head.py].
- nvfp4 (#40177): see kvtuner.formats.nvfp4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtuner.formats.base import Encoded, max_magnitude, require_head_dim
from kvtuner.formats.floats import E4M3_MAX, pack_nibbles, to_e4m3, unpack_nibbles
from kvtuner.formats.nvfp4 import NVFP4
from kvtuner.formats.rotation import vllm_rht


def calibrate_fp8_scale(x: torch.Tensor) -> float:
    """Per-tensor FP8 scale from calibration data: amax / 448 (1.0, vLLM's default, for zeros)."""
    amax = max_magnitude(x)
    return amax / E4M3_MAX if amax > 0 else 1.0


@dataclass(frozen=True)
class Fp8PerTensor:
    """fp8 / fp8_e4m3 with a per-tensor scale; `scale` None: calibrate on the tensor (amax / 448)."""

    name: str = "vllm:fp8_e4m3"
    engine_value: str = "fp8_e4m3"
    scale: float | None = None

    def quantize(self, x: torch.Tensor) -> Encoded:
        """`[..., seq, head_dim]` -> codes float8_e4m3fn `[..., seq, head_dim]`, meta scale."""
        scale = self.scale if self.scale is not None else calibrate_fp8_scale(x)
        codes = to_e4m3(x.float() / scale)
        return Encoded({"codes": codes}, tuple(x.shape), x.dtype, {"scale": scale})

    def dequantize(self, enc: Encoded) -> torch.Tensor:
        return (enc.data["codes"].float() * enc.meta["scale"]).to(enc.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        return 8.0

    def check_head_dim(self, head_dim: int) -> str | None:
        return None


@dataclass(frozen=True)
class PerTokenHead:
    """int8_per_token_head or fp8_per_token_head: symmetric, one fp32 scale per (token, head)."""

    name: str
    engine_value: str
    qmax: float
    qmin: float
    cache_dtype: torch.dtype

    def quantize(self, x: torch.Tensor) -> Encoded:
        """`[..., seq, head_dim]` -> codes int8 / float8_e4m3fn `[..., seq, head_dim]`,
        scale float32 `[..., seq]`."""
        xf = x.float()
        scale = (xf.abs().amax(-1) / self.qmax).clamp_min(1e-6)
        scaled = (xf * (1.0 / scale)[..., None]).clamp(self.qmin, self.qmax)
        if self.cache_dtype == torch.int8:
            codes = scaled.trunc().to(torch.int8)  # a Triton float->int store truncates
        else:
            codes = scaled.to(self.cache_dtype)  # round to nearest even
        return Encoded({"codes": codes, "scale": scale}, tuple(x.shape), x.dtype)

    def dequantize(self, enc: Encoded) -> torch.Tensor:
        return (enc.data["codes"].float() * enc.data["scale"][..., None]).to(enc.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        return 8 + 32 / head_dim

    def check_head_dim(self, head_dim: int) -> str | None:
        return None


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """The kernel's `(v + 0.5).to(int32)` / `(v - 0.5).to(int32)`: float32 add, then truncate."""
    return torch.where(v >= 0, (v + 0.5).trunc(), (v - 0.5).trunc())


@dataclass(frozen=True)
class Int4PerTokenHead:
    """int4_per_token_head: rotated, asymmetric 4-bit codes, one packed fp32 scale per (token, head).

    scale = max((max - min) / 15, 1e-6); zero = round_half_away(-min / scale) in [0, 15];
    code = clamp(round_half_away(x * (1 / scale) + zero), 0, 15); two codes a byte, element 2i in
    the low nibble; the stored scale is (bits(scale) & -16) | zero; x_hat = (code - zero) * scale.
    """

    name: str = "vllm:int4_per_token_head"
    engine_value: str = "int4_per_token_head"

    def quantize(self, x: torch.Tensor) -> Encoded:
        """`[..., seq, head_dim]` -> codes uint8 `[..., seq, head_dim / 2]` (rotated basis),
        scale float32 `[..., seq]` with the zero point in its 4 low mantissa bits."""
        require_head_dim(self, x)
        xr = vllm_rht(x).to(x.dtype).float()  # rotated, then cast back to the model dtype
        lo, hi = xr.amin(-1), xr.amax(-1)
        scale = ((hi - lo) / 15.0).clamp_min(1e-6)
        zero = _round_half_away(-lo / scale).clamp(0, 15)
        codes = _round_half_away(xr * (1.0 / scale)[..., None] + zero[..., None]).clamp(0, 15)
        bits = (scale.view(torch.int32) & -16) | zero.to(torch.int32)
        return Encoded(
            {"codes": pack_nibbles(codes.to(torch.uint8)), "scale": bits.view(torch.float32)},
            tuple(x.shape),
            x.dtype,
        )

    def dequantize(self, enc: Encoded) -> torch.Tensor:
        """Back to `[..., seq, head_dim]` in the original (unrotated) basis and the input's dtype."""
        bits = enc.data["scale"].view(torch.int32)
        zero = (bits & 0xF).float()
        scale = (bits & -16).view(torch.float32)
        codes = unpack_nibbles(enc.data["codes"]).float()
        y = (codes - zero[..., None]) * scale[..., None]
        return (vllm_rht(y, inverse=True) / enc.shape[-1]).to(enc.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        return 4 + 32 / head_dim

    def check_head_dim(self, head_dim: int) -> str | None:
        if head_dim & (head_dim - 1):
            return f"{self.name} rotates each head with a Hadamard transform: head_dim must be a power of two; this model has {head_dim}"
        return None


FP8_E4M3 = Fp8PerTensor()
INT8_PER_TOKEN_HEAD = PerTokenHead(
    "vllm:int8_per_token_head", "int8_per_token_head", 127.0, -128.0, torch.int8
)
FP8_PER_TOKEN_HEAD = PerTokenHead(
    "vllm:fp8_per_token_head", "fp8_per_token_head", E4M3_MAX, -E4M3_MAX, torch.float8_e4m3fn
)
INT4_PER_TOKEN_HEAD = Int4PerTokenHead()
NVFP4_KV = NVFP4(name="vllm:nvfp4", engine_value="nvfp4")
