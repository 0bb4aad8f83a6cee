"""Clustering on synthetic e_o profiles: the expected groups, and --max-groups respected."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from kvtuner.cluster import (
    build_search_space,
    candidate_sets,
    cluster_layers,
    dbscan_labels,
    groups_for_count,
    groups_for_size,
    profiles,
)
from kvtuner.errors import ConfigError
from kvtuner.precision import candidate_pairs
from kvtuner.prune import prune_table
from kvtuner.space import SearchSpace

PAIRS = candidate_pairs((2, 4, 8))
# e_o of a typical layer at scale 1 (pruning keeps KV8, K8V4, KV4, K4V2, KV2)
BASE = {"KV8": 0.01, "K8V4": 0.10, "K4V8": 0.50, "K8V2": 0.60, "K2V8": 1.50,
        "KV4": 0.30, "K4V2": 0.70, "K2V4": 1.60, "KV2": 2.00}  # fmt: skip


def synthetic_table(scales: list[float], cheap_k8v2: set[int] = frozenset()) -> pd.DataFrame:
    """Layer i has BASE * scales[i]; layers in `cheap_k8v2` also keep K8V2 after pruning."""
    rows = []
    for layer, scale in enumerate(scales):
        for pair in PAIRS:
            e = BASE[pair.name] * scale
            if pair.name == "K8V2" and layer in cheap_k8v2:
                e = 0.25 * scale
            rows.append({"layer": layer, "key_bits": pair.key_bits, "value_bits": pair.value_bits,
                         "equivalent_bits": pair.equivalent_bits, "e_o": e, "e_k": 0.0, "e_v": 0.0})  # fmt: skip
    return pd.DataFrame(rows)


def layer_sets(groups) -> list[tuple[int, ...]]:
    return [g.layers for g in groups]


def test_dbscan_noise_becomes_singletons():
    vectors = np.array([[0.0], [0.01], [0.02], [1.0], [1.01], [5.0]])
    labels = dbscan_labels(vectors, eps=0.05, min_samples=2)
    assert labels[0] == labels[1] == labels[2] and labels[3] == labels[4]
    assert len(set(labels)) == 3
    strict = dbscan_labels(vectors, eps=0.05, min_samples=3)  # the pair at 1.0 is noise now
    assert len(set(strict)) == 4 and strict[3] != strict[4]


def test_profiles_are_log10_e_o():
    table = synthetic_table([1.0, 10.0])
    pairs = prune_table(table)[0]
    vectors = profiles(table, [0, 1], pairs)
    assert np.allclose(vectors[1] - vectors[0], 1.0)  # ten times the error: one unit apart


def test_clusters_match_the_synthetic_profiles():
    # three families: scale ~1 (layers 0, 1, 4), ~2 (layers 2, 5), and layer 3 alone at 5
    table = synthetic_table([1.0, 1.01, 2.0, 5.0, 0.99, 2.01])
    groups = cluster_layers(table, prune_table(table), eps=0.05)
    assert layer_sets(groups) == [(0, 1, 4), (2, 5), (3,)]
    assert [p.name for p in groups[0].candidates] == ["KV8", "K8V4", "KV4", "K4V2", "KV2"]


def test_layers_with_different_candidate_sets_never_share_a_group():
    table = synthetic_table([1.0, 1.0, 1.0, 1.0], cheap_k8v2={1, 3})
    pruned = prune_table(table)
    assert list(candidate_sets(pruned).values()) == [[0, 2], [1, 3]]
    groups = cluster_layers(table, pruned, eps=100.0)
    assert layer_sets(groups) == [(0, 2), (1, 3)]
    assert len(groups[1].candidates) == 6


def test_single_linkage_cuts_at_the_asked_number_of_groups():
    scales = [1.0, 1.05, 1.3, 1.8, 2.6, 3.9, 5.5, 8.0]
    table = synthetic_table(scales)
    pruned = prune_table(table)
    previous = None
    for k in range(1, len(scales) + 1):
        groups, distance = groups_for_count(table, pruned, k)
        assert len(groups) == k
        # single linkage on a line of log scales: groups are runs of neighbouring scales
        assert all(g.layers == tuple(range(g.layers[0], g.layers[-1] + 1)) for g in groups)
        if previous is not None:
            assert distance <= previous + 1e-12  # more groups, a lower cut
        previous = distance


def test_max_size_takes_the_most_groups_that_fit():
    table = synthetic_table([1.0, 1.05, 1.3, 1.8, 2.6, 3.9, 5.5, 8.0])
    pruned = prune_table(table)
    groups, _ = groups_for_size(table, pruned, 5**3)
    assert len(groups) == 3  # 5 candidates a group: 125 configs; 4 groups would be 625
    groups, _ = groups_for_size(table, pruned, 10**9)
    assert len(groups) == 8


def test_max_groups_below_the_number_of_candidate_sets_is_an_error():
    table = synthetic_table([1.0, 1.0, 1.0], cheap_k8v2={1})
    with pytest.raises(
        ConfigError, match="--max-groups 1: the layers have 2 different pruned candidate sets"
    ):
        groups_for_count(table, prune_table(table), 1)
    with pytest.raises(ConfigError, match="--max-size 10: even one group per candidate set"):
        groups_for_size(table, prune_table(table), 10)


def test_build_search_space_sizes_and_round_trip(tmp_path):
    table = synthetic_table([1.0, 1.01, 2.0, 5.0, 0.99, 2.01], cheap_k8v2={3})
    result = build_search_space(table, model="synthetic", num_layers=6, max_groups=3)
    space = result.space
    assert layer_sets(space.groups) == [(0, 1, 4), (2, 5), (3,)]
    assert space.size == 5 * 5 * 6
    assert space.log10_unpruned_size == pytest.approx(6 * math.log10(9))
    assert space.metadata["unpruned_size"] == 9**6
    assert space.metadata["pruned_size"] == 5**5 * 6
    assert space.metadata["clustering"] == "max_groups" and result.how == "max_groups"
    loaded = SearchSpace.load(space.save(tmp_path / "space.yaml"))
    assert loaded == space
    default = build_search_space(table, model="synthetic", num_layers=6)
    assert default.how == "max_size" and default.space.size <= 100_000


def test_bad_clustering_arguments():
    table = synthetic_table([1.0, 2.0])
    with pytest.raises(ConfigError, match="--eps"):
        build_search_space(table, model="m", num_layers=2, eps=0.0)
    with pytest.raises(ConfigError, match="--max-groups"):
        build_search_space(table, model="m", num_layers=2, max_groups=0)
    with pytest.raises(ConfigError, match="--max-size"):
        build_search_space(table, model="m", num_layers=2, max_size=0)
    with pytest.raises(ConfigError, match="--tolerance"):
        build_search_space(table, model="m", num_layers=2, tolerance=-1.0)
