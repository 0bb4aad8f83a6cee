"""SearchProblem encoding, repair under the cap, uniform and greedy seeds (no model needed)."""

from __future__ import annotations

import random

import pytest

from kvtuner.precision import parse_pair
from kvtuner.search.problem import SearchProblem, layers_key, parse_layers_key
from kvtuner.search.seeding import (
    greedy_path,
    greedy_seeds,
    group_errors,
    seed_configs,
    uniform_seeds,
)
from kvtuner.space import LayerGroup, SearchSpace

from .tiny import PRUNED, synthetic_sensitivity

P = parse_pair


def space(num_layers=6, sizes=(1, 2, 3)):
    layers = iter(range(num_layers))
    groups = tuple(LayerGroup(tuple(next(layers) for _ in range(n)), PRUNED) for n in sizes)
    return SearchSpace(model="m", scheme="per-token", num_layers=num_layers, groups=groups)


def test_layers_key_round_trip():
    pairs = [P("KV8"), P("KV8"), P("K8V4"), P("KV2"), P("KV2"), P("KV2"), P("fp16")]
    key = layers_key(pairs)
    assert key == "KV8x2 K8V4 KV2x3 fp16"
    assert parse_layers_key(key) == pairs


def test_encoding_round_trips_and_counts_bits():
    problem = SearchProblem(space(), cap=4.0)
    choices = (P("KV8"), P("KV4"), P("KV2"))
    assert problem.from_params(problem.params(choices)) == choices
    assert problem.from_indices(problem.indices(choices)) == choices
    assert problem.bits(choices) == pytest.approx((8 + 2 * 4 + 3 * 2) / 6)
    assert problem.min_bits() == 2.0
    assert problem.candidates[0][0] == P("KV8") and problem.candidates[0][-1] == P("KV2")


@pytest.mark.parametrize("cap", [2.0, 2.5, 3.0, 4.5, 6.0])
def test_repair_lands_under_the_cap(cap):
    problem = SearchProblem(space(), cap=cap)
    rng = random.Random(0)
    for _ in range(50):
        repaired = problem.repair(problem.random(rng), rng)
        assert problem.bits(repaired) <= cap + 1e-9


def test_repair_lowers_the_cheapest_error_per_bit_first():
    sp = space(num_layers=2, sizes=(1, 1))
    errors = group_errors(sp, synthetic_sensitivity(2))  # layer 1 is twice as sensitive
    problem = SearchProblem(sp, cap=7.0, group_errors=errors)
    repaired = problem.repair((P("KV8"), P("KV8")), random.Random(0))
    assert repaired == (P("K8V4"), P("KV8"))


def test_uniform_seeds_are_the_shared_pairs():
    sp = SearchSpace(
        model="m",
        scheme="per-token",
        num_layers=2,
        groups=(LayerGroup((0,), PRUNED), LayerGroup((1,), (P("KV8"), P("K8V4"), P("KV4")))),
    )
    problem = SearchProblem(sp, cap=8.0)
    assert [c[0].name for c in uniform_seeds(problem)] == ["KV8", "K8V4", "KV4"]


def test_greedy_path_descends_and_prefers_values_and_robust_layers():
    sp = space()
    errors = group_errors(sp, synthetic_sensitivity(6))
    problem = SearchProblem(sp, cap=8.0, group_errors=errors)
    path = greedy_path(problem, errors)
    bits = [problem.bits(c) for c in path]
    assert bits[0] == 8.0 and bits[-1] == 2.0
    assert all(a > b for a, b in zip(bits, bits[1:]))
    # keys weigh 3x values in the synthetic table: the first step halves value bits, not key bits
    assert all(c.key_bits == 8 for c in path[1])
    seeds = greedy_seeds(problem, errors, caps=(3.0, 3.5, 4.0, 6.0), spacing=0)
    assert len(seeds) == 4
    for cap, seed in zip((3.0, 3.5, 4.0, 6.0), seeds):
        assert cap - 0.5 < problem.bits(seed) <= cap
    spread = greedy_seeds(problem, errors, caps=(3.0, 6.0), spacing=0.25)
    assert set(seeds[::3]) <= set(spread)
    assert [problem.bits(c) for c in spread] == sorted(problem.bits(c) for c in spread)
    assert len(spread) >= 6 and problem.bits(spread[0]) == 2.0


def test_greedy_beats_uniform_on_the_proxy_at_equal_bits():
    """On the e_o proxy, greedy at a cap is at least as good as any uniform config under it."""
    sp = space()
    table = synthetic_sensitivity(6)
    errors = group_errors(sp, table)
    problem = SearchProblem(sp, cap=8.0, group_errors=errors)

    def proxy(choices):
        return sum(errors[g][pair] for g, pair in enumerate(choices))

    for cap in (3.0, 4.0, 6.0):
        (greedy,) = greedy_seeds(problem, errors, caps=(cap,), spacing=0)
        uniform = [c for c in uniform_seeds(problem) if problem.bits(c) <= cap]
        assert proxy(greedy) <= min(proxy(c) for c in uniform) + 1e-12


def test_seed_configs_put_uniform_first():
    sp = space()
    errors = group_errors(sp, synthetic_sensitivity(6))
    problem = SearchProblem(sp, cap=6.0, group_errors=errors)
    seeds = seed_configs(problem, errors, caps=(3.5, 4.0))
    kinds = [kind for _, kind in seeds]
    assert [c[0] for c, _ in seeds[:5]] == [P(n) for n in ("KV8", "K8V4", "KV4", "K4V2", "KV2")]
    assert kinds == ["uniform"] * 5 + ["greedy"] * (len(seeds) - 5) and len(seeds) >= 6
    assert len({c for c, _ in seeds}) == len(seeds)
    assert [c for c, _ in seed_configs(problem, None, caps=(3.5,))] == uniform_seeds(problem)
