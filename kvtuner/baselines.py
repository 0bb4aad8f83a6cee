"""The configs a search is judged against, under a bit cap: uniform, greedy by e_o, exact knapsack.

- uniform: the same pair on every layer; under a cap, the most precise one that fits.
- greedy by e_o: from the most precise Pareto pair of every layer, repeatedly the step with the
  least e_o added per budget bit saved (what earlier versions seeded the search with).
- knapsack: `kvtuner.allocate` on the single-layer KL (NVIDIA ModelOpt's method), exact.
All take the budget of `kvtuner.memory.budget_costs` (effective bits at a context, or equivalent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import pandas as pd

from kvtuner.config import PrecisionConfig
from kvtuner.memory import ModelShape, budget_costs

UNIFORM = ("KV8", "K8V4", "KV4", "K4V2", "KV2")


def budget_bits(
    config: PrecisionConfig, shape: ModelShape, budget: str = "effective", context: int = 4096
) -> float:
    """What `config` costs on the budget's axis."""
    costs = budget_costs(
        [[p] for p in config.layers], config.layout, shape, budget=budget, context=context
    )
    return sum(cost[p] for cost, p in zip(costs, config.layers))


def uniform_configs(
    base: PrecisionConfig, names: Sequence[str] = UNIFORM
) -> dict[str, PrecisionConfig]:
    """Uniform configs in `base`'s layout, by name (KV8, K8V4, ...)."""
    from kvtuner.precision import parse_pair

    return {name: base.with_layers([parse_pair(name)] * base.num_layers) for name in names}


def best_uniform_under(
    cap: float,
    base: PrecisionConfig,
    shape: ModelShape,
    budget: str = "effective",
    context: int = 4096,
    names: Sequence[str] = UNIFORM,
) -> tuple[str, PrecisionConfig] | None:
    """The uniform config with the most bits under `cap` (None when none fits)."""
    fitting = [
        (budget_bits(config, shape, budget, context), name, config)
        for name, config in uniform_configs(base, names).items()
        if budget_bits(config, shape, budget, context) <= cap + 1e-9
    ]
    if not fitting:
        return None
    _, name, config = max(fitting, key=lambda item: item[0])
    return name, config


def greedy_under(
    caps: Sequence[float],
    sensitivity: pd.DataFrame,
    base: PrecisionConfig,
    shape: ModelShape,
    budget: str = "effective",
    context: int = 4096,
) -> dict[float, PrecisionConfig | None]:
    """Per cap, the greedy-by-e_o config over each layer's e_o-Pareto pairs (None when none fits)."""
    from kvtuner.prune import prune_table
    from kvtuner.search.problem import SearchProblem, group_costs
    from kvtuner.search.seeding import greedy_path, group_errors
    from kvtuner.space import SearchSpace

    pruned = prune_table(sensitivity)
    space = SearchSpace.per_layer(
        [pruned[i] for i in range(shape.num_layers)], model=base.model or "", **asdict(base.layout)
    )
    costs = budget_costs(
        [g.candidates for g in space.groups], base.layout, shape, budget=budget, context=context
    )
    problem = SearchProblem(space, cap=max(caps), costs=group_costs(space, costs))
    path = greedy_path(problem, group_errors(space, sensitivity))
    found: dict[float, PrecisionConfig | None] = {}
    for cap in caps:
        under = next((c for c in path if problem.bits(c) <= cap + 1e-9), None)
        found[cap] = None if under is None else base.with_layers(problem.layers(under))
    return found


def knapsack_under(
    caps: Sequence[float],
    layer_kl: pd.DataFrame,
    base: PrecisionConfig,
    shape: ModelShape,
    budget: str = "effective",
    context: int = 4096,
) -> dict[float, PrecisionConfig | None]:
    """Per cap, the exact knapsack on a single-layer KL table (None when nothing fits)."""
    from kvtuner.allocate import allocate_configs
    from kvtuner.layer_kl import losses

    return allocate_configs(
        losses(layer_kl, shape.num_layers), base, shape, caps, budget=budget, context=context
    )
