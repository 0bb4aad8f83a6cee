"""iq4_nl's block search against a line-by-line float32 translation of ggml's C reference."""

import numpy as np
import pytest
import torch

from kvtuner.formats.ggml_blocks import IQ4_NL_LEVELS
from kvtuner.formats.iq4_nl import best_index, quantize_iq4_nl

F = np.float32
VALUES = [F(v) for v in IQ4_NL_LEVELS]


def best_index_int8(x):
    """ggml-quants.c `best_index_int8(16, values, x)`."""
    if x <= VALUES[0]:
        return 0
    if x >= VALUES[15]:
        return 15
    ml, mu = 0, 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < VALUES[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - VALUES[mu - 1] < VALUES[mu] - x else mu


def reference_block(x):
    """`quantize_row_iq4_nl_impl(32, 32, x, ..., NULL, ntry=7)`, every operation in float32."""
    x = [F(v) for v in x]
    weight = [v * v for v in x]
    amax, vmax = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, vmax = abs(v), v
    if amax < F(1e-15):
        return F(0), [best_index_int8(F(0)) for _ in x]

    def sums(inv):
        sqx, sq2 = F(0), F(0)
        for v, w in zip(x, weight):
            q = VALUES[best_index_int8(inv * v)]
            sqx = F(sqx + F(w * q) * v)
            sq2 = F(sq2 + F(w * q) * q)
        return sqx, sq2

    d = F(-vmax / VALUES[0])
    sqx, sq2 = sums(F(F(1) / d))
    d = F(sqx / sq2)
    best = F(d * sqx)
    for itry in range(-7, 8):
        sqx, sq2 = sums(F(F(itry + VALUES[0]) / vmax))
        if sq2 > 0 and F(sqx * sqx) > F(best * sq2):
            d = F(sqx / sq2)
            best = F(d * sqx)
    inv = F(F(1) / d) if d else F(0)
    return d, [best_index_int8(F(inv * v)) for v in x]


def blocks_to_check() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(24, 32, generator=g) * torch.rand(24, 1, generator=g) * 4
    rows[0] = 0.0
    rows[1, :] = 0.0
    rows[1, 7] = -50.0  # one large negative value
    rows[2] = torch.linspace(-2.0, 0.5, 32)  # negative maximum
    rows[3] = 1e-20  # below GROUP_MAX_EPS
    return rows


def test_matches_c_reference():
    rows = blocks_to_check()
    d, idx = quantize_iq4_nl(rows)
    for i, row in enumerate(rows.numpy()):
        ref_d, ref_idx = reference_block(row)
        assert d[i, 0].item() == ref_d, f"block {i}"
        assert idx[i].tolist() == ref_idx, f"block {i}"


@pytest.mark.parametrize(
    ("x", "expected"),
    [(-200.0, 0), (-127.0, 0), (200.0, 15), (113.0, 15), (0.0, 8), (-4.5, 8), (-4.4, 8), (-4.6, 7)],
)
def test_best_index_ties_and_ends(x, expected):
    # between -10 and 1 the midpoint is -4.5; a tie goes to the upper level, as in the C loop
    assert best_index(torch.tensor([x])).item() == expected == best_index_int8(F(x))


def test_zero_block_stores_zero_scale_and_level_8():
    d, idx = quantize_iq4_nl(torch.zeros(2, 32))
    assert d.eq(0).all() and idx.eq(8).all()
