"""Searched vs uniform vs random: is the searched config better than what it should beat?

On held-out text (more samples than the search used), all configs scored on the same samples:
- the searched config under the cap (default searched_configs/<model>/<scheme>/kvtuner_c<cap>.yaml),
- every uniform config with at most `cap` equivalent bits (and KV4, K8V4, KV8 above it, for scale),
- `--random` layer-wise shuffles of the searched config's own pairs (same equivalent bits exactly).

    .venv/bin/python scripts/compare_random.py --model gemma-3-270m --cap 3.5

Prints a markdown table (or --json) and says whether the searched config beats every uniform
config under the cap and the mean of the random ones; exit code 1 if it does not.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from kvtuner.compat import model_shape
from kvtuner.config import PrecisionConfig, load_config
from kvtuner.data import heldout_text
from kvtuner.evaluate import EvalProtocol, Evaluator, eval_samples
from kvtuner.models import load_model
from kvtuner.precision import candidate_pairs
from kvtuner.search.export import config_filename
from kvtuner.search.scoring import EFFECTIVE_BITS_CONTEXT

REFERENCE_ABOVE_CAP = ("KV4", "K8V4", "KV8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--scheme", default="per-token")
    parser.add_argument("--cap", type=float, default=3.5)
    parser.add_argument(
        "--config",
        help="searched YAML (default searched_configs/<model>/<scheme>/kvtuner_c<cap>.yaml)",
    )
    parser.add_argument(
        "--random", type=int, default=5, help="number of random layer-wise shuffles"
    )
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--text", help="held-out text file (default: the shipped held-out text)")
    parser.add_argument(
        "--seed", type=int, default=1, help="picks the held-out windows and the shuffles"
    )
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def shuffles(config: PrecisionConfig, count: int, seed: int) -> list[PrecisionConfig]:
    """`count` distinct permutations of the config's per-layer pairs (none equal to the config)."""
    rng = random.Random(seed)
    seen = {config.layers}
    out: list[PrecisionConfig] = []
    for _ in range(1000 * count):
        if len(out) == count:
            break
        layers = list(config.layers)
        rng.shuffle(layers)
        if tuple(layers) not in seen:
            seen.add(tuple(layers))
            out.append(
                PrecisionConfig(
                    layers=tuple(layers),
                    scheme=config.scheme,
                    group_size=config.group_size,
                    residual_length=config.residual_length,
                    model=config.model,
                )
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = compare(args, progress=not args.json)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0 if report["beats_uniform"] and report["beats_random_mean"] else 1


def compare(args: argparse.Namespace, *, progress: bool = True) -> dict:
    """Score the searched, uniform and shuffled configs; the report `render` and `--json` print."""
    started = time.perf_counter()
    loaded = load_model(args.model)
    path = Path(
        args.config
        or Path("searched_configs") / loaded.name / args.scheme / config_filename(args.cap)
    )
    searched = load_config(path, num_layers=loaded.num_layers, scheme=args.scheme)

    def uniform(name: str) -> PrecisionConfig:
        return PrecisionConfig.uniform(
            name,
            loaded.num_layers,
            scheme=searched.scheme,
            group_size=searched.group_size,
            residual_length=searched.residual_length,
        )

    rows: list[tuple[str, str, PrecisionConfig]] = [("searched", path.name, searched)]
    under = [p.name for p in candidate_pairs() if p.equivalent_bits <= args.cap]
    rows += [("uniform", name, uniform(name)) for name in under]
    rows += [
        ("uniform (above cap)", name, uniform(name))
        for name in REFERENCE_ABOVE_CAP
        if name not in under
    ]
    rows += [
        ("random", f"shuffle {i + 1}", c)
        for i, c in enumerate(shuffles(searched, args.random, args.seed))
    ]

    protocol = EvalProtocol(args.context, args.continuation, args.chunk)
    samples = eval_samples(
        loaded.tokenizer, heldout_text(args.text), args.samples, protocol, seed=args.seed
    )
    evaluator = Evaluator(loaded.model, samples, protocol, progress=progress)
    results, reference_ppl = [], float("nan")
    for kind, name, config in tqdm(rows, desc="configs", disable=not progress, file=sys.stderr):
        result = evaluator.evaluate(config)
        reference_ppl = result.reference_ppl
        results.append(
            {
                "kind": kind,
                "name": name,
                "equivalent_bits": config.equivalent_bits,
                "effective_bits": config.effective_bits(
                    model_shape(loaded.model.config), EFFECTIVE_BITS_CONTEXT
                ),
                "kl": result.kl,
                "kl_stderr": result.kl_stderr,
                "ppl": result.ppl,
                "per_sample_kl": list(result.per_sample_kl),
            }
        )
    verdict = judge(results, args.cap)
    return {
        "model": loaded.name,
        "scheme": searched.scheme,
        "cap": args.cap,
        "config": str(path),
        "samples": args.samples,
        "context": args.context,
        "continuation": args.continuation,
        "reference_ppl": reference_ppl,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": results,
        **verdict,
    }


def judge(results: list[dict], cap: float) -> dict:
    searched = results[0]
    uniform = [r for r in results if r["kind"] == "uniform"]
    randoms = [r for r in results if r["kind"] == "random"]
    random_mean = statistics.fmean(r["kl"] for r in randoms) if randoms else float("nan")
    # paired on samples: per sample, searched KL minus the mean random KL
    paired = (
        [
            s - statistics.fmean(r["per_sample_kl"][i] for r in randoms)
            for i, s in enumerate(searched["per_sample_kl"])
        ]
        if randoms
        else []
    )
    return {
        "searched_kl": searched["kl"],
        "best_uniform_under_cap": min(uniform, key=lambda r: r["kl"])["name"] if uniform else None,
        "best_uniform_kl": min((r["kl"] for r in uniform), default=float("nan")),
        "random_mean_kl": random_mean,
        "paired_diff_vs_random": statistics.fmean(paired) if paired else float("nan"),
        "samples_where_searched_beats_random_mean": sum(d < 0 for d in paired),
        "beats_uniform": all(searched["kl"] < r["kl"] for r in uniform),
        "beats_random_mean": bool(randoms) and searched["kl"] < random_mean,
    }


def render(report: dict) -> str:
    lines = [
        f"{report['model']} {report['scheme']}, cap {report['cap']:g} bits: {report['samples']} held-out samples x "
        f"({report['context']} context + {report['continuation']} scored), full-precision ppl {report['reference_ppl']:.2f}",
        "",
        "| config | kind | equivalent bits | effective bits | KL (± s.e.) | perplexity |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['equivalent_bits']:.2f} | {r['effective_bits']:.2f} | "
            f"{r['kl']:.4f} ± {r['kl_stderr']:.4f} | {r['ppl']:.2f} |"
        )
    lines += [
        "",
        f"searched KL {report['searched_kl']:.4f}; best uniform under the cap {report['best_uniform_under_cap']} "
        f"{report['best_uniform_kl']:.4f}; random shuffles mean {report['random_mean_kl']:.4f} "
        f"(paired difference {report['paired_diff_vs_random']:+.4f}, searched better on "
        f"{report['samples_where_searched_beats_random_mean']}/{report['samples']} samples)",
        f"beats every uniform config under the cap: {report['beats_uniform']}; "
        f"beats the random mean: {report['beats_random_mean']}  ({report['seconds']:.0f} s)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
