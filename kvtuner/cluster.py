"""Inter-layer clustering: layers that react alike to quantization share one precision pair.

Layers are first split by their pruned candidate set (identical sets together). Within a set,
each layer is described by its e_o vector over that set's pairs (raw e_o, in the set's pair
order) and DBSCAN groups layers whose vectors are within `eps` (Euclidean); DBSCAN noise layers
become groups of one. A group's candidates are the set's pairs (all its layers share them).

`max_groups` picks eps instead: the smallest pairwise distance between layers of one set at
which at most that many groups form.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from kvtuner.errors import ConfigError
from kvtuner.precision import PrecisionPair
from kvtuner.prune import prune_table
from kvtuner.space import LayerGroup, SearchSpace

Pruned = Mapping[int, tuple[PrecisionPair, ...]]


def candidate_sets(pruned: Pruned) -> dict[tuple[PrecisionPair, ...], list[int]]:
    """Pruned candidate set -> its layers (ascending), sets in order of their first layer."""
    sets: dict[tuple[PrecisionPair, ...], list[int]] = {}
    for layer in sorted(pruned):
        sets.setdefault(tuple(pruned[layer]), []).append(layer)
    return sets


def profiles(
    table: pd.DataFrame, layers: Sequence[int], pairs: Sequence[PrecisionPair]
) -> np.ndarray:
    """e_o vectors `[len(layers), len(pairs)]`: row i is layer layers[i] over `pairs`."""
    wide = table.pivot(index="layer", columns=["key_bits", "value_bits"], values="e_o")
    return wide.loc[list(layers), [(p.key_bits, p.value_bits) for p in pairs]].to_numpy(dtype=float)


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


def cluster_layers(
    table: pd.DataFrame, pruned: Pruned, eps: float, min_samples: int = 2
) -> tuple[LayerGroup, ...]:
    """Groups over all layers: per candidate set, DBSCAN on the layers' e_o vectors; by first layer."""
    if eps <= 0:
        raise ConfigError(f"--eps must be positive; got {eps}")
    if min_samples < 1:
        raise ConfigError(f"--min-samples must be at least 1; got {min_samples}")
    groups = []
    for pairs, layers in candidate_sets(pruned).items():
        labels = dbscan_labels(profiles(table, layers, pairs), eps, min_samples)
        for label in sorted(set(labels)):
            members = tuple(layer for layer, lab in zip(layers, labels) if lab == label)
            groups.append(LayerGroup(members, pairs))
    return tuple(sorted(groups, key=lambda g: g.layers[0]))


def eps_for_max_groups(
    table: pd.DataFrame, pruned: Pruned, max_groups: int, min_samples: int = 2
) -> float:
    """The smallest eps at which at most `max_groups` groups form (searched over pairwise distances).

    ConfigError when even the largest distance cannot get there: layers with different pruned
    candidate sets never share a group.
    """
    sets = candidate_sets(pruned)
    if max_groups < len(sets):
        raise ConfigError(
            f"--max-groups {max_groups}: the layers have {len(sets)} different pruned candidate sets, "
            f"so at least {len(sets)} groups form; raise --max-groups or --tolerance"
        )
    distances = {0.0}
    for pairs, layers in sets.items():
        vectors = profiles(table, layers, pairs)
        diff = vectors[:, None, :] - vectors[None, :, :]
        distances.update(np.sqrt((diff**2).sum(-1))[np.triu_indices(len(layers), 1)].tolist())
    for distance in sorted(distances):
        # DBSCAN's neighbourhood is inclusive; a hair above the distance survives rounding
        eps = distance * (1 + 1e-9) + 1e-12
        if len(cluster_layers(table, pruned, eps, min_samples)) <= max_groups:
            return eps
    raise ConfigError(
        f"--max-groups {max_groups}: no eps reaches it with --min-samples {min_samples}; lower --min-samples"
    )


@dataclass(frozen=True)
class ClusterResult:
    """A search space and how it was found."""

    space: SearchSpace
    pruned: dict[int, tuple[PrecisionPair, ...]]
    eps: float
    eps_chosen: bool

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
    scheme: str = "per-token",
    group_size: int | None = None,
    residual_length: int = 0,
    tolerance: float = 0.0,
    eps: float = 0.05,
    min_samples: int = 2,
    max_groups: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ClusterResult:
    """Sensitivity table -> pruned pairs per layer -> DBSCAN groups -> SearchSpace."""
    if tolerance < 0:
        raise ConfigError(f"--tolerance must be >= 0; got {tolerance}")
    if max_groups is not None and max_groups < 1:
        raise ConfigError(f"--max-groups must be at least 1; got {max_groups}")
    pruned = prune_table(table, tolerance)
    if max_groups is not None:
        eps = eps_for_max_groups(table, pruned, max_groups, min_samples)
    groups = cluster_layers(table, pruned, eps, min_samples)
    unpruned = len({(int(k), int(v)) for k, v in zip(table.key_bits, table.value_bits)})
    info = {
        **dict(metadata or {}),
        "tolerance": tolerance,
        "eps": float(eps),
        "eps_chosen_for_max_groups": max_groups,
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
        group_size=group_size,
        residual_length=residual_length,
        unpruned_candidates=unpruned,
        metadata=info,
    )
    return ClusterResult(space, dict(pruned), eps, max_groups is not None)
