"""Precision pairs, spec parsing, equivalent bits and layouts, checked against hand computations."""

import pytest

from kvtuner.precision import (
    Layout,
    PrecisionPair,
    candidate_pairs,
    channel_group,
    equivalent_bits,
    parse_pair,
)


def test_pair_names_and_bits():
    assert PrecisionPair(8, 8).name == "KV8"
    assert PrecisionPair(8, 4).name == "K8V4"
    assert PrecisionPair(16, 16).name == "fp16"
    assert PrecisionPair(16, 4).name == "K16V4"
    assert PrecisionPair(8, 4).equivalent_bits == 6.0
    assert str(PrecisionPair(2, 2)) == "KV2"


@pytest.mark.parametrize("bits", [(3, 4), (4, 5), (0, 8), (32, 8)])
def test_pair_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="must be one of 2, 4, 8, 16"):
        PrecisionPair(*bits)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("KV8", (8, 8)),
        ("kv4", (4, 4)),
        ("K8V4", (8, 4)),
        ("k4v2", (4, 2)),
        (" KV2 ", (2, 2)),
        ("K2V8", (2, 8)),
        ("fp16", (16, 16)),
        ("bf16", (16, 16)),
        ("KV16", (16, 16)),
    ],
)
def test_parse_pair(spec, expected):
    assert parse_pair(spec) == PrecisionPair(*expected)


@pytest.mark.parametrize("spec", ["foo", "K8", "V4", "KV", "config.yaml", ""])
def test_parse_pair_not_a_spec(spec):
    assert parse_pair(spec) is None


@pytest.mark.parametrize("spec", ["KV3", "K8V3", "K5V4"])
def test_parse_pair_bad_bits(spec):
    with pytest.raises(ValueError, match="must be one of 2, 4, 8, 16"):
        parse_pair(spec)


def test_candidate_pairs_order():
    pairs = candidate_pairs()
    assert len(pairs) == 9
    assert pairs[0] == PrecisionPair(8, 8)
    assert pairs[-1] == PrecisionPair(2, 2)
    bits = [p.equivalent_bits for p in pairs]
    assert bits == sorted(bits, reverse=True)
    # at equal bits, more key bits first: K8V4 before K4V8
    assert pairs.index(PrecisionPair(8, 4)) < pairs.index(PrecisionPair(4, 8))
    assert len(candidate_pairs([4, 8])) == 4


def test_equivalent_bits_is_mean_of_pair_means():
    pairs = [PrecisionPair(8, 4), PrecisionPair(2, 2), PrecisionPair(4, 4)]
    assert equivalent_bits(pairs) == pytest.approx((6 + 2 + 4) / 3)
    with pytest.raises(ValueError):
        equivalent_bits([])


def test_channel_group_falls_to_a_divisor_of_head_dim():
    assert channel_group(32, 64) == 32
    assert channel_group(32, 80) == 20
    assert channel_group(32, 16) == 16
    assert channel_group(None, 256) == 256
    assert channel_group(64, 256) == 64


def test_layout_blocks_only_when_something_is_quantized():
    kivi = Layout("kivi", residual_length=32)
    assert kivi.block(PrecisionPair(4, 2)) == 32
    assert kivi.block(PrecisionPair(16, 4)) == 32
    assert kivi.block(PrecisionPair(16, 16)) == 1
    assert Layout("per-token", residual_length=32).residual_length == 0  # per-token has none
    with pytest.raises(ValueError):
        Layout("per-channel")
