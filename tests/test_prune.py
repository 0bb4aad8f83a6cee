"""Pareto pruning on hand-written tables: exactly the expected pairs survive."""

from __future__ import annotations

import pandas as pd
import pytest

from kvtuner.precision import PrecisionPair, parse_pair
from kvtuner.prune import dominates, pareto_pairs, prune_table

# a typical layer: keys matter more, so 2-bit keys and 8-bit values are wasteful
TYPICAL = {"KV8": 0.01, "K8V4": 0.10, "K4V8": 0.50, "K8V2": 0.60, "K2V8": 1.50,
           "KV4": 0.30, "K4V2": 0.70, "K2V4": 1.60, "KV2": 2.00}  # fmt: skip


def errors(named: dict[str, float]) -> dict[PrecisionPair, float]:
    return {parse_pair(name): e for name, e in named.items()}


def names(pairs) -> list[str]:
    return [p.name for p in pairs]


def test_typical_layer_keeps_the_five_pairs_of_the_paper():
    assert names(pareto_pairs(errors(TYPICAL))) == ["KV8", "K8V4", "KV4", "K4V2", "KV2"]


def test_cheap_k8v2_survives_when_it_beats_kv4():
    table = {**TYPICAL, "K8V2": 0.25}
    assert names(pareto_pairs(errors(table))) == ["KV8", "K8V4", "K8V2", "KV4", "K4V2", "KV2"]


def test_same_bits_lower_error_wins_and_exact_ties_keep_the_cheaper_pair():
    assert names(pareto_pairs(errors({"K8V4": 0.2, "K4V8": 0.1}))) == ["K4V8"]
    # equal error for fewer bits: the dearer pair buys nothing
    assert names(pareto_pairs(errors({"KV8": 0.1, "KV4": 0.1}))) == ["KV4"]
    # identical pairs at identical bits and error both stay
    assert names(pareto_pairs(errors({"K8V4": 0.1, "K4V8": 0.1}))) == ["K8V4", "K4V8"]


def test_tolerance_drops_near_ties():
    near = {"KV8": 0.100, "K8V4": 0.104, "KV4": 0.5}
    assert names(pareto_pairs(errors(near))) == ["KV8", "K8V4", "KV4"]
    assert names(pareto_pairs(errors(near), tolerance=0.05)) == ["K8V4", "KV4"]
    assert names(pareto_pairs(errors(near), tolerance=0.03)) == ["KV8", "K8V4", "KV4"]
    with pytest.raises(ValueError):
        pareto_pairs(errors(near), tolerance=-0.1)


def test_never_empty_even_with_a_huge_tolerance():
    assert names(pareto_pairs(errors(TYPICAL), tolerance=1e6)) == ["KV2"]


def test_dominates():
    assert dominates((4, 0.3), (6, 0.5))
    assert not dominates((4, 0.6), (6, 0.5))
    assert dominates((4, 0.51), (6, 0.5), tolerance=0.05)
    assert dominates((6, 0.4), (6, 0.5)) and not dominates((6, 0.5), (6, 0.5))
    assert not dominates((8, 0.1), (6, 0.5))


def test_prune_table_per_layer():
    rows = []
    for layer, table in enumerate([TYPICAL, {**TYPICAL, "K8V2": 0.25}]):
        for name, e in table.items():
            pair = parse_pair(name)
            rows.append({"layer": layer, "key_bits": pair.key_bits, "value_bits": pair.value_bits,
                         "equivalent_bits": pair.equivalent_bits, "e_o": e})  # fmt: skip
    pruned = prune_table(pd.DataFrame(rows))
    assert {layer: names(p) for layer, p in pruned.items()} == {
        0: ["KV8", "K8V4", "KV4", "K4V2", "KV2"],
        1: ["KV8", "K8V4", "K8V2", "KV4", "K4V2", "KV2"],
    }
