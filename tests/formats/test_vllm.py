"""vLLM's KV formats against their formulas written out plainly, storage sizes, head-size rules."""

import math
import struct

import pytest
import torch

from kvtuner.formats import fake_quantize, get_format, nbytes
from kvtuner.formats.rotation import fwht, hadamard, vllm_rht_signs
from kvtuner.formats.vllm import calibrate_fp8_scale


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean()))


def kv(head_dim: int = 128, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 7, head_dim, generator=g) * scale


# --- fp8_e4m3, one scale per tensor -----------------------------------------------------------


def test_fp8_codes_are_the_saturating_e4m3_of_x_over_scale():
    x = kv(64, seed=1)
    x[0, 0, 0, 0] = 100.0  # 10000 after the scale: far above 448
    fmt = get_format("vllm:fp8_e4m3", scale=0.01)
    enc = fmt.quantize(x)
    ref = (x / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(enc.data["codes"].view(torch.uint8), ref.view(torch.uint8))
    # out of range saturates to the largest finite value, never NaN
    assert enc.data["codes"].float().abs().max().item() == 448.0
    assert torch.equal(fmt.dequantize(enc), ref.float() * 0.01)


def test_fp8_calibrated_scale_maps_amax_to_448():
    x = kv(64, seed=2)
    assert calibrate_fp8_scale(x) == pytest.approx(x.abs().max().item() / 448)
    enc = get_format("vllm:fp8_e4m3").quantize(x)
    assert enc.data["codes"].float().abs().max().item() == 448.0
    assert sqnr_db(x, fake_quantize(get_format("vllm:fp8_e4m3"), x)) > 28


# --- int8 / fp8 per (token, head) ---------------------------------------------------------------


def test_int8_per_token_head_matches_the_kernel_formula():
    x = kv(seed=3)
    x[0, 0, 0] = 0.0  # an all-zero row keeps the 1e-6 floor
    enc = get_format("vllm:int8_per_token_head").quantize(x)
    scale = torch.clamp(x.abs().amax(-1) / 127.0, min=1e-6)
    codes = torch.clamp(x * (1.0 / scale)[..., None], -128, 127).trunc().to(torch.int8)
    assert torch.equal(enc.data["scale"], scale)
    assert torch.equal(enc.data["codes"], codes)
    assert enc.data["scale"][0, 0, 0].item() == pytest.approx(1e-6)


def test_int8_per_token_head_error_is_under_one_step():
    x = kv(seed=4)
    fmt = get_format("vllm:int8_per_token_head")
    enc = fmt.quantize(x)
    err = (fmt.dequantize(enc) - x).abs()
    assert bool((err < enc.data["scale"][..., None] * (1 + 1e-5)).all())  # truncation: < 1 step


def test_fp8_per_token_head_matches_the_kernel_formula():
    x = kv(seed=5)
    enc = get_format("vllm:fp8_per_token_head").quantize(x)
    scale = torch.clamp(x.abs().amax(-1) / 448.0, min=1e-6)
    codes = torch.clamp(x * (1.0 / scale)[..., None], -448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(enc.data["scale"], scale)
    assert torch.equal(enc.data["codes"].view(torch.uint8), codes.view(torch.uint8))
    assert sqnr_db(x, fake_quantize(get_format("vllm:fp8_per_token_head"), x)) > 30


# --- int4_per_token_head -------------------------------------------------------------------------


def test_rht_signs_are_vllms_generator():
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0x9E3779B9)  # _get_rht_signs(d, round_idx=0)
    expected = 2.0 * torch.bernoulli(torch.full((128,), 0.5), generator=gen) - 1.0
    assert torch.equal(vllm_rht_signs(128), expected)


def test_fwht_is_the_unnormalised_sylvester_product():
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(fwht(x), x @ hadamard(64, normalized=False), rtol=0, atol=1e-4)


def round_half_away(v: float) -> int:
    return int(v + 0.5) if v >= 0 else int(v - 0.5)  # C (int) cast truncates


def reference_int4_row(row: torch.Tensor) -> tuple[list[int], float, int]:
    """One (token, head) row, already rotated, as `_reshape_cache_int4_kernel` computes it."""
    f32 = lambda v: struct.unpack("f", struct.pack("f", v))[0]  # noqa: E731
    lo, hi = float(row.min()), float(row.max())
    scale = f32(max(f32(f32(hi - lo) / 15.0), 1e-6))
    zero = min(max(round_half_away(f32(-lo / scale)), 0), 15)
    inv = f32(1.0 / scale)
    codes = [min(max(round_half_away(f32(f32(v * inv) + zero)), 0), 15) for v in row.tolist()]
    return codes, scale, zero


def test_int4_codes_and_packed_scale_match_the_kernel():
    x = kv(64, seed=7)
    enc = get_format("vllm:int4_per_token_head").quantize(x)
    rotated = fwht(x * vllm_rht_signs(64))
    packed = enc.data["codes"].reshape(-1, 32)
    bits = enc.data["scale"].reshape(-1).view(torch.int32)
    for i, row in enumerate(rotated.reshape(-1, 64)):
        codes, scale, zero = reference_int4_row(row)
        low, high = packed[i] & 0xF, packed[i] >> 4
        assert low.tolist() == codes[0::2] and high.tolist() == codes[1::2]  # even index low
        assert bits[i].item() & 0xF == zero
        scale_bits = struct.unpack("i", struct.pack("f", scale))[0]
        assert bits[i].item() & -16 == scale_bits & -16


def test_int4_round_trip_is_in_the_original_basis_within_half_a_step():
    x = kv(128, seed=8, scale=3.0)
    fmt = get_format("vllm:int4_per_token_head")
    enc = fmt.quantize(x)
    y = fmt.dequantize(enc)
    scale = (enc.data["scale"].view(torch.int32) & -16).view(torch.float32)
    # the rotation y = H D x has norm sqrt(d) |x|, so |x_hat - x|_2 <= (step / 2) per (token, head)
    err = (y - x).norm(dim=-1)
    assert bool((err <= scale / 2 * (1 + 1e-4)).all())
    assert sqnr_db(x, y) > 18


def test_int4_keeps_the_model_dtype():
    x = kv(64, seed=9).to(torch.bfloat16)
    y = fake_quantize(get_format("vllm:int4_per_token_head"), x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


# --- storage and head sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "bits"),
    [
        ("vllm:fp8_e4m3", lambda d: 8.0),
        ("vllm:int8_per_token_head", lambda d: 8 + 32 / d),
        ("vllm:fp8_per_token_head", lambda d: 8 + 32 / d),
        ("vllm:int4_per_token_head", lambda d: 4 + 32 / d),
        ("vllm:nvfp4", lambda d: 4.5),
    ],
)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_nbytes_of_the_parts_is_bits_times_numel(name, bits, head_dim):
    fmt = get_format(name)
    x = kv(head_dim, seed=head_dim).to(torch.bfloat16)
    enc = fmt.quantize(x)
    assert fmt.bits_per_element(head_dim) == bits(head_dim)
    assert enc.nbytes() == nbytes(fmt, tuple(x.shape)) == bits(head_dim) * x.numel() / 8


@pytest.mark.parametrize(
    ("head_dim", "ok"), [(64, True), (128, True), (256, True), (80, False), (96, False)]
)
def test_int4_needs_a_power_of_two_head(head_dim, ok):
    fmt = get_format("vllm:int4_per_token_head")
    msg = fmt.check_head_dim(head_dim)
    assert (msg is None) == ok
    if not ok:
        assert "power of two" in msg and str(head_dim) in msg
        with pytest.raises(ValueError, match="power of two"):
            fmt.quantize(torch.zeros(1, 1, 1, head_dim))


@pytest.mark.parametrize(
    "name", ["vllm:fp8_e4m3", "vllm:int8_per_token_head", "vllm:fp8_per_token_head"]
)
def test_per_tensor_and_per_token_formats_take_any_head(name):
    fmt = get_format(name)
    assert fmt.check_head_dim(80) is None
    x = kv(80)
    enc = fmt.quantize(x)
    assert enc.nbytes() == nbytes(fmt, tuple(x.shape))  # 8 + 32 / 80 bits, counted exactly
    assert math.isfinite(float(fmt.dequantize(enc).sum()))
