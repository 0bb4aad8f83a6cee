"""Exact allocation under a bit budget: the multiple-choice knapsack over layers.

Given, per layer, the loss each candidate pair causes when only that layer is quantized (the
single-layer KL of `kvtuner calibrate`) and the bits it costs (`kvtuner.memory.layer_costs`, or
equivalent bits), pick one pair per layer that minimises the summed loss with the summed cost under
the cap. This is what NVIDIA ModelOpt's KV-cache AutoQuantize solves (as a linear program); here it is
solved exactly as a 0/1 integer program (`scipy.optimize.milp`, HiGHS): a few dozen layers with up
to nine pairs each take milliseconds, so the whole front can be re-solved at any cap without
measuring anything again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtuner.precision import PrecisionPair

PerLayer = Sequence[Mapping[PrecisionPair, float]]
TOLERANCE = 1e-9


@dataclass(frozen=True)
class Allocation:
    """One pair per layer, its summed cost (bits) and summed loss, under `cap`."""

    cap: float
    pairs: tuple[PrecisionPair, ...]
    bits: float
    loss: float


def allocate(
    losses: PerLayer, costs: PerLayer, cap: float, order: Callable[[Any], Any] | None = None
) -> Allocation | None:
    """The pairs minimising sum(losses) with sum(costs) <= cap; None when even the cheapest is over.

    `losses[l]` and `costs[l]` map layer l's candidate pairs to numbers; a pair missing from
    `losses[l]` is not a candidate of layer l. Among equal losses the cheaper allocation wins.
    Candidates need not be PrecisionPairs (engine choices: `kvtuner.targets`) when `order` gives
    them a sort key.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    order = order or (lambda p: (-p.equivalent_bits, -p.key_bits))
    candidates = [sorted(layer, key=order) for layer in losses]
    if any(not c for c in candidates):
        raise ValueError("every layer needs at least one candidate pair")
    if sum(min(costs[i][p] for p in c) for i, c in enumerate(candidates)) > cap + TOLERANCE:
        return None
    loss = np.array([losses[i][p] for i, c in enumerate(candidates) for p in c], dtype=float)
    cost = np.array([costs[i][p] for i, c in enumerate(candidates) for p in c], dtype=float)
    sizes = [len(c) for c in candidates]
    choose = np.zeros((len(sizes), len(loss)))
    start = 0
    for row, size in enumerate(sizes):
        choose[row, start : start + size] = 1.0
        start += size
    # a tie-break far below any loss difference: the cheaper of two equally good allocations
    objective = loss + cost * 1e-9 * max(1.0, float(np.abs(loss).max()))
    result = milp(
        objective,
        integrality=np.ones(len(loss)),
        bounds=Bounds(0, 1),
        constraints=[
            LinearConstraint(choose, 1, 1),
            LinearConstraint(cost[None, :], -np.inf, cap + TOLERANCE),
        ],
    )
    if result.x is None:
        return None
    picked = np.round(result.x).astype(bool)
    pairs, start = [], 0
    for c in candidates:
        (index,) = np.flatnonzero(picked[start : start + len(c)])
        pairs.append(c[index])
        start += len(c)
    return Allocation(
        cap=cap, pairs=tuple(pairs), bits=float(cost[picked].sum()), loss=float(loss[picked].sum())
    )


def allocation_front(losses: PerLayer, costs: PerLayer, caps: Sequence[float]) -> list[Allocation]:
    """The distinct optimal allocations over `caps` (ascending), each kept at its smallest cap."""
    front: list[Allocation] = []
    for cap in sorted(caps):
        found = allocate(losses, costs, cap)
        if found is not None and all(found.pairs != a.pairs for a in front):
            front.append(found)
    return front


def cap_grid(low: float, high: float, step: float = 0.05) -> list[float]:
    """Caps from `low` to `high` every `step` bits (both ends included)."""
    count = int((high - low) / step + 1e-9)
    return [low + i * step for i in range(count + 1)] + (
        [high] if low + count * step < high else []
    )


def allocate_configs(
    losses: PerLayer,
    base: Any,
    shape: Any,
    caps: Sequence[float],
    *,
    budget: str = "effective",
    context: int = 4096,
    dtype_bits: int = 16,
) -> dict[float, Any]:
    """Per cap, the knapsack's PrecisionConfig (in `base`'s layout) or None when no config fits.

    `losses[l]` maps layer l's candidates to their single-layer KL; `shape` is the model's
    ModelShape; the cap is on `budget` bits (effective at `context`, or equivalent).
    """
    from kvtuner.memory import budget_costs, effective_bits

    costs = budget_costs(
        [sorted(layer) for layer in losses],
        base.layout,
        shape,
        budget=budget,
        context=context,
        dtype_bits=dtype_bits,
    )
    configs: dict[float, Any] = {}
    for cap in caps:
        found = allocate(losses, costs, cap)
        if found is None:
            configs[cap] = None
            continue
        config = base.with_layers(found.pairs)
        metadata = {
            "objective": "summed single-layer KL",
            "value": found.loss,
            "cap": cap,
            "budget": budget,
            "budget_context": context,
            "equivalent_bits": config.equivalent_bits,
            "effective_bits": effective_bits(found.pairs, base.layout, shape, context, dtype_bits),
            "found_by": "kvtuner allocate (exact knapsack over layers)",
        }
        configs[cap] = base.with_layers(found.pairs, metadata=metadata)
    return configs
