"""The e_o math on hand tensors, against plain loop references written here."""

from __future__ import annotations

import math

import pytest
import torch

from kvtuner.memory import held_tokens
from kvtuner.precision import Layout, PrecisionPair, candidate_pairs
from kvtuner.quant import fake_quantize
from kvtuner.sensitivity import (
    COLUMNS,
    LayerCapture,
    QuantScheme,
    attention_output,
    attention_probs,
    layer_errors,
    relative_error,
    sensitivity_table,
)

PER_TOKEN = QuantScheme(Layout("per-token", group_size=None, sink_tokens=0, smooth=False))


def kivi(group: int, residual: int) -> QuantScheme:
    """KIVI with key blocks and value groups of `group`, no sinks (as the hand computations)."""
    return QuantScheme(
        Layout(
            "kivi",
            group_size=group,
            block_size=group,
            residual_length=residual,
            sink_tokens=0,
            smooth=False,
        )
    )


def random_capture(
    seed=0,
    samples=2,
    heads=4,
    kv_heads=2,
    seq=40,
    queries=12,
    head_dim=16,
    window=None,
    softcap=None,
    layer=0,
) -> LayerCapture:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(samples, heads, queries, head_dim, generator=g)
    k = torch.randn(samples, kv_heads, seq, head_dim, generator=g) * 2 + 0.5
    v = torch.randn(samples, kv_heads, seq, head_dim, generator=g)
    return LayerCapture(layer, q, k, v, scaling=0.3, sliding_window=window, softcap=softcap)


def reference_attention(capture: LayerCapture, keys_at=None, values_at=None) -> torch.Tensor:
    """Loop over query positions; keys_at(t) / values_at(t) give the K / V a query at t reads."""
    c = capture
    rep = c.query.shape[1] // c.key.shape[1]
    outs = []
    for i in range(c.query.shape[2]):
        t = c.query_offset + i
        k = (keys_at(t) if keys_at else c.key).repeat_interleave(rep, dim=1)
        v = (values_at(t) if values_at else c.value).repeat_interleave(rep, dim=1)
        lo = 0 if c.sliding_window is None else max(0, t - c.sliding_window + 1)
        logits = torch.einsum("nhd,nhsd->nhs", c.query[:, :, i], k[:, :, lo : t + 1]) * c.scaling
        if c.softcap is not None:
            logits = c.softcap * torch.tanh(logits / c.softcap)
        outs.append(torch.einsum("nhs,nhsd->nhd", logits.softmax(-1), v[:, :, lo : t + 1]))
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("window,softcap", [(None, None), (8, None), (None, 2.0)])
def test_attention_output_matches_loop_reference(window, softcap):
    capture = random_capture(window=window, softcap=softcap)
    torch.testing.assert_close(
        attention_output(capture), reference_attention(capture), atol=1e-5, rtol=1e-5
    )


def test_gqa_reads_kv_head_h_over_group():
    # query heads 0,1 read KV head 0 and heads 2,3 read KV head 1 (repeat_interleave, not tile)
    capture = random_capture(heads=4, kv_heads=2)
    out = attention_output(capture)
    tiled = LayerCapture(
        0, capture.query, capture.key.repeat(1, 2, 1, 1), capture.value.repeat(1, 2, 1, 1), 0.3
    )
    interleaved = LayerCapture(
        0,
        capture.query,
        capture.key.repeat_interleave(2, 1),
        capture.value.repeat_interleave(2, 1),
        0.3,
    )
    torch.testing.assert_close(out, attention_output(interleaved), atol=1e-6, rtol=1e-6)
    assert (out - attention_output(tiled)).abs().max() > 0.1


def test_window_masks_old_keys():
    capture = random_capture(window=8)
    probs = attention_probs(
        capture.query, capture.key, scaling=0.3, query_offset=capture.query_offset, sliding_window=8
    )
    t = capture.query_offset  # first query position
    assert probs[..., 0, : t - 7].abs().max() == 0
    assert probs[..., 0, t + 1 :].abs().max() == 0
    assert (probs[..., 0, t - 7 : t + 1] > 0).all()


def test_e_o_is_zero_at_16_bits():
    capture = random_capture(window=8)
    for scheme in (PER_TOKEN, kivi(8, 8)):
        (row,) = layer_errors(capture, [PrecisionPair(16, 16)], scheme)
        assert row["e_o"] == 0.0 and row["e_k"] == 0.0 and row["e_v"] == 0.0


