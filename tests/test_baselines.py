"""kvtuner.baselines on synthetic tables: every baseline stays under its cap, the knapsack wins
on its own objective."""

import pandas as pd
import pytest

from kvtuner.baselines import best_uniform_under, budget_bits, greedy_under, knapsack_under
from kvtuner.config import PrecisionConfig
from kvtuner.memory import ModelShape
from kvtuner.precision import PrecisionPair, candidate_pairs

SHAPE = ModelShape(num_layers=4, kv_heads=2, head_dim=64, windows=(32, None, 32, None))
BASE = PrecisionConfig.uniform("fp16", 4)


def tables():
    sens, kl = [], []
    for layer in range(4):
        weight = 3.0 if layer % 2 else 1.0  # the global layers are the sensitive ones
        for pair in candidate_pairs():
            e_o = weight * (3 * 2.0**-pair.key_bits + 2.0**-pair.value_bits)
            row = dict(layer=layer, key_bits=pair.key_bits, value_bits=pair.value_bits,
                       equivalent_bits=pair.equivalent_bits)  # fmt: skip
            sens.append({**row, "e_o": e_o, "e_k": 0.0, "e_v": 0.0})
            kl.append({**row, "kl": e_o**2})
    return pd.DataFrame(sens), pd.DataFrame(kl)


@pytest.mark.parametrize("budget", ["effective", "equivalent"])
def test_every_baseline_fits_its_cap_and_the_knapsack_minimises_the_sum(budget):
    sensitivity, layer_kl = tables()
    caps = (3.5, 4.5, 6.0)
    greedy = greedy_under(caps, sensitivity, BASE, SHAPE, budget, 1000)
    knapsack = knapsack_under(caps, layer_kl, BASE, SHAPE, budget, 1000)
    losses = {(int(r.layer), PrecisionPair(int(r.key_bits), int(r.value_bits))): r.kl
              for r in layer_kl.itertuples()}  # fmt: skip
    for cap in caps:
        name, uniform = best_uniform_under(cap, BASE, SHAPE, budget, 1000)
        for config in (uniform, greedy[cap], knapsack[cap]):
            assert budget_bits(config, SHAPE, budget, 1000) <= cap + 1e-9
        summed = {
            kind: sum(losses[(i, p)] for i, p in enumerate(config.layers))
            for kind, config in (
                ("greedy", greedy[cap]),
                ("knapsack", knapsack[cap]),
                ("uniform", uniform),
            )
        }
        assert summed["knapsack"] <= summed["greedy"] + 1e-12
        assert summed["knapsack"] <= summed["uniform"] + 1e-12


def test_effective_budget_spends_bits_on_the_layers_that_hold_the_most_tokens():
    """At 1000 tokens the two window-32 layers hold 3% of the bytes: raising them is almost free."""
    _, layer_kl = tables()
    flat = layer_kl.assign(kl=1.0 / layer_kl.equivalent_bits)  # every layer equally sensitive
    (config,) = knapsack_under((4.0,), flat, BASE, SHAPE, "effective", 1000).values()
    sliding = [config.layers[0], config.layers[2]]
    full = [config.layers[1], config.layers[3]]
    assert min(p.equivalent_bits for p in sliding) > max(p.equivalent_bits for p in full)


def test_no_uniform_config_under_a_tiny_cap():
    assert best_uniform_under(0.5, BASE, SHAPE) is None
