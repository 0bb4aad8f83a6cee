"""The README's result blocks besides the per-model tables, for scripts/reproduce.py.

- `calibration_summary`: per model and scheme, the e_o range at KV2, the DBSCAN eps and the search
  space sizes, read from the shipped `calibration/<model>/<scheme>/` files (no model run).
- `random_comparison`: the searched config under a cap against every uniform config under it and
  random layer-wise shuffles of its own pairs (`scripts/compare_random.py`).
- `bench_headline`: one `kvtuner bench` run, a config's cache against the dense cache side by side.
Each returns the markdown that goes between the block's README markers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import compare_random
import yaml

from kvtuner.bench import run_bench
from kvtuner.calibrate import load_sensitivity
from kvtuner.config import PrecisionConfig
from kvtuner.models import load_model

MIB = 2**20


def calibration_summary(root: Path, models: Sequence[str], schemes: Sequence[str]) -> str:
    lines = [
        "| model / scheme | e_o at KV2 (layers) | eps (groups) | space: all pairs -> Pareto -> groups |",
        "|---|---|---|---|",
    ]
    for model in models:
        for scheme in schemes:
            folder = root / model / scheme
            table, _ = load_sensitivity(folder / "sensitivity.csv")
            kv2 = table[(table.key_bits == 2) & (table.value_bits == 2)].e_o
            space = yaml.safe_load((folder / "space.yaml").read_text(encoding="utf-8"))
            meta = space["metadata"]
            lines.append(
                f"| {model} / {scheme} | {kv2.min():.3g} - {kv2.max():.3g} | {meta['eps']:.3f} "
                f"({len(space['groups'])}) | 10^{space['log10_unpruned_size']:.1f} -> "
                f"10^{meta['log10_pruned_size']:.1f} -> {space['size']:,} |"
            )
    return "\n".join(lines)


def random_comparison(model: str, cap: float, log: Callable[[str], None]) -> str:
    """The comparison table and its verdict lines."""
    args = compare_random.parse_args(["--model", model, "--cap", f"{cap:g}"])
    log(f"{model}: searched C{cap:g} against uniform and {args.random} random configs")
    return compare_random.render(compare_random.compare(args, progress=False))


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