def test_per_token_errors_match_direct_computation():
    capture = random_capture()
    pairs = candidate_pairs((2, 4, 8))
    rows = {(r["key_bits"], r["value_bits"]): r for r in layer_errors(capture, pairs, PER_TOKEN)}
    assert len(rows) == 9
    for pair in pairs:
        k_hat = fake_quantize(capture.key, pair.key_bits)
        v_hat = fake_quantize(capture.value, pair.value_bits)
        exact = reference_attention(capture)
        approx = reference_attention(capture, lambda t, k=k_hat: k, lambda t, v=v_hat: v)
        e_o = ((approx - exact).norm() / exact.norm()).item()
        row = rows[(pair.key_bits, pair.value_bits)]
        assert row["e_o"] == pytest.approx(e_o, rel=1e-4)
        assert row["e_k"] == pytest.approx(
            ((k_hat - capture.key).norm() / capture.key.norm()).item(), rel=1e-5
        )
        assert row["equivalent_bits"] == pair.equivalent_bits


def test_kivi_queries_see_their_own_residual():
    # group 4, residual 4: a query at t reads the tokens held quantized after t + 1 quantized
    group, residual = 4, 4
    capture = random_capture(seq=24, queries=10, head_dim=16)
    pair = PrecisionPair(2, 4)
    (row,) = layer_errors(capture, [pair], kivi(group, residual))
    stored_total = held_tokens(kivi(group, residual).layout, pair, 24).quantized
    k_hat = fake_quantize(capture.key[..., :stored_total, :], 2, per_channel=True, group_size=group)
    v_hat = fake_quantize(capture.value[..., :stored_total, :], 4, group_size=group)

    def mixed(x, x_hat):
        def at(t):
            count = held_tokens(kivi(group, residual).layout, pair, t + 1).quantized
            return torch.cat([x_hat[..., :count, :], x[..., count:, :]], dim=-2)

        return at

    exact = reference_attention(capture)
    approx = reference_attention(capture, mixed(capture.key, k_hat), mixed(capture.value, v_hat))
    assert row["e_o"] == pytest.approx(((approx - exact).norm() / exact.norm()).item(), rel=1e-4)
    assert 0 < row["e_o"]


def test_kivi_with_residual_longer_than_sample_quantizes_nothing():
    capture = random_capture(seq=24)
    (row,) = layer_errors(capture, [PrecisionPair(2, 2)], kivi(32, 32))
    assert row["e_o"] == 0.0 and row["e_k"] == 0.0


def test_errors_shrink_with_bits():
    capture = random_capture(seq=64, queries=16)
    for scheme in (PER_TOKEN, kivi(8, 8)):
        rows = {
            (r["key_bits"], r["value_bits"]): r["e_o"]
            for r in layer_errors(capture, candidate_pairs(), scheme)
        }
        assert rows[(8, 8)] < rows[(4, 4)] < rows[(2, 2)]
        assert rows[(8, 8)] < 0.02


def test_sensitivity_table_is_tidy_and_ordered():
    captures = [random_capture(seed=i, layer=i) for i in range(3)]
    pairs = candidate_pairs((2, 4, 8))
    table = sensitivity_table(captures, pairs, PER_TOKEN, progress=False)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 27
    assert table.layer.tolist() == [0] * 9 + [1] * 9 + [2] * 9
    first = [
        PrecisionPair(int(k), int(v)) for k, v in zip(table.key_bits[:9], table.value_bits[:9])
    ]
    assert tuple(first) == pairs


def test_relative_error():
    exact = torch.tensor([3.0, 4.0])
    assert relative_error(exact + torch.tensor([0.3, 0.4]), exact) == pytest.approx(0.1)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert math.isclose(relative_error(exact, exact), 0.0)


def test_sinks_stay_exact_and_are_not_counted_as_quantized():
    capture = random_capture(seq=24, queries=10, head_dim=16)
    scheme = QuantScheme(Layout("per-token", group_size=8, sink_tokens=3))
    k_hat = scheme.quantize(capture.key, 2, is_key=True)
    assert torch.equal(k_hat[..., :3, :], capture.key[..., :3, :])
    assert not torch.equal(k_hat[..., 3:, :], capture.key[..., 3:, :])
    mask = scheme.stored_mask(torch.arange(14, 24), 24)
    assert not mask[:, :3].any() and mask[0, 3:15].all()


def test_smoothing_divides_channels_by_their_peak_before_grouping():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 64, 16, generator=gen)
    x[..., 3] *= 30.0  # an outlier channel
    plain = QuantScheme(Layout("per-token", group_size=16, sink_tokens=0, smooth=False))
    smooth = QuantScheme(Layout("per-token", group_size=16, sink_tokens=0))
    error = {
        name: (scheme.quantize(x, 4, is_key=True) - x).norm().item()
        for name, scheme in (("plain", plain), ("smooth", smooth))
    }
    assert error["smooth"] < 0.8 * error["plain"]
    others = [c for c in range(16) if c != 3]
    assert (smooth.quantize(x, 4, is_key=True) - x)[..., others].abs().max() < (
        plain.quantize(x, 4, is_key=True) - x
    )[..., others].abs().max()
