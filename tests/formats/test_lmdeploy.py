"""LMDeploy quant_policy 4 / 8 against fill_kv_cache.py's formulas written out plainly."""

import pytest
import torch

from kvtuner.formats import fake_quantize, get_format, nbytes


def kv(head_dim: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, 9, head_dim, generator=g) * 2).to(dtype)


def reference_codes(
    x: torch.Tensor, levels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32: scale = (max - min) / levels, zero = -min / scale, q = (int)(x / scale + zero + 0.5)."""
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = (hi - lo) / levels
    zero = -lo / scale
    q = (x / scale + zero + 0.5).trunc().clamp(0, levels).to(torch.uint8)
    return q, scale[..., 0], zero[..., 0]


def test_int8_codes_scale_zero():
    x = kv(seed=1)
    enc = get_format("lmdeploy:int8").quantize(x)
    q, scale, zero = reference_codes(x, 255)
    assert torch.equal(enc.data["codes"], q)
    assert torch.equal(enc.data["scale"], scale)
    assert torch.equal(enc.data["zero"], zero)


def test_int4_packs_d_with_d_plus_half():
    x = kv(seed=2)
    enc = get_format("lmdeploy:int4").quantize(x)
    q, _, _ = reference_codes(x, 15)
    packed = enc.data["codes"]
    assert packed.shape == (*x.shape[:-1], 32)
    assert torch.equal(packed & 0xF, q[..., :32])
    assert torch.equal(packed >> 4, q[..., 32:])


@pytest.mark.parametrize(("name", "levels"), [("lmdeploy:int4", 15), ("lmdeploy:int8", 255)])
def test_error_is_half_a_step(name, levels):
    x = kv(seed=3)
    fmt = get_format(name)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / levels
    err = (fake_quantize(fmt, x) - x).abs()
    assert bool((err <= step / 2 * (1 + 1e-4) + 1e-6).all())


@pytest.mark.parametrize(("name", "bits"), [("lmdeploy:int4", 4), ("lmdeploy:int8", 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_and_zero_in_the_model_dtype(name, bits, dtype):
    fmt = get_format(name)
    x = kv(128, seed=4, dtype=dtype)
    enc = fmt.quantize(x)
    assert enc.data["scale"].dtype == dtype and enc.data["zero"].dtype == dtype
    assert fmt.bits_per_element(128) == bits + 32 / 128
    assert enc.nbytes() == nbytes(fmt, tuple(x.shape)) == (bits + 32 / 128) * x.numel() / 8
    y = fmt.dequantize(enc)
    assert y.dtype == dtype
    sqnr = 10 * torch.log10(x.float().pow(2).mean() / (x.float() - y.float()).pow(2).mean())
    assert sqnr > (16 if bits == 4 else 30)


def test_int8_bf16_arithmetic_stays_in_bf16():
    # the int8 kernel does not upcast: x / scale + zero + 0.5 rounds to bf16 at every step
    x = kv(64, seed=5, dtype=torch.bfloat16)
    enc = get_format("lmdeploy:int8").quantize(x)
    r = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    v = x.float()
    lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    scale = r(r(hi - lo) / 255)
    zero = r(-lo / scale)
    q = r(r(r(v / scale) + zero) + 0.5).trunc().clamp(0, 255).to(torch.uint8)
    assert torch.equal(enc.data["codes"], q)


def test_constant_row_reads_back_as_nan_like_the_engine():
    x = torch.ones(1, 1, 2, 64)
    y = fake_quantize(get_format("lmdeploy:int8"), x)
    assert torch.isnan(y).all()


def test_int4_needs_an_even_head():
    fmt = get_format("lmdeploy:int4")
    assert fmt.check_head_dim(64) is None and get_format("lmdeploy:int8").check_head_dim(63) is None
    assert "even" in fmt.check_head_dim(63)
    with pytest.raises(ValueError, match="even"):
        fmt.quantize(torch.zeros(1, 1, 1, 63))
