"""First trials of a search: every uniform config in the space and a greedy allocation by e_o per cap.

Greedy allocation: start every group at its most precise pair, then repeatedly take the step (one
group to a pair with fewer bits) with the least increase of summed e_o per bit saved. A group's
e_o is the sum over its layers, and bits saved count its layers, so larger groups weigh more.
The path runs down to the smallest config; the seed for a cap is the first point under it, and
more seeds are taken every 0.25 bits so that NSGA-II starts from good configs all along the front.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from kvtuner.errors import ConfigError
from kvtuner.precision import PrecisionPair
from kvtuner.search.problem import Choices, SearchProblem
from kvtuner.space import SearchSpace

GREEDY_SPACING = 0.25  # bits between greedy seeds along the front


def group_errors(
    space: SearchSpace, sensitivity: pd.DataFrame
) -> tuple[dict[PrecisionPair, float], ...]:
    """Per group: candidate pair -> e_o summed over the group's layers, from a sensitivity table.

    `sensitivity` has columns layer, key_bits, value_bits, e_o (one row per layer and pair).
    """
    table = {
        (int(r.layer), PrecisionPair(int(r.key_bits), int(r.value_bits))): float(r.e_o)
        for r in sensitivity.itertuples(index=False)
    }
    errors = []
    for group in space.groups:
        per_pair = {}
        for pair in group.candidates:
            missing = [layer for layer in group.layers if (layer, pair) not in table]
            if missing:
                raise ConfigError(
                    f"sensitivity table has no e_o for layer {missing[0]}, pair {pair.name}"
                )
            per_pair[pair] = sum(table[(layer, pair)] for layer in group.layers)
        errors.append(per_pair)
    return tuple(errors)


def uniform_seeds(problem: SearchProblem) -> list[Choices]:
    """One config per pair that every group may take (KV8, K8V4, ...), most bits first."""
    shared = set(problem.candidates[0]).intersection(*problem.candidates[1:])
    pairs = sorted(shared, key=lambda p: (-p.equivalent_bits, -p.key_bits))
    return [tuple([pair] * len(problem.candidates)) for pair in pairs]


def greedy_path(
    problem: SearchProblem, errors: Sequence[dict[PrecisionPair, float]]
) -> list[Choices]:
    """Configs from the most precise to the smallest, one greedy step at a time (bits decrease)."""
    current = [cands[0] for cands in problem.candidates]
    path = [tuple(current)]
    sizes = [len(g.layers) for g in problem.space.groups]
    while True:
        best = None
        for g, (cands, pair) in enumerate(zip(problem.candidates, current)):
            for lower in cands:
                saved = sizes[g] * (pair.equivalent_bits - lower.equivalent_bits)
                if saved <= 0:
                    continue
                ratio = (errors[g][lower] - errors[g][pair]) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, g, lower)
        if best is None:
            return path
        current[best[1]] = best[2]
        path.append(tuple(current))


def greedy_seeds(
    problem: SearchProblem,
    errors: Sequence[dict[PrecisionPair, float]],
    caps: Sequence[float],
    spacing: float = GREEDY_SPACING,
) -> list[Choices]:
    """The first greedy-path config under each cap, and under every `spacing` bits from the
    smallest config up to the largest cap (an initial population spread along the front)."""
    path = greedy_path(problem, errors)
    levels = set(caps)
    if spacing > 0:
        low, high = problem.min_bits(), max(caps)
        levels |= {low + i * spacing for i in range(int((high - low) / spacing + 1e-9) + 1)}
    seeds: list[Choices] = []
    for level in sorted(levels):
        under = next((c for c in path if problem.bits(c) <= level + 1e-9), None)
        if under is not None and under not in seeds:
            seeds.append(under)
    return seeds


def seed_configs(
    problem: SearchProblem,
    errors: Sequence[dict[PrecisionPair, float]] | None,
    caps: Sequence[float],
) -> list[tuple[Choices, str]]:
    """(config, "uniform" | "greedy"): every uniform config (over the cap too: they are the
    comparison points), then the greedy one per cap when e_o is known, without repeats."""
    seeds = [(c, "uniform") for c in uniform_seeds(problem)]
    if errors is not None:
        for choices in greedy_seeds(problem, errors, caps):
            if all(choices != known for known, _ in seeds):
                seeds.append((choices, "greedy"))
    return seeds
