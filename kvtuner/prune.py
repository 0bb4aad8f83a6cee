"""Intra-layer pruning: in each layer keep only the precision pairs on the (bits, e_o) Pareto front.

Pair q dominates pair p when q costs fewer equivalent bits and its e_o is at most p's times
(1 + tolerance), or costs the same bits with strictly lower e_o. Dominated pairs are dropped:
spending more bits on p buys nothing (or, with a tolerance, less than that relative margin).
The cheapest pair with the lowest error at its bit width is never dominated, so no layer is left empty.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from kvtuner.pareto import pareto_front
from kvtuner.precision import PrecisionPair


def dominates(q: tuple[float, float], p: tuple[float, float], tolerance: float = 0.0) -> bool:
    """Whether (bits, error) `q` dominates `p` under a relative error `tolerance`."""
    q_bits, q_err = q
    p_bits, p_err = p
    if q_bits < p_bits:
        return q_err <= p_err * (1.0 + tolerance)
    return q_bits == p_bits and q_err < p_err


def pareto_pairs(
    errors: Mapping[PrecisionPair, float], tolerance: float = 0.0
) -> tuple[PrecisionPair, ...]:
    """The pairs of `errors` ({pair: e_o}) no other pair dominates, most bits first."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0; got {tolerance}")
    pairs = list(errors)
    points = np.array([[p.equivalent_bits, errors[p]] for p in pairs], dtype=float)
    front = [pairs[i] for i in pareto_front(points)]
    if tolerance > 0:  # a cheaper pair within the relative margin dominates too
        front = [
            p
            for p in front
            if not any(
                dominates((q.equivalent_bits, errors[q]), (p.equivalent_bits, errors[p]), tolerance)
                for q in front
                if q != p
            )
        ]
    return tuple(sorted(front, key=lambda p: (-p.equivalent_bits, -p.key_bits)))


def prune_table(
    table: pd.DataFrame, tolerance: float = 0.0
) -> dict[int, tuple[PrecisionPair, ...]]:
    """Per layer of a sensitivity table (layer, key_bits, value_bits, e_o): its Pareto pairs."""
    pruned: dict[int, tuple[PrecisionPair, ...]] = {}
    for layer, rows in table.groupby("layer", sort=True):
        errors = {
            PrecisionPair(int(k), int(v)): float(e)
            for k, v, e in zip(rows.key_bits, rows.value_bits, rows.e_o)
        }
        pruned[int(layer)] = pareto_pairs(errors, tolerance)
    return pruned
