"""NVFP4 K/V: two-level scales written out plainly, calibration, storage, head sizes."""

import pytest
import torch

from kvtuner.formats import nbytes
from kvtuner.formats.floats import E2M1_VALUES
from kvtuner.formats.nvfp4 import NVFP4, calibrate_nvfp4_scale


def reference(x: torch.Tensor, tensor_scale: float) -> torch.Tensor:
    """x_hat per 16-value block: e4m3 block scale of amax / ts / 6, values to the nearest E2M1
    (ties to the even code), x_hat = value * block_scale * ts."""
    table = torch.tensor(E2M1_VALUES)
    blocks = x.reshape(-1, 16)
    sf = (blocks.abs().amax(-1) / tensor_scale / 6).clamp(max=448).to(torch.float8_e4m3fn).float()
    step = sf * tensor_scale
    out = torch.zeros_like(blocks)
    for i, (row, s) in enumerate(zip(blocks, step)):
        if s == 0:
            continue
        a = (row.abs() / s).clamp(max=6)
        dist = (table[None, :] - a[:, None]).abs()
        tie_break = (torch.arange(8) % 2) * 1e-6  # prefer the even code on equal distance
        idx = (dist + tie_break).argmin(-1)
        out[i] = torch.sign(row) * table[idx] * s
    return out.reshape(x.shape)


def test_matches_the_plain_two_level_formula():
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    x[0, 0, :16] = 0.0  # a zero block
    fmt = NVFP4(tensor_scale=0.002)
    y = fmt.dequantize(fmt.quantize(x))
    torch.testing.assert_close(y, reference(x, 0.002), rtol=0, atol=0)


def test_calibrated_scale_puts_the_tensor_max_on_448_times_6():
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    s = calibrate_nvfp4_scale(x)
    assert s == pytest.approx(x.abs().max().item() / 2688)
    enc = NVFP4().quantize(x)
    assert enc.meta["tensor_scale"] == s
    assert enc.data["block_scale"].float().max().item() == 448.0
    # the maximum is exactly representable: 6 * 448 * s
    y = NVFP4().dequantize(enc)
    i = x.abs().argmax()
    assert y.flatten()[i].item() == pytest.approx(x.flatten()[i].item(), rel=1e-6)


def test_storage_is_4_5_bits():
    fmt = NVFP4()
    x = torch.randn(2, 3, 11, 128).to(torch.bfloat16)
    enc = fmt.quantize(x)
    assert enc.data["codes"].shape == (2, 3, 11, 64)
    assert enc.data["block_scale"].shape == (2, 3, 11, 8)
    assert enc.data["block_scale"].dtype == torch.float8_e4m3fn
    assert enc.nbytes() == nbytes(fmt, tuple(x.shape)) == 4.5 * x.numel() / 8
    assert fmt.dequantize(enc).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("head_dim", "ok"), [(16, True), (48, True), (128, True), (40, False), (72, False)]
)
def test_head_dim_must_be_a_multiple_of_16(head_dim, ok):
    msg = NVFP4().check_head_dim(head_dim)
    assert (msg is None) == ok
    if not ok:
        assert "multiple of 16" in msg
        with pytest.raises(ValueError, match="multiple of 16"):
            NVFP4().quantize(torch.zeros(1, 2, head_dim))
