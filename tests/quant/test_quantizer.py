import pytest
import torch

from kvtuner.quant import fake_quantize, quantize_per_channel, quantize_per_token


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(x.pow(2).mean() / (x - y).pow(2).mean()))


def reference_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Plain min/max asymmetric fake quantization over the last axis."""
    lo = x.amin(-1, keepdim=True)
    hi = x.amax(-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    return torch.round((x - lo) / scale).clamp(0, 2**bits - 1) * scale + lo


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_token_matches_plain_reference(bits):
    x = torch.randn(2, 3, 17, 32, generator=torch.Generator().manual_seed(bits))
    assert torch.allclose(fake_quantize(x, bits), reference_per_token(x, bits), atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_error_is_at_most_half_a_step(bits, per_channel):
    x = torch.randn(2, 2, 64, 48, generator=torch.Generator().manual_seed(3)) * 5
    if per_channel:
        q = quantize_per_channel(x, bits, group_size=16)
        step = q.scale.repeat_interleave(16, dim=-2)
    else:
        q = quantize_per_token(x, bits, group_size=16)
        step = q.scale.repeat_interleave(16, dim=-1)
    err = (q.dequantize() - x).abs()
    assert bool((err <= step / 2 + 1e-5).all())


@pytest.mark.parametrize(
    ("bits", "min_db"), [(8, 40.0), (4, 18.0), (2, 5.0)]
)  # uniform-ish Gaussian data, one group per 64-channel head
def test_sqnr_thresholds_per_token(bits, min_db):
    x = torch.randn(4, 8, 128, 64, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(x, fake_quantize(x, bits)) >= min_db


@pytest.mark.parametrize(("bits", "min_db"), [(8, 40.0), (4, 20.0)])
def test_sqnr_thresholds_per_channel(bits, min_db):
    x = torch.randn(4, 8, 128, 64, generator=torch.Generator().manual_seed(1))
    assert sqnr_db(x, fake_quantize(x, bits, per_channel=True, group_size=32)) >= min_db


def test_per_channel_handles_outlier_channels_better_than_per_token():
    # keys have a few large channels: per-channel grouping is what KIVI relies on
    x = torch.randn(1, 1, 128, 64, generator=torch.Generator().manual_seed(2))
    x[..., :4] *= 30
    per_token = sqnr_db(x, fake_quantize(x, 4))
    per_channel = sqnr_db(x, fake_quantize(x, 4, per_channel=True, group_size=32))
    assert per_channel > per_token + 3


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_symmetric_error_within_half_step(bits):
    x = torch.randn(3, 40, 32, generator=torch.Generator().manual_seed(5))
    q = quantize_per_token(x, bits, symmetric=True)
    assert q.zero is None
    step = q.scale.repeat_interleave(32, dim=-1)
    assert bool(((q.dequantize() - x).abs() <= step / 2 + 1e-5).all())


@pytest.mark.parametrize("per_channel", [False, True])
def test_constant_groups_are_exact(per_channel):
    x = torch.full((1, 2, 32, 16), 3.25)
    y = fake_quantize(x, 2, per_channel=per_channel, group_size=32 if per_channel else None)
    assert torch.equal(x, y)


def test_nan_and_inf_do_not_spoil_finite_values():
    x = torch.randn(1, 1, 4, 16, generator=torch.Generator().manual_seed(7))
    x[0, 0, 1, 3] = float("nan")
    x[0, 0, 2, 5] = float("inf")
    x[0, 0, 3, :] = float("-inf")
    y = fake_quantize(x, 4)
    finite = torch.isfinite(x)
    assert not torch.isnan(y).any()
    assert torch.isfinite(y[finite]).all()
    clean_rows = [0]
    assert torch.allclose(
        y[0, 0, clean_rows], reference_per_token(x[0, 0, clean_rows], 4), atol=1e-5
    )


def test_bfloat16_storage_and_nbytes():
    x = torch.randn(1, 3, 64, 64, dtype=torch.bfloat16)
    q = quantize_per_token(x, 4)
    assert q.scale.dtype == torch.bfloat16 and q.packed.dtype == torch.uint8
    # 64 channels * 4 bits = 32 bytes of codes + 2 bytes scale + 2 bytes zero per token
    assert q.nbytes() == 3 * 64 * (32 + 2 + 2)
    assert q.dequantize().dtype == torch.bfloat16


def test_per_channel_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple"):
        quantize_per_channel(torch.randn(1, 1, 30, 8), 4, group_size=32)


def test_group_size_must_divide_head_dim():
    with pytest.raises(ValueError, match="divide"):
        quantize_per_token(torch.randn(1, 1, 3, 10), 4, group_size=4)
