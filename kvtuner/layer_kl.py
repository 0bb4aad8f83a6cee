"""Single-layer KL: what quantizing one layer alone costs end to end, measured with the real cache.

For every layer and candidate pair, the model runs with that layer's KV cache at the pair and every
other layer exact (16 bits), and the KL of its next-token distributions to full precision is
measured (`kvtuner.evaluate.Evaluator`: the prefill is recorded once and replayed into each probe's
cache, so a probe costs one scored chunk). Summed over layers, these losses are the additive model
of a config's quality that `kvtuner allocate` optimises exactly; `additivity` checks how well the sum
ranks real configs (their joint KL on the same samples).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import pandas as pd
from tqdm.auto import tqdm

from kvtuner.config import PrecisionConfig
from kvtuner.evaluate import Evaluator
from kvtuner.precision import FULL_PRECISION, PrecisionPair

COLUMNS = ("layer", "key_bits", "value_bits", "equivalent_bits", "kl", "kl_stderr", "per_sample_kl")
DENSE = PrecisionPair(FULL_PRECISION, FULL_PRECISION)
Losses = list[dict[PrecisionPair, float]]


def probe(base: PrecisionConfig, layer: int, pair: PrecisionPair) -> PrecisionConfig:
    """`base`'s layout with every layer at 16 bits but `layer`, at `pair`."""
    layers = [DENSE] * base.num_layers
    layers[layer] = pair
    return base.with_layers(layers)


def layer_kl_table(
    evaluator: Evaluator,
    base: PrecisionConfig,
    candidates: Mapping[int, Sequence[PrecisionPair]],
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per (layer, candidate pair): single-layer KL, its standard error, per-sample values."""
    jobs = [(layer, pair) for layer in sorted(candidates) for pair in candidates[layer]]
    rows = []
    for layer, pair in tqdm(jobs, desc="single-layer KL", unit="probe", disable=not progress):
        result = evaluator.evaluate(probe(base, layer, pair))
        rows.append(
            {
                "layer": layer,
                "key_bits": pair.key_bits,
                "value_bits": pair.value_bits,
                "equivalent_bits": pair.equivalent_bits,
                "kl": result.kl,
                "kl_stderr": result.kl_stderr,
                "per_sample_kl": " ".join(f"{x:.6g}" for x in result.per_sample_kl),
            }
        )
    return pd.DataFrame(rows, columns=list(COLUMNS))


def losses(table: pd.DataFrame, num_layers: int) -> Losses:
    """Per layer: candidate pair -> single-layer KL, from a `layer_kl_table` (or layer_kl.csv)."""
    out: Losses = [{} for _ in range(num_layers)]
    for row in table.itertuples(index=False):
        out[int(row.layer)][PrecisionPair(int(row.key_bits), int(row.value_bits))] = float(row.kl)
    return out


def random_configs(
    candidates: Losses, count: int, seed: int = 0
) -> list[tuple[PrecisionPair, ...]]:
    """`count` distinct configs, each layer's pair drawn uniformly among its candidates."""
    rng = random.Random(seed)
    configs: list[tuple[PrecisionPair, ...]] = []
    for _ in range(50 * count):
        if len(configs) >= count:
            break
        config = tuple(rng.choice(sorted(layer)) for layer in candidates)
        if config not in configs:
            configs.append(config)
    return configs


def additivity(
    evaluator: Evaluator,
    base: PrecisionConfig,
    layer_losses: Losses,
    count: int,
    *,
    seed: int = 0,
    progress: bool = True,
) -> pd.DataFrame:
    """Random configs: the sum of their layers' single-layer KL beside their joint KL."""
    from kvtuner.search.problem import layers_key

    rows = []
    configs = random_configs(layer_losses, count, seed)
    for pairs in tqdm(configs, desc="additivity", unit="config", disable=not progress):
        result = evaluator.evaluate(base.with_layers(pairs))
        rows.append(
            {
                "layers": layers_key(pairs),
                "equivalent_bits": sum(p.equivalent_bits for p in pairs) / len(pairs),
                "summed_kl": sum(layer_losses[i][p] for i, p in enumerate(pairs)),
                "joint_kl": result.kl,
                "joint_kl_stderr": result.kl_stderr,
            }
        )
    return pd.DataFrame(rows)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    x, y = pd.Series(list(a), dtype=float), pd.Series(list(b), dtype=float)
    return float(x.rank().corr(y.rank()))
