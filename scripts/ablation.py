#!/usr/bin/env python
"""Ablation on held-out text: uniform, greedy by e_o, exact knapsack and the search, per cap.

    python scripts/ablation.py --model gemma-3-270m --scheme per-token

For every cap: the best uniform config under it, the greedy allocation by e_o, the knapsack on
single-layer KL (`kvtuner allocate`) and the searched config (`searched_configs/<model>/<scheme>/
kvtuner_c<cap>.yaml`), all scored on the same held-out samples (the shipped held-out text, which
neither calibration nor search ever read), with the paired difference to the knapsack and its
standard error. Then the near-lossless point of each method: the fewest bits with KL <= 0.05.
Writes `<out>/ablation_<model>_<scheme>.csv` and `.md`, prints the markdown.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
NEAR_LOSSLESS = 0.05
METHODS = ("uniform", "greedy", "knapsack", "search")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def candidates(
    loaded: Any, scheme: str, caps: tuple[float, ...], calibration: Path, configs: Path,
    budget: str, context: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """(cap, method, label, config) rows; a method with no config under a cap is left out."""
    from kvtuner.baselines import best_uniform_under, greedy_under, knapsack_under
    from kvtuner.calibrate import base_config, load_layer_kl, load_sensitivity
    from kvtuner.compat import model_shape
    from kvtuner.config import load_config
    from kvtuner.search.export import config_filename

    folder = calibration / loaded.name / scheme
    sensitivity, meta = load_sensitivity(folder / "sensitivity.csv")
    base = base_config(meta)
    shape = model_shape(loaded.model.config)
    greedy = greedy_under(caps, sensitivity, base, shape, budget, context)
    layer_kl = load_layer_kl(folder, shape.num_layers)
    knapsack = (
        knapsack_under(caps, layer_kl, base, shape, budget, context) if layer_kl is not None else {}
    )
    rows = []
    for cap in caps:
        uniform = best_uniform_under(cap, base, shape, budget, context)
        if uniform is not None:
            rows.append(
                {"cap": cap, "method": "uniform", "label": uniform[0], "config": uniform[1]}
            )
        for method, found in (("greedy", greedy.get(cap)), ("knapsack", knapsack.get(cap))):
            if found is not None:
                rows.append({"cap": cap, "method": method, "label": method, "config": found})
        path = configs / loaded.name / scheme / config_filename(cap)
        if path.is_file():
            searched = load_config(path, num_layers=shape.num_layers, scheme=scheme)
            rows.append({"cap": cap, "method": "search", "label": "search", "config": searched})
    return rows


def measure(args: argparse.Namespace, loaded: Any = None, evaluator: Any = None) -> pd.DataFrame:
    """The ablation frame: one row per (cap, method) with bits, held-out KL and the paired
    difference to the knapsack. `loaded` and `evaluator` (held-out samples) may be shared."""
    from kvtuner.evaluate import EvalProtocol, Evaluator, eval_samples, protocol_for
    from kvtuner.models import load_model

    loaded = loaded or load_model(args.model)
    if evaluator is None:
        base = protocol_for(loaded.model.config)
        protocol = EvalProtocol(base.context, args.continuation, base.chunk)
        samples = eval_samples(loaded.tokenizer, None, args.samples, protocol, seed=args.seed)
        evaluator = Evaluator(loaded.model, samples, protocol, progress=False)
    rows = candidates(loaded, args.scheme, args.caps, args.calibration, args.configs, args.budget,
                      args.context)  # fmt: skip
    return score(rows, loaded, evaluator, args.scheme, args.budget, args.context)


def score(
    rows: list[dict[str, Any]], loaded: Any, evaluator: Any, scheme: str, budget: str,
    context: int, measured: dict[str, Any] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """Evaluate each row's config once (`measured` caches results by layers key and layout)."""
    from kvtuner.baselines import budget_bits
    from kvtuner.compat import model_shape
    from kvtuner.search.problem import layers_key

    shape = model_shape(loaded.model.config)
    measured = {} if measured is None else measured
    for row in rows:
        config = row["config"]
        key = f"{layers_key(config.layers)} {config.layout}"
        if key not in measured:
            log(
                f"{loaded.name} {scheme} cap {row['cap']:g} {row['method']} ({layers_key(config.layers)})"
            )
            measured[key] = evaluator.evaluate(config)
        result = measured[key]
        row.update(
            model=loaded.name,
            scheme=scheme,
            layers=layers_key(config.layers),
            equivalent_bits=config.equivalent_bits,
            effective_bits=config.effective_bits(shape, context),
            budget_bits=budget_bits(config, shape, budget, context),
            kl=result.kl,
            kl_stderr=result.kl_stderr,
            ppl=result.ppl,
            per_sample=result.per_sample_kl,
        )
    frame = pd.DataFrame(rows)
    for _, part in frame.groupby("cap"):
        knap = part[part.method == "knapsack"]
        if knap.empty:
            continue
        reference = knap.iloc[0].per_sample
        for index, row in part.iterrows():
            diffs = [a - b for a, b in zip(row.per_sample, reference)]
            frame.loc[index, "diff_vs_knapsack"] = statistics.fmean(diffs)
            frame.loc[index, "diff_stderr"] = (
                statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
            )
    return frame


