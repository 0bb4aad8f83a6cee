"""kvtuner.allocate: the exact knapsack against brute force, and the front over caps."""

import itertools
import random

import pytest

from kvtuner.allocate import allocate, allocation_front, cap_grid
from kvtuner.precision import PrecisionPair, candidate_pairs

PAIRS = candidate_pairs()


def random_instance(layers: int, seed: int):
    rng = random.Random(seed)
    losses, costs = [], []
    for _ in range(layers):
        pairs = rng.sample(PAIRS, rng.randint(2, 5))
        weight = rng.choice([1.0, 0.2, 3.0])  # layers of different sizes, as sliding windows make
        costs.append({p: weight * p.equivalent_bits for p in pairs})
        losses.append({p: rng.random() / p.equivalent_bits**2 for p in pairs})
    return losses, costs


def brute_force(losses, costs, cap):
    best = None
    for choice in itertools.product(*[sorted(layer) for layer in losses]):
        bits = sum(costs[i][p] for i, p in enumerate(choice))
        if bits > cap + 1e-9:
            continue
        loss = sum(losses[i][p] for i, p in enumerate(choice))
        if best is None or loss < best[0] - 1e-12:
            best = (loss, bits, choice)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_is_exact(seed):
    losses, costs = random_instance(5, seed)
    cheapest = sum(min(c.values()) for c in costs)
    dearest = sum(max(c.values()) for c in costs)
    for cap in (cheapest, (cheapest + dearest) / 2, cheapest + 0.3 * (dearest - cheapest), dearest):
        found = allocate(losses, costs, cap)
        expected = brute_force(losses, costs, cap)
        assert found is not None and found.bits <= cap + 1e-9
        assert found.loss == pytest.approx(expected[0], abs=1e-12)
        assert found.bits == pytest.approx(sum(costs[i][p] for i, p in enumerate(found.pairs)))


def test_under_the_cheapest_config_there_is_none():
    losses, costs = random_instance(4, 0)
    cheapest = sum(min(c.values()) for c in costs)
    assert allocate(losses, costs, cheapest - 0.01) is None


def test_front_is_monotone_and_distinct():
    losses, costs = random_instance(8, 3)
    cheapest = sum(min(c.values()) for c in costs)
    dearest = sum(max(c.values()) for c in costs)
    front = allocation_front(losses, costs, cap_grid(cheapest, dearest, 0.5))
    assert len({a.pairs for a in front}) == len(front) > 3
    assert all(a.loss >= b.loss - 1e-12 for a, b in zip(front, front[1:]))
    assert all(a.bits <= a.cap + 1e-9 for a in front)


def test_equal_losses_take_the_cheaper_pair():
    kv8, kv4 = PrecisionPair(8, 8), PrecisionPair(4, 4)
    found = allocate([{kv8: 0.0, kv4: 0.0}], [{kv8: 8.0, kv4: 4.0}], 8.0)
    assert found.pairs == (kv4,)


def test_cap_grid_includes_both_ends():
    assert cap_grid(2.0, 2.3, 0.1) == pytest.approx([2.0, 2.1, 2.2, 2.3])
    assert cap_grid(2.0, 2.25, 0.1)[-1] == 2.25
