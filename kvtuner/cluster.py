"""Inter-layer clustering: layers that react alike to quantization share one precision pair.

Layers are first split by their pruned candidate set (identical sets together: a group's layers
share its candidates). Each layer is described by its profile, log10 e_o over its set's pairs: a
log scale makes distances comparable across models and schemes whose errors differ by orders of
magnitude. Three ways to cut, all with maintained libraries:

- `max_size` (the default, 100,000 configs): single linkage (scipy), the most groups whose space
  (the product of the groups' candidate counts) stays under the size;
- `max_groups`: single linkage cut at that many groups;
- `eps`: DBSCAN (scikit-learn, the paper's method) with that radius on the profiles; noise layers
  become groups of one.
Layers of different candidate sets are never merged (their distance is set far above any other).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvtuner import defaults
from kvtuner.errors import ConfigError
from kvtuner.precision import PrecisionPair
from kvtuner.prune import prune_table
from kvtuner.space import LayerGroup, SearchSpace

Pruned = Mapping[int, tuple[PrecisionPair, ...]]
FLOOR = 1e-6  # e_o below this (16-bit pairs: 0) counts as this on the log scale
APART = 1e6  # distance between layers of different candidate sets: never merged


def candidate_sets(pruned: Pruned) -> dict[tuple[PrecisionPair, ...], list[int]]:
    """Pruned candidate set -> its layers (ascending), sets in order of their first layer."""
    sets: dict[tuple[PrecisionPair, ...], list[int]] = {}
    for layer in sorted(pruned):
        sets.setdefault(tuple(pruned[layer]), []).append(layer)
    return sets


def profiles(
    table: pd.DataFrame, layers: Sequence[int], pairs: Sequence[PrecisionPair]
) -> np.ndarray:
    """log10 e_o `[len(layers), len(pairs)]`: row i is layer layers[i] over `pairs`."""
    wide = table.pivot(index="layer", columns=["key_bits", "value_bits"], values="e_o")
    e_o = wide.loc[list(layers), [(p.key_bits, p.value_bits) for p in pairs]].to_numpy(float)
    return np.log10(np.maximum(e_o, FLOOR))


def distances(table: pd.DataFrame, pruned: Pruned) -> np.ndarray:
    """Euclidean distances `[layers, layers]` between profiles; `APART` across candidate sets."""
    count = len(pruned)
    matrix = np.full((count, count), APART)
    for pairs, layers in candidate_sets(pruned).items():
        vectors = profiles(table, layers, pairs)
        within = np.sqrt(((vectors[:, None, :] - vectors[None, :, :]) ** 2).sum(-1))
        matrix[np.ix_(layers, layers)] = within
    np.fill_diagonal(matrix, 0.0)
    return matrix


def linkage_groups(table: pd.DataFrame, pruned: Pruned, count: int) -> tuple[list[int], float]:
    """Single linkage cut into at most `count` groups: (label per layer, the largest merge distance)."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    if len(pruned) == 1:
        return [0], 0.0
    tree = linkage(squareform(distances(table, pruned), checks=False), method="single")
    labels = fcluster(tree, t=count, criterion="maxclust")
    merged = tree[: len(pruned) - len(set(labels)), 2]
    return [int(x) for x in labels], float(merged.max()) if merged.size else 0.0


def dbscan_labels(vectors: np.ndarray, eps: float, min_samples: int) -> list[int]:
    """Group index per row; DBSCAN noise rows get groups of their own (numbered after the clusters)."""
    from sklearn.cluster import DBSCAN

    if len(vectors) == 1:
        return [0]
    labels = DBSCAN(eps=eps, min_samples=min_samples).fit(vectors).labels_
    next_label = int(labels.max()) + 1
    out = []
    for label in labels:
        if label < 0:
            label, next_label = next_label, next_label + 1
        out.append(int(label))
    return out


def _groups(pruned: Pruned, labels: Sequence[int]) -> tuple[LayerGroup, ...]:
    members: dict[int, list[int]] = {}
    for layer, label in zip(sorted(pruned), labels):
        members.setdefault(label, []).append(layer)
    groups = [LayerGroup(tuple(layers), tuple(pruned[layers[0]])) for layers in members.values()]
    return tuple(sorted(groups, key=lambda g: g.layers[0]))


def cluster_layers(
    table: pd.DataFrame, pruned: Pruned, eps: float, min_samples: int = defaults.MIN_SAMPLES
) -> tuple[LayerGroup, ...]:
    """DBSCAN (the paper's) per candidate set on log10 e_o profiles with radius `eps`."""
    if eps <= 0:
        raise ConfigError(f"--eps must be positive; got {eps}")
    if min_samples < 1:
        raise ConfigError(f"--min-samples must be at least 1; got {min_samples}")
    labels = dict.fromkeys(pruned, 0)
    offset = 0
    for pairs, layers in candidate_sets(pruned).items():
        found = dbscan_labels(profiles(table, layers, pairs), eps, min_samples)
        for layer, label in zip(layers, found):
            labels[layer] = offset + label
        offset += max(found) + 1
    return _groups(pruned, [labels[layer] for layer in sorted(pruned)])


