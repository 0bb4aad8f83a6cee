"""The search problem: one categorical choice per layer group, equivalent bits under a cap.

Both backends go through `SearchProblem`: Optuna names each choice `g<i>` with the pair names as
categories; pymoo uses the index into the group's candidates, ordered from most to fewest bits.
A per-layer assignment is keyed by a compact string (`K8V4x5 KV8 K8V4x12`) so that a config is
evaluated once whatever group choices produced it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass

from kvtuner.errors import ConfigError
from kvtuner.precision import PrecisionPair, equivalent_bits, parse_pair
from kvtuner.space import SearchSpace

Choices = tuple[PrecisionPair, ...]


def layers_key(pairs: Sequence[PrecisionPair]) -> str:
    """Run-length string of per-layer pairs: `[KV8, KV8, K8V4]` -> `KV8x2 K8V4`."""
    runs = []
    for pair, group in itertools.groupby(pairs):
        count = len(list(group))
        runs.append(pair.name if count == 1 else f"{pair.name}x{count}")
    return " ".join(runs)


def parse_layers_key(text: str) -> list[PrecisionPair]:
    """Inverse of `layers_key`."""
    pairs: list[PrecisionPair] = []
    for run in text.split():
        name, _, count = run.partition("x")
        pair = parse_pair(name)
        if pair is None or (count and not count.isdigit()):
            raise ConfigError(f"'{run}' is not a run of precision pairs like K8V4x5")
        pairs.extend([pair] * (int(count) if count else 1))
    return pairs


@dataclass(frozen=True)
class SearchProblem:
    """`space` plus the bit cap every evaluated config should respect (the search's constraint).

    `costs[g][pair]`: the bits group g adds to the budget at `pair` (the sum over its layers of
    `kvtuner.memory.budget_costs`); None counts the paper's equivalent bits. `group_errors[g][pair]`,
    when known (the group's summed single-layer KL, else e_o), guides the repair of over-cap
    proposals; without it the repair lowers a random group.
    """

    space: SearchSpace
    cap: float
    group_errors: tuple[dict[PrecisionPair, float], ...] | None = None
    costs: tuple[dict[PrecisionPair, float], ...] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Optuna parameter names, one per group."""
        return tuple(f"g{i}" for i in range(len(self.space.groups)))

    @property
    def candidates(self) -> tuple[tuple[PrecisionPair, ...], ...]:
        """Each group's candidates, most bits first (ties: more key bits first)."""
        return tuple(
            tuple(sorted(g.candidates, key=lambda p: (-p.equivalent_bits, -p.key_bits)))
            for g in self.space.groups
        )

    def layers(self, choices: Sequence[PrecisionPair]) -> list[PrecisionPair]:
        return self.space.assign(choices)

    def key(self, choices: Sequence[PrecisionPair]) -> str:
        return layers_key(self.layers(choices))

    def bits(self, choices: Sequence[PrecisionPair]) -> float:
        """The budget's bits of a config: summed group costs, or equivalent bits."""
        if self.costs is None:
            return equivalent_bits(self.layers(choices))
        return sum(cost[pair] for cost, pair in zip(self.costs, choices))

    def cost(self, group: int, pair: PrecisionPair) -> float:
        """What group `group` adds to the budget at `pair`."""
        if self.costs is None:
            return (
                len(self.space.groups[group].layers) * pair.equivalent_bits / self.space.num_layers
            )
        return self.costs[group][pair]

    def feasible(self, choices: Sequence[PrecisionPair]) -> bool:
        return self.bits(choices) <= self.cap + 1e-9

    def min_bits(self) -> float:
        """Budget bits of the smallest config in the space."""
        return sum(min(self.cost(g, p) for p in cands) for g, cands in enumerate(self.candidates))

    def params(self, choices: Sequence[PrecisionPair]) -> dict[str, str]:
        return {name: pair.name for name, pair in zip(self.names, choices)}

    def from_params(self, params: dict[str, str]) -> Choices:
        return tuple(parse_pair(params[name]) for name in self.names)  # type: ignore[misc]

    def indices(self, choices: Sequence[PrecisionPair]) -> list[int]:
        return [cands.index(pair) for cands, pair in zip(self.candidates, choices)]

    def from_indices(self, indices: Sequence[int]) -> Choices:
        return tuple(cands[int(i)] for cands, i in zip(self.candidates, indices))

    def random(self, rng: random.Random) -> Choices:
        return tuple(rng.choice(cands) for cands in self.candidates)

    def repair(self, choices: Sequence[PrecisionPair], rng: random.Random) -> Choices:
        """Lower groups one step at a time until under the cap: the cheapest error per bit saved first."""
        current = list(choices)
        while not self.feasible(current):
            steps = []
            for g, (cands, pair) in enumerate(zip(self.candidates, current)):
                lower = [p for p in cands if p.equivalent_bits < pair.equivalent_bits]
                if not lower:
                    continue
                nxt = lower[0]  # the next pair down (candidates are sorted by bits)
                saved = self.cost(g, pair) - self.cost(g, nxt)
                if self.group_errors is None:
                    cost = rng.random()
                else:
                    errors = self.group_errors[g]
                    cost = (errors.get(nxt, 0.0) - errors.get(pair, 0.0)) / saved
                steps.append((cost, g, nxt))
            if not steps:
                break
            _, g, nxt = min(steps, key=lambda s: s[0])
            current[g] = nxt
        return tuple(current)


def group_costs(
    space: SearchSpace, layer_costs: Sequence[dict[PrecisionPair, float]]
) -> tuple[dict[PrecisionPair, float], ...]:
    """Per group: candidate pair -> the sum of its layers' costs (`kvtuner.memory.budget_costs`)."""
    return tuple(
        {pair: sum(layer_costs[layer][pair] for layer in group.layers) for pair in group.candidates}
        for group in space.groups
    )
