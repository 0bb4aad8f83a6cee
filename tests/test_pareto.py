"""kvtuner.pareto against a plain dominance check."""

import numpy as np
import pytest

from kvtuner.pareto import pareto_front, pareto_fronts


def dominated(points, i):
    return any(
        (points[j] <= points[i]).all() and (points[j] < points[i]).any()
        for j in range(len(points))
        if j != i
    )


@pytest.mark.parametrize("seed", range(5))
def test_front_is_exactly_the_non_dominated_rows(seed):
    points = np.random.default_rng(seed).integers(0, 6, size=(30, 2)).astype(float)
    expected = [i for i in range(len(points)) if not dominated(points, i)]
    assert pareto_front(points).tolist() == expected


def test_fronts_partition_the_rows_in_rank_order():
    points = np.array([[1, 5], [2, 2], [3, 3], [5, 1], [4, 4], [6, 6]], dtype=float)
    fronts = pareto_fronts(points)
    assert [f.tolist() for f in fronts] == [[0, 1, 3], [2], [4], [5]]
    assert pareto_front(np.empty((0, 2))).tolist() == []
