#!/usr/bin/env python
"""The measurements behind the cache defaults (README "Defaults"): `python scripts/defaults_study.py`.

On held-out text (8 samples of 512 context + 128 scored tokens, the same samples for every row of
a model), for each model:
1. old against new defaults: per-token KV4 and K4V2 and KIVI K4V2 with the old defaults (one group
   per head, the prompt attending to its quantized keys and values, no sinks, no smoothing) and
   the new ones;
2. per-token group size (one per head, 64, 32, 16 channels) over the uniform pairs, with effective
   bits at 4096 tokens, so that sizes are compared at equal effective bits;
3. attention sinks: 0 or 4 full-precision first tokens, per-token and KIVI;
4. channel smoothing of per-token groups: off or on, per-token and KIVI (its values).
Writes `<out>/defaults_<model>.csv`, `<out>/group_size_<model>.png` and prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from kvtuner.compat import model_shape
from kvtuner.config import PrecisionConfig
from kvtuner.evaluate import EvalProtocol, Evaluator, eval_samples
from kvtuner.io import atomic_path
from kvtuner.models import load_model

ROOT = Path(__file__).resolve().parent.parent
UNIFORM = ("KV8", "K8V4", "KV4", "K4V2", "KV2")
GROUPS = (None, 64, 32, 16)
OLD = dict(group_size=None, sink_tokens=0, smooth=False)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rows_for(num_layers: int) -> list[tuple[str, str, PrecisionConfig, bool]]:
    """(study, label, config, quantize_prefill) for every measured row of a model."""
    rows = []
    for spec in ("KV4", "K4V2"):
        old = PrecisionConfig.uniform(spec, num_layers, **OLD)
        rows.append(("defaults", f"per-token {spec} old", old, True))
        rows.append(
            ("defaults", f"per-token {spec} new", PrecisionConfig.uniform(spec, num_layers), False)
        )
    kivi_old = PrecisionConfig.uniform(
        "K4V2", num_layers, scheme="kivi", sink_tokens=0, smooth=False
    )
    rows.append(("defaults", "kivi K4V2 old", kivi_old, True))
    rows.append(
        (
            "defaults",
            "kivi K4V2 new",
            PrecisionConfig.uniform("K4V2", num_layers, scheme="kivi"),
            False,
        )
    )
    for group in GROUPS:
        for spec in UNIFORM:
            config = PrecisionConfig.uniform(spec, num_layers, group_size=group)
            rows.append(("group", f"g{group or 'head'} {spec}", config, False))
    for scheme in ("per-token", "kivi"):
        for spec in ("KV4", "K4V2", "KV2"):
            for sinks in (0, 4):
                config = PrecisionConfig.uniform(spec, num_layers, scheme=scheme, sink_tokens=sinks)
                rows.append(("sinks", f"{scheme} {spec} sinks {sinks}", config, False))
    for scheme in ("per-token", "kivi"):
        for spec in ("KV8", "K8V4", "KV4", "K4V2", "KV2"):
            for smooth in (False, True):
                config = PrecisionConfig.uniform(spec, num_layers, scheme=scheme, smooth=smooth)
                label = f"{scheme} {spec} smooth {'on' if smooth else 'off'}"
                rows.append(("smooth", label, config, False))
    return rows


LAYOUT = ("scheme", "group_size", "sink_tokens", "smooth", "quantize_prefill", "equivalent_bits")
MEASURED = ("kl", "kl_stderr", "ppl", "per_sample_kl")


def _layout(record: dict) -> tuple:
    """What identifies a measured config across runs (NaN group sizes read back as None)."""
    values = [record[k] for k in LAYOUT]
    return tuple(None if isinstance(v, float) and v != v else v for v in values)


def measure(
    model_name: str, samples: int, seed: int, saved: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Every row of `rows_for`; with `saved` (a previous CSV of the same samples), a row whose
    config is there is taken from it and only the others are measured."""
    loaded = load_model(model_name)
    shape = model_shape(loaded.model.config)
    protocol = EvalProtocol(512, 128, 32)
    tokens = eval_samples(loaded.tokenizer, None, samples, protocol, seed=seed)
    evaluator = Evaluator(loaded.model, tokens, protocol)
    known = {}
    if saved is not None and len(saved.per_sample_kl.iloc[0].split()) == samples:
        for record in saved.to_dict("records"):
            known.setdefault(_layout(record), {k: record[k] for k in MEASURED})
    records, seen = [], {}
    for study, label, config, quantize_prefill in rows_for(loaded.num_layers):
        record = {
            "model": model_name,
            "study": study,
            "row": label,
            "scheme": config.scheme,
            "group_size": config.group_size,
            "sink_tokens": config.sink_tokens,
            "smooth": config.smooth,
            "quantize_prefill": quantize_prefill,
            "equivalent_bits": config.equivalent_bits,
            "effective_bits": config.effective_bits(shape, 4096),
        }
        key = (config, quantize_prefill)
        if key not in seen and (saved_row := known.get(_layout(record))) is not None:
            seen[key] = saved_row
        if key not in seen:  # the same config in two studies is measured once
            started = time.perf_counter()
            result = evaluator.evaluate(config, quantize_prefill=quantize_prefill)
            seen[key] = {
                "kl": result.kl,
                "kl_stderr": result.kl_stderr,
                "ppl": result.ppl,
                "per_sample_kl": " ".join(f"{x:.6g}" for x in result.per_sample_kl),
            }
            log(f"{model_name} {label}: KL {result.kl:.4f} ({time.perf_counter() - started:.1f} s)")
        records.append(record | seen[key])
    return pd.DataFrame(records)


