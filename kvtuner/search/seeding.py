"""First trials of a search: uniform configs, the exact knapsack front and the greedy allocation by e_o.

- Uniform: every pair that every group may take (the comparison points; over the cap too).
- Knapsack: `kvtuner.allocate` on the groups' summed single-layer KL, solved at the caps and every
  `KNAPSACK_SPACING` bits from the smallest config up to the largest cap (NSGA-II starts from the
  exact front of the additive model, and has to beat it).
- Greedy by e_o (the seed of earlier versions, kept as a baseline): start every group at its most
  precise pair, then repeatedly take the step (one group to a pair with fewer bits) with the least
  increase of summed e_o per budget bit saved; the seed for a cap is the first point under it.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from kvtuner.errors import ConfigError
from kvtuner.precision import PrecisionPair
from kvtuner.search.problem import Choices, SearchProblem
from kvtuner.space import SearchSpace

GREEDY_SPACING = 0.25  # bits between greedy seeds along the front
KNAPSACK_SPACING = 0.1  # bits between knapsack seeds along the front


def group_errors(
    space: SearchSpace, sensitivity: pd.DataFrame, column: str = "e_o"
) -> tuple[dict[PrecisionPair, float], ...]:
    """Per group: candidate pair -> `column` (e_o, or a single-layer table's kl) summed over the
    group's layers. `sensitivity` has columns layer, key_bits, value_bits and `column`."""
    table = {
        (int(r.layer), PrecisionPair(int(r.key_bits), int(r.value_bits))): float(getattr(r, column))
        for r in sensitivity.itertuples(index=False)
    }
    errors = []
    for group in space.groups:
        per_pair = {}
        for pair in group.candidates:
            missing = [layer for layer in group.layers if (layer, pair) not in table]
            if missing:
                raise ConfigError(
                    f"sensitivity table has no {column} for layer {missing[0]}, pair {pair.name}"
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
    while True:
        best = None
        for g, (cands, pair) in enumerate(zip(problem.candidates, current)):
            for lower in cands:
                saved = problem.cost(g, pair) - problem.cost(g, lower)
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


def knapsack_seeds(
    problem: SearchProblem,
    losses: Sequence[dict[PrecisionPair, float]],
    caps: Sequence[float],
    spacing: float = KNAPSACK_SPACING,
) -> list[tuple[Choices, float]]:
    """(config, cap) of the exact knapsack on the groups' summed losses (`group_errors` of a
    single-layer KL table) at each cap and every `spacing` bits from the smallest config up to
    the largest cap; distinct configs, each with the smallest cap it was found at."""
    from kvtuner.allocate import allocate, cap_grid

    costs = [{p: problem.cost(g, p) for p in cands} for g, cands in enumerate(problem.candidates)]
    grid = cap_grid(problem.min_bits(), max(caps), spacing) + list(caps)
    seeds: list[tuple[Choices, float]] = []
    for cap in sorted(set(grid)):
        found = allocate(losses, costs, cap)
        if found is not None and all(found.pairs != known for known, _ in seeds):
            seeds.append((found.pairs, cap))
    return seeds


def knapsack_at(
    problem: SearchProblem, losses: Sequence[dict[PrecisionPair, float]], cap: float
) -> Choices | None:
    """The knapsack's config under exactly `cap` (None when nothing fits)."""
    from kvtuner.allocate import allocate

    costs = [{p: problem.cost(g, p) for p in cands} for g, cands in enumerate(problem.candidates)]
    found = allocate(losses, costs, cap)
    return None if found is None else found.pairs


def seed_configs(
    problem: SearchProblem,
    errors: Sequence[dict[PrecisionPair, float]] | None,
    caps: Sequence[float],
    losses: Sequence[dict[PrecisionPair, float]] | None = None,
) -> list[tuple[Choices, str]]:
    """(config, "uniform" | "knapsack" | "greedy"): every uniform config (over the cap too: they
    are the comparison points), the knapsack front when single-layer `losses` are known, then the
    greedy one per cap when e_o `errors` are known, without repeats."""
    seeds = [(c, "uniform") for c in uniform_seeds(problem)]

    def add(choices: Choices, kind: str) -> None:
        if all(choices != known for known, _ in seeds):
            seeds.append((choices, kind))

    if losses is not None:
        for choices, _ in knapsack_seeds(problem, losses, caps):
            add(choices, "knapsack")
    if errors is not None:
        for choices in greedy_seeds(problem, errors, caps):
            add(choices, "greedy")
    return seeds
