"""The README's result blocks besides the per-model tables, for scripts/reproduce.py.

- `calibration_summary`: per model and scheme, e_o and single-layer KL ranges, how well e_o ranks
  layers and how well single-layer KLs add up, and the search space sizes, read from the shipped
  `calibration/<model>/<scheme>/` files (no model run).
- `near_lossless_summary`: per model and scheme and method, the fewest bits with held-out KL <= 0.05,
  from the saved ablation CSVs.
- `bench_headline`: one `kvtuner bench` run, a config's cache against the dense cache side by side.
Each returns the markdown that goes between the block's README markers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import yaml

from kvtuner.bench import run_bench
from kvtuner.calibrate import load_sensitivity
from kvtuner.config import PrecisionConfig
from kvtuner.models import load_model

MIB = 2**20
NEAR_LOSSLESS = 0.05
METHODS = ("uniform", "greedy", "knapsack", "search")


def calibration_summary(root: Path, models: Sequence[str], schemes: Sequence[str]) -> str:
    lines = [
        "| model / scheme | e_o at KV2 (layers) | single-layer KL at KV2 | Spearman e_o vs KL (across layers) | "
        "additivity: Spearman (joint / summed) | seconds | space: all pairs -> Pareto -> groups |",
        "|---|---|---|---|---|---:|---|",
    ]
    for model in models:
        for scheme in schemes:
            folder = root / model / scheme
            table, meta = load_sensitivity(folder / "sensitivity.csv")
            kv2 = table[(table.key_bits == 2) & (table.value_bits == 2)].e_o
            kl = meta.get("layer_kl") or {}
            layer_kl = (
                pd.read_csv(folder / "layer_kl.csv")
                if (folder / "layer_kl.csv").is_file()
                else None
            )
            kl2 = (
                layer_kl[(layer_kl.key_bits == 2) & (layer_kl.value_bits == 2)].kl
                if layer_kl is not None
                else pd.Series(dtype=float)
            )
            space = yaml.safe_load((folder / "space.yaml").read_text(encoding="utf-8"))
            smeta = space["metadata"]
            additivity = (
                f"{kl['spearman_summed_joint']:.2f} ({kl['joint_over_summed']:.2f})"
                if "spearman_summed_joint" in kl
                else "-"
            )
            across = kl.get("spearman_e_o_kl_across_layers")
            lines.append(
                f"| {model} / {scheme} | {kv2.min():.3g} - {kv2.max():.3g} | "
                f"{_range(kl2)} | {across if across is not None else '-'} | {additivity} | "
                f"{meta.get('seconds', float('nan')):.0f} | 10^{space['log10_unpruned_size']:.1f} -> "
                f"10^{smeta['log10_pruned_size']:.1f} -> {space['size']:,} ({len(space['groups'])} groups) |"
            )
    return "\n".join(lines)


def _range(values: pd.Series) -> str:
    return f"{values.min():.2g} - {values.max():.2g}" if len(values) else "-"


def near_lossless_summary(out: Path, models: Sequence[str], schemes: Sequence[str]) -> str:
    """Per model, scheme and method: the fewest effective (and equivalent) bits whose held-out KL
    is at most 0.05, among the configs the ablation measured (uniform ones at every bit width)."""
    lines = [
        f"| model / scheme | {' | '.join(METHODS)} |",
        "|---|" + "---|" * len(METHODS),
    ]
    for model in models:
        for scheme in schemes:
            path = out / f"ablation_{model}_{scheme}.csv"
            if not path.is_file():
                continue
            frame = pd.read_csv(path)
            cells = []
            for method in METHODS:
                part = frame[(frame.method == method) & (frame.kl <= NEAR_LOSSLESS)]
                if part.empty:
                    cells.append("-")
                    continue
                best = part.sort_values(["effective_bits", "kl"]).iloc[0]
                cells.append(
                    f"{best.effective_bits:.2f} eff. / {best.equivalent_bits:.2f} equiv. "
                    f"(KL {best.kl:.3f})"
                )
            lines.append(f"| {model} / {scheme} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_headline(
    model: str, spec: str, *, context: int, new_tokens: int, rounds: int, log: Callable[[str], None]
) -> str:
    loaded = load_model(model)
    config = PrecisionConfig.uniform(spec, loaded.num_layers)
    log(f"{model}: bench {spec} at {context} tokens, {rounds} rounds of {new_tokens} tokens")
    result = run_bench(
        loaded.model,
        loaded.tokenizer,
        config,
        context=context,
        new_tokens=new_tokens,
        rounds=rounds,
        peer_bits=0,
        progress=lambda message: log(f"  bench {message}"),
    )
    ours, dense = result["rows"][0], result["rows"][1]
    tokens = context + new_tokens
    return "\n".join(
        [
            f"| cache | KV bytes at {tokens} tokens | decode tokens/s | peak memory above start |",
            "|---|---:|---:|---:|",
            f"| kvtuner {spec} ({config.scheme}) | {ours['kv_bytes'] / MIB:.1f} MiB "
            f"({result['memory_ratio']:.3f}x) | {ours['tokens_per_s']:.2f} | "
            f"{ours['peak_memory_bytes'] / MIB:.0f} MiB |",
            f"| dense DynamicCache | {dense['kv_bytes'] / MIB:.1f} MiB | "
            f"{dense['tokens_per_s']:.2f} | {dense['peak_memory_bytes'] / MIB:.0f} MiB |",
            "",
            f"Speed ratio **{result['speed_ratio']:.2f}x** the dense cache at "
            f"{result['memory_ratio']:.3f}x of its KV bytes ({result['effective_bits']:.1f} effective "
            f"bits, {result['dtype']}); greedy tokens agree with the dense cache's for "
            f"{result['greedy_agreement']:.0%} of the {new_tokens + 1} generated tokens.",
        ]
    )