def _paired(frame: pd.DataFrame, a: str, b: str) -> tuple[float, float]:
    """Mean and standard error of per-sample KL(b) - KL(a) on the same samples."""
    x = [float(v) for v in frame[frame.row == a].per_sample_kl.iloc[0].split()]
    y = [float(v) for v in frame[frame.row == b].per_sample_kl.iloc[0].split()]
    diffs = [q - p for p, q in zip(x, y)]
    mean = sum(diffs) / len(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, (var / len(diffs)) ** 0.5


def markdown(frames: list[pd.DataFrame]) -> str:
    """The README block: old against new defaults, group sizes at their effective bits, and the
    paired effect of sinks and smoothing."""
    kl = lambda f, row: f[f.row == row].iloc[0]  # noqa: E731
    lines = [
        "Old defaults (one group per head, the prompt attending to its own quantized keys, no sinks,"
        " no smoothing) against the new ones; held-out KL ± s.e. (effective bits at 4096 tokens):",
        "",
        "| model | per-token KV4 old | new | per-token K4V2 old | new | KIVI K4V2 old | new |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for f in frames:
        cells = []
        for row in ("per-token KV4", "per-token K4V2", "kivi K4V2"):
            for age in ("old", "new"):
                r = kl(f, f"{row} {age}")
                cells.append(f"{r.kl:.3g} ± {r.kl_stderr:.2g} ({r.effective_bits:.2f})")
        lines.append(f"| {f.model.iloc[0]} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per-token group size (smoothing and sinks on), each uniform pair at its effective bits:",
        "",
        "| model | group | KV8 | K8V4 | KV4 | K4V2 | KV2 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for f in frames:
        for group in GROUPS:
            name = f"g{group or 'head'}"
            cells = [
                f"{kl(f, f'{name} {spec}').kl:.3g} ({kl(f, f'{name} {spec}').effective_bits:.2f})"
                for spec in UNIFORM
            ]
            label = "head" if group is None else str(group)
            lines.append(f"| {f.model.iloc[0]} | {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired effect on held-out KL (new minus old, ± s.e.; negative is better) of 4 sink tokens "
        "and of channel smoothing:",
        "",
        "| model | scheme | pair | 4 sinks | smoothing |",
        "|---|---|---|---:|---:|",
    ]
    for f in frames:
        for scheme in ("per-token", "kivi"):
            for spec in ("KV4", "K4V2", "KV2"):
                sink = _paired(f, f"{scheme} {spec} sinks 0", f"{scheme} {spec} sinks 4")
                smooth = _paired(f, f"{scheme} {spec} smooth off", f"{scheme} {spec} smooth on")
                lines.append(
                    f"| {f.model.iloc[0]} | {scheme} | {spec} | {sink[0]:+.4f} ± {sink[1]:.4f} | "
                    f"{smooth[0]:+.4f} ± {smooth[1]:.4f} |"
                )
    return "\n".join(lines)


def plot_groups(frame: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = frame[frame.study == "group"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, part in rows.groupby(rows.group_size.fillna(0), sort=True):
        part = part.sort_values("effective_bits")
        label = "one group per head" if group == 0 else f"{int(group)} channels"
        ax.plot(part.effective_bits, part.kl, marker="o", label=label)
    ax.set_xscale("linear")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits at 4096 tokens (16-bit scales)")
    ax.set_ylabel("held-out KL (nats/token)")
    ax.set_title(f"{frame.model.iloc[0]}: per-token group size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["gemma-3-270m", "smollm2-135m", "qwen2.5-coder-0.5b"]
    )
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument(
        "--from-csv", action="store_true", help="measure nothing: render the saved CSVs in --out"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take rows whose config the saved CSV already holds (same samples); measure the rest",
    )
    args = parser.parse_args(argv)
    frames = []
    for name in args.models:
        path = args.out / f"defaults_{name}.csv"
        if args.from_csv:
            frame = pd.read_csv(path)
        else:
            saved = pd.read_csv(path) if args.reuse and path.is_file() else None
            frame = measure(name, args.samples, args.seed, saved)
            args.out.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                frame.to_csv(tmp, index=False, float_format="%.6g")
        plot_groups(frame, args.out / f"group_size_{name}.png")
        frames.append(frame)
    text = (
        markdown(frames)
        + f"\n\nReproduce: `python scripts/defaults_study.py` ({args.samples} samples)"
    )
    with atomic_path(args.out / "defaults.md") as tmp:
        tmp.write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
