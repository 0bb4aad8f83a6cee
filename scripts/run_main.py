"""The main job, end to end on one model (what `make run` runs).

calibrate (e_o and single-layer KL) -> prune -> allocate (exact knapsack) -> search (NSGA-II from
the knapsack front) -> export, written under `--out` (default runs/<model>/), then the ablation on
held-out text: per cap, the best uniform config, the greedy allocation by e_o, the knapsack and the
search, with KL, standard errors and paired differences to the knapsack (scripts/ablation.py).

    .venv/bin/python scripts/run_main.py --model gemma-3-270m
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: ablation

import ablation  # noqa: E402

from kvtuner import defaults  # noqa: E402
from kvtuner.cli import main as kvtuner  # noqa: E402

# 100 trials (the shipped searches ran 150) keep `make run` from a fresh clone within 20 minutes on
# 2 cores: the knapsack seeds carry most of the front, and the re-scoring decides the export.
TRIALS = 100


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--scheme", default=defaults.SCHEME, choices=("per-token", "kivi"))
    parser.add_argument("--out", type=Path, help="output root (default runs/<model>)")
    parser.add_argument("--caps", default=",".join(f"{c:g}" for c in defaults.CAPS))
    parser.add_argument("--trials", type=int, default=TRIALS)
    parser.add_argument("--eval-samples", type=int, default=defaults.EVAL_SAMPLES)
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
    step("prune", ["prune", *common, "--out", str(calibration)])
    results = searched / args.model / args.scheme
    step(
        "allocate",
        [
            "allocate",
            *common,
            "--calibration",
            str(calibration),
            "--max-bits",
            args.caps,
            "--out",
            str(results / "knapsack"),
        ],  # fmt: skip
    )
    step(
        "search + export",
        [
            "search",
            *common,
            "--calibration",
            str(calibration),
            "--out",
            str(results),
            "--trials",
            str(args.trials),
            "--max-bits",
            args.caps,
            "--seed",
            str(args.seed),
        ],  # fmt: skip
    )
    print("\n== ablation on held-out text", file=sys.stderr, flush=True)
    table = ablation.main(
        [
            "--model",
            args.model,
            "--scheme",
            args.scheme,
            "--caps",
            args.caps,
            "--samples",
            str(args.eval_samples),
            "--calibration",
            str(calibration),
            "--configs",
            str(searched),
            "--out",
            str(out),
        ]  # fmt: skip
    )
    print(
        f"\nmake run finished in {(time.perf_counter() - started) / 60:.1f} min; outputs under {out}/",
        file=sys.stderr,
    )
    return table


if __name__ == "__main__":
    sys.exit(main())
