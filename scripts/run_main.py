"""The main job, end to end on one model (what `make run` runs).

calibrate -> prune -> search -> export, written under `--out` (default runs/<model>/), then one table
on held-out text: every uniform config and every searched config, with equivalent bits, effective
bits, KL to full precision and perplexity, all scored on the same samples (more than the search used,
picked with another seed).

    .venv/bin/python scripts/run_main.py --model gemma-3-270m
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvtuner.cli import main as kvtuner
from kvtuner.config import PrecisionConfig, load_config
from kvtuner.evaluate import EvalProtocol, Evaluator, eval_samples
from kvtuner.models import load_model
from kvtuner.search.export import config_filename

UNIFORM = ("KV8", "K8V4", "KV4", "K4V2", "KV2")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--scheme", default="per-token", choices=("per-token", "kivi"))
    parser.add_argument("--out", type=Path, help="output root (default runs/<model>)")
    parser.add_argument("--caps", default="3.0,3.5,4.0,6.0")
    parser.add_argument("--trials", type=int, default=120)
    parser.add_argument("--max-groups", type=int, default=6)
    parser.add_argument("--eval-samples", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def step(title: str, argv: list[str]) -> None:
    """Run one kvtuner command in this process; stop the job on a failure."""
    print(f"\n== {title}: kvtuner {' '.join(argv)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    code = kvtuner(argv)
    if code:
        raise SystemExit(code)
    print(f"== {title} done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out = args.out or Path("runs") / args.model
    calibration, searched = out / "calibration", out / "searched_configs"
    common = ["--model", args.model, "--scheme", args.scheme]
    step("calibrate", ["calibrate", *common, "--out", str(calibration), "--seed", str(args.seed)])
    step(
        "prune", ["prune", *common, "--out", str(calibration), "--max-groups", str(args.max_groups)]
    )
    space = calibration / args.model / args.scheme / "space.yaml"
    results = searched / args.model / args.scheme
    step(
        "search + export",
        [
            "search",
            *common,
            "--space",
            str(space),
            "--out",
            str(results),
            "--trials",
            str(args.trials),
            "--max-bits",
            args.caps,
            "--seed",
            str(args.seed),
        ],
    )

    print("\n== held-out table", file=sys.stderr, flush=True)
    loaded = load_model(args.model)
    protocol = EvalProtocol(context=512, continuation=128, chunk=32)
    # another seed than the search's samples: the table is not scored on what the search optimised
    samples = eval_samples(loaded.tokenizer, None, args.eval_samples, protocol, seed=args.seed + 1)
    evaluator = Evaluator(loaded.model, samples, protocol, progress=True)
    rows: list[tuple[str, PrecisionConfig]] = [
        (name, PrecisionConfig.uniform(name, loaded.num_layers, scheme=args.scheme))
        for name in UNIFORM
    ]
    for cap in (float(c) for c in args.caps.split(",")):
        path = results / config_filename(cap)
        if path.is_file():
            rows.append((f"kvtuner C{cap:g}", load_config(path, num_layers=loaded.num_layers)))
    from kvtuner.compat import model_shape

    shape = model_shape(loaded.model.config)
    lines = [
        f"{args.model}, {args.scheme}: held-out text, {args.eval_samples} samples x (512 context + 128 scored)",
        "",
        "| config | equivalent bits | effective bits @4096 | KL (± s.e.) | perplexity |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, config in rows:
        result = evaluator.evaluate(config)
        lines.append(
            f"| {name} | {config.equivalent_bits:.2f} | {config.effective_bits(shape, 4096):.2f} | "
            f"{result.kl:.4f} ± {result.kl_stderr:.4f} | {result.ppl:.2f} |"
        )
    lines.append(f"| full precision | 16.00 | 16.00 | 0 | {result.reference_ppl:.2f} |")
    print("\n".join(lines))
    print(
        f"\nmake run finished in {(time.perf_counter() - started) / 60:.1f} min; outputs under {out}/",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
