"""Precision pairs, spec parsing, and equivalent / effective bits checked against hand computations."""

import math

import pytest

from kvtuner.precision import (
    PrecisionPair,
    candidate_pairs,
    effective_bits,
    equivalent_bits,
    parse_pair,
    quantized_token_count,
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


def test_quantized_token_count():
    assert quantized_token_count("per-token", 100, None, 0) == 100
    # kivi: (100 - 32) // 32 * 32 = 64 tokens packed, 36 in the residual
    assert quantized_token_count("kivi", 100, 32, 32) == 64
    assert quantized_token_count("kivi", 20, 32, 32) == 0


def test_effective_bits_per_token_by_hand():
    # one min/max group per head of 64: scale + zero at 16 bits = 32 bits / 64 = 0.5 bit per element
    kv4 = [PrecisionPair(4, 4)]
    assert (
        effective_bits(
            kv4, scheme="per-token", head_dim=64, group_size=None, residual_length=0, context=10
        )
        == 4.5
    )
    # groups of 32 channels double the overhead: 4 + 1
    assert (
        effective_bits(
            kv4, scheme="per-token", head_dim=64, group_size=32, residual_length=0, context=10
        )
        == 5.0
    )
    # fp16 layers cost dtype_bits; the mean is over layers
    mixed = [PrecisionPair(4, 4), PrecisionPair(16, 16)]
    got = effective_bits(
        mixed, scheme="per-token", head_dim=64, group_size=None, residual_length=0, context=10
    )
    assert got == pytest.approx((4.5 + 16) / 2)


def test_effective_bits_kivi_by_hand():
    # 128 tokens, G = R = 32: 96 packed, 32 residual at 16 bits.
    # keys: per channel, 2*16/32 = 1 bit overhead -> (96 * 3 + 32 * 16) / 128 = 6.25
    # values: per token, 2 groups of 32 channels in 64: 2*16*2/64 = 1 bit -> also 6.25
    got = effective_bits(
        [PrecisionPair(2, 2)],
        scheme="kivi",
        head_dim=64,
        group_size=32,
        residual_length=32,
        context=128,
    )
    assert got == pytest.approx(6.25)
    assert not math.isclose(got, 2.0)


def test_effective_bits_needs_positive_context():
    with pytest.raises(ValueError):
        effective_bits(
            [PrecisionPair(4, 4)],
            scheme="per-token",
            head_dim=64,
            group_size=None,
            residual_length=0,
            context=0,
        )
