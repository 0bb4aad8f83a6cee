"""Pareto fronts, one function for every place that needs one (pruning, the pymoo backend, export).

Built on pymoo's non-dominated sorting (a dependency already): every column is minimised.
"""

from __future__ import annotations

import numpy as np


def pareto_fronts(points: np.ndarray) -> list[np.ndarray]:
    """Row indices of `points` `[n, objectives]` by non-dominated front: the first front, then
    the front of what is left, and so on (all columns minimised; equal points share a front)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    points = np.asarray(points, dtype=float)
    if len(points) == 0:
        return []
    return [np.sort(front) for front in NonDominatedSorting().do(points)]


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Row indices of the non-dominated rows of `points` (ascending)."""
    fronts = pareto_fronts(points)
    return fronts[0] if fronts else np.array([], dtype=int)