def verdict(row: pd.Series) -> str:
    """'better', 'worse' or 'tie' against the knapsack: a paired difference inside one s.e. is a tie."""
    if row.method == "knapsack" or pd.isna(row.get("diff_vs_knapsack")):
        return ""
    if abs(row.diff_vs_knapsack) <= row.diff_stderr:
        return "tie"
    return "better" if row.diff_vs_knapsack < 0 else "worse"


def near_lossless(frame: pd.DataFrame, threshold: float = NEAR_LOSSLESS) -> pd.DataFrame:
    """Per method: the fewest budget bits with KL <= threshold among the configs measured."""
    rows = []
    for method in METHODS:
        part = frame[(frame.method == method) & (frame.kl <= threshold)]
        if part.empty:
            rows.append({"method": method})
            continue
        best = part.sort_values(["budget_bits", "kl"]).iloc[0]
        rows.append({key: best[key] for key in ("method", "label", "budget_bits", "effective_bits",
                                                "equivalent_bits", "kl", "kl_stderr")})  # fmt: skip
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, budget: str, context: int) -> str:
    axis = f"effective bits at {context} tokens" if budget == "effective" else "equivalent bits"
    lines = [
        f"| cap ({axis}) | method | config | eff. bits | equiv. bits | KL ± s.e. | vs knapsack (paired) |",
        "|---:|---|---|---:|---:|---:|---|",
    ]
    for row in frame.sort_values(
        ["cap", "method"], key=lambda c: c.map(_order) if c.name == "method" else c
    ).itertuples():
        diff = ""
        if row.method != "knapsack" and not pd.isna(getattr(row, "diff_vs_knapsack", float("nan"))):
            diff = f"{row.diff_vs_knapsack:+.4f} ± {row.diff_stderr:.4f} ({verdict(pd.Series(row._asdict()))})"
        lines.append(
            f"| {row.cap:g} | {row.method} | {row.label} | {row.effective_bits:.2f} | "
            f"{row.equivalent_bits:.2f} | {row.kl:.4f} ± {row.kl_stderr:.4f} | {diff} |"
        )
    best = near_lossless(frame)
    lines += ["", f"Near-lossless (fewest bits with held-out KL <= {NEAR_LOSSLESS}):", ""]
    for row in best.itertuples():
        if pd.isna(getattr(row, "kl", float("nan"))):
            lines.append(f"- {row.method}: none of its configs here")
        else:
            lines.append(
                f"- {row.method}: {row.effective_bits:.2f} effective / {row.equivalent_bits:.2f} "
                f"equivalent bits ({row.label}, KL {row.kl:.4f})"
            )
    return "\n".join(lines)


def _order(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from kvtuner import defaults

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--scheme", default="per-token", choices=("per-token", "kivi"))
    parser.add_argument(
        "--caps", type=lambda s: tuple(float(x) for x in s.split(",")), default=defaults.CAPS
    )
    parser.add_argument("--budget", default=defaults.BUDGET, choices=("effective", "equivalent"))
    parser.add_argument("--context", type=int, default=defaults.BUDGET_CONTEXT)
    parser.add_argument("--samples", type=int, default=defaults.EVAL_SAMPLES)
    parser.add_argument("--continuation", type=int, default=defaults.EVAL_CONTINUATION)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calibration", type=Path, default=ROOT / "calibration")
    parser.add_argument("--configs", type=Path, default=ROOT / "searched_configs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from kvtuner.io import atomic_write_text

    args = parse_args(argv)
    frame = measure(args)
    text = markdown(frame, args.budget, args.context)
    stem = f"ablation_{args.model}_{args.scheme}"
    saved = frame.drop(columns="config").assign(
        per_sample=[" ".join(f"{x:.6g}" for x in v) for v in frame.per_sample]
    )
    atomic_write_text(args.out / f"{stem}.csv", saved.to_csv(index=False, float_format="%.6g"))
    atomic_write_text(args.out / f"{stem}.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