def groups_for_count(
    table: pd.DataFrame, pruned: Pruned, max_groups: int
) -> tuple[tuple[LayerGroup, ...], float]:
    """At most `max_groups` groups by single linkage, and the merge distance it cut at."""
    sets = candidate_sets(pruned)
    if max_groups < len(sets):
        raise ConfigError(
            f"--max-groups {max_groups}: the layers have {len(sets)} different pruned candidate sets, "
            f"so at least {len(sets)} groups form; raise --max-groups or --tolerance"
        )
    labels, distance = linkage_groups(table, pruned, max_groups)
    return _groups(pruned, labels), distance


def groups_for_size(
    table: pd.DataFrame, pruned: Pruned, max_size: int
) -> tuple[tuple[LayerGroup, ...], float]:
    """The most single-linkage groups whose space holds at most `max_size` configs."""
    sets = candidate_sets(pruned)
    for count in range(len(pruned), len(sets) - 1, -1):
        groups, distance = groups_for_count(table, pruned, count)
        if math.prod(len(g.candidates) for g in groups) <= max_size:
            return groups, distance
    smallest = math.prod(len(pairs) for pairs in sets)
    raise ConfigError(
        f"--max-size {max_size}: even one group per candidate set gives {smallest:,} configs; "
        "raise --max-size or --tolerance"
    )


@dataclass(frozen=True)
class ClusterResult:
    """A search space and how it was found (`how`: max_size, max_groups or eps)."""

    space: SearchSpace
    pruned: dict[int, tuple[PrecisionPair, ...]]
    how: str
    distance: float

    @property
    def log10_pruned_size(self) -> float:
        """log10 of the space after pruning, before clustering: product of per-layer set sizes."""
        return _log10_size(self.pruned)


def _log10_size(pruned: Pruned) -> float:
    return sum(math.log10(len(pairs)) for pairs in pruned.values())


def build_search_space(
    table: pd.DataFrame,
    *,
    model: str,
    num_layers: int,
    scheme: str = defaults.SCHEME,
    layout: Mapping[str, Any] | None = None,
    tolerance: float = defaults.TOLERANCE,
    eps: float | None = None,
    min_samples: int = defaults.MIN_SAMPLES,
    max_groups: int | None = None,
    max_size: int = defaults.MAX_SPACE_SIZE,
    metadata: Mapping[str, Any] | None = None,
) -> ClusterResult:
    """Sensitivity table -> pruned pairs per layer -> groups -> SearchSpace.

    `eps` (DBSCAN) wins over `max_groups`, which wins over `max_size` (the default).
    `layout` holds the calibration's group_size, block_size, residual_length and sink_tokens.
    """
    if tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0; got {tolerance}")
    if max_groups is not None and max_groups < 1:
        raise ConfigError(f"--max-groups must be at least 1; got {max_groups}")
    if max_size < 1:
        raise ConfigError(f"--max-size must be at least 1; got {max_size}")
    pruned = prune_table(table, tolerance)
    if eps is not None:
        groups, how, distance = cluster_layers(table, pruned, eps, min_samples), "eps", eps
    elif max_groups is not None:
        groups, distance = groups_for_count(table, pruned, max_groups)
        how = "max_groups"
    else:
        groups, distance = groups_for_size(table, pruned, max_size)
        how = "max_size"
    unpruned = len({(int(k), int(v)) for k, v in zip(table.key_bits, table.value_bits)})
    layout = dict(layout or {})
    info = {
        **dict(metadata or {}),
        "tolerance": tolerance,
        "clustering": how,
        "profile": "log10 e_o",
        "eps": eps,
        "max_groups": max_groups,
        "max_size": max_size,
        "distance": round(distance, 6),
        "min_samples": min_samples,
        "unpruned_size": unpruned**num_layers,
        "pruned_size": math.prod(len(p) for p in pruned.values()),
        "log10_pruned_size": round(_log10_size(pruned), 4),
        "pruned_candidates": {
            layer: " ".join(p.name for p in pairs) for layer, pairs in pruned.items()
        },
    }
    space = SearchSpace(
        model=model,
        scheme=scheme,
        num_layers=num_layers,
        groups=groups,
        group_size=layout.get("group_size", defaults.SCHEME_DEFAULT),
        residual_length=int(layout.get("residual_length") or 0),
        block_size=int(layout.get("block_size") or defaults.KIVI_BLOCK_SIZE),
        sink_tokens=int(layout.get("sink_tokens", defaults.SINK_TOKENS)),
        smooth=layout.get("smooth", defaults.SCHEME_DEFAULT),
        unpruned_candidates=unpruned,
        metadata=info,
    )
    return ClusterResult(space, dict(pruned), how, distance)
