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


def test_non_finite_values_propagate_to_their_group_only():
    """A dense cache turns a NaN or inf key into a NaN attention output; so does a quantized one:
    the group holding it dequantizes to non-finite values, the other groups are untouched."""
    x = torch.randn(1, 1, 4, 16, generator=torch.Generator().manual_seed(7))
    x[0, 0, 1, 3] = float("nan")
    x[0, 0, 2, 5] = float("inf")
    x[0, 0, 3, 9] = float("-inf")
    y = fake_quantize(x, 4, group_size=8)
    for row, channel in ((1, 3), (2, 5), (3, 9)):
        group = slice(channel // 8 * 8, channel // 8 * 8 + 8)
        assert not torch.isfinite(y[0, 0, row, group]).any()
        other = slice(8, 16) if channel < 8 else slice(0, 8)
        alone = fake_quantize(x[0, 0, row : row + 1, other], 4)[0]
        assert torch.allclose(y[0, 0, row, other], alone, atol=1e-6)
    assert torch.equal(y[0, 0, 0], fake_quantize(x[0, 0, [0]], 4, group_size=8)[0])


def test_padding_stays_out_of_per_channel_ranges():
    x = torch.randn(2, 1, 8, 4, generator=torch.Generator().manual_seed(3))
    x[0, :, :3] = 1000.0  # padded positions of row 0 hold garbage
    valid = torch.ones(2, 1, 8, 1, dtype=torch.bool)
    valid[0, :, :3] = False
    q = quantize_per_channel(x, 4, 8, valid=valid)
    y = q.dequantize()
    alone = quantize_per_channel(x[0:1, :, 3:], 4, 5).dequantize()
    assert torch.allclose(y[0, :, 3:], alone[0], atol=1e-5)
    assert torch.equal(y[1], quantize_per_channel(x[1:2], 4, 8).dequantize()[0])


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
