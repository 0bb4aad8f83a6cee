#!/usr/bin/env python
"""Regenerate every results block of the README in one run: `python scripts/reproduce.py`.

For each model and scheme, one table on held-out text (the shipped held-out text, which neither
calibration nor search read; the same samples for every row of a model):
- `fp16`: the dense DynamicCache (the reference: KL 0 by definition);
- uniform `KV8`, `K8V4`, `KV4`, `K4V2`, `KV2`;
- per cap (effective bits at 4096 tokens): the greedy allocation by e_o, the exact knapsack on
  single-layer KL (`kvtuner allocate`) and the search (`searched_configs/<model>/<scheme>/
  kvtuner_c<cap>.yaml`), each with its paired difference to the knapsack (scripts/ablation.py);
- transformers' own `QuantizedCache` at 4 and 2 bits where installed and where the model is
  supported (it refuses sliding-window models such as Gemma 3).
Columns: equivalent and effective bits, KL ± standard error, perplexity, KV bytes at
`--memory-tokens` (a fresh cache filled through `update`, counted from the tensors it holds) and
their ratio to the dense cache, decode tokens/s at `--bench-context` for a few rows (their ratio to
the dense cache measured side by side). Plus the README's summary of those tables, the calibration
summary, the near-lossless summary and the headline bench. Writes CSVs, plots and `.md` blocks under
`--out`, and each block between `<!-- results:<key>:start -->` and `<!-- results:<key>:end -->`:
the per-model tables (key `<model>:<scheme>`) into docs/results.md (`--results-doc`), the summary
(`summary`, from every `<model>_<scheme>.csv` under `--out`), `calibration` and `near-lossless` into
README.md (`--readme`); `bench` has no markers there and is printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: ablation, summaries
import ablation  # noqa: E402
import summaries  # noqa: E402

from kvtuner import defaults  # noqa: E402
from kvtuner.baselines import uniform_configs  # noqa: E402
from kvtuner.bench import cache_bytes, run_bench, transformers_quantized_cache  # noqa: E402
from kvtuner.cache import KVTunerCache  # noqa: E402
from kvtuner.calibrate import base_config, load_sensitivity  # noqa: E402
from kvtuner.compat import model_shape, sliding_windows  # noqa: E402
from kvtuner.evaluate import EvalProtocol, Evaluator, eval_samples, protocol_for  # noqa: E402
from kvtuner.io import atomic_write_text  # noqa: E402
from kvtuner.models import load_model  # noqa: E402
from kvtuner.plots import plot_precision_map, plot_quality_vs_bits  # noqa: E402
from kvtuner.precision import SCHEMES  # noqa: E402
from kvtuner.tables import (  # noqa: E402
    RESULT_COLUMNS,
    block_key,
    results_markdown,
    summary_markdown,
    update_readme,
)

MODELS = ("gemma-3-270m", "smollm2-135m", "qwen2.5-coder-0.5b")
ROOT = Path(__file__).resolve().parent.parent
RESULTS_DOC = ROOT / "docs" / "results.md"  # the per-model tables; the README has their summary
BENCH_MODEL, BENCH_CONFIG, BENCH_ROUNDS = "smollm2-135m", "KV4", 5
SUMMARY_CAPS = (4.0, 5.0)  # the README summary's searched columns
_START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    schemes: tuple[str, ...]
    caps: tuple[float, ...]
    out: Path
    readme: Path | None
    results_doc: Path | None
    calibration: Path
    configs: Path
    samples: int
    seed: int
    continuation: int
    memory_tokens: int
    bench_context: int
    bench_tokens: int
    bench_rounds: int
    bench_rows: tuple[str, ...]
    peers: bool
    extras: bool


def filled_bytes(make_cache: Any, model_config: Any, tokens: int, dtype: torch.dtype) -> int:
    """Bytes a fresh cache holds after `tokens` tokens of right-shaped K/V went into every layer."""
    shape = model_shape(model_config)
    states = torch.randn(
        1, shape.kv_heads, tokens, shape.head_dim, generator=torch.Generator().manual_seed(0)
    )
    cache = make_cache()
    with torch.inference_mode():
        for layer in range(shape.num_layers):
            cache.update(states.to(dtype), states.to(dtype).clone(), layer)
    return cache_bytes(cache)


def table_rows(loaded: Any, scheme: str, settings: Settings, evaluator: Evaluator) -> pd.DataFrame:
    """Every row of one (model, scheme) table, measured on `evaluator`'s held-out samples."""
    folder = settings.calibration / loaded.name / scheme
    _, meta = load_sensitivity(folder / "sensitivity.csv")
    base = base_config(meta)
    rows = [{"cap": float("nan"), "method": "uniform", "label": name, "config": config}
            for name, config in uniform_configs(base).items()]  # fmt: skip
    rows += ablation.candidates(loaded, scheme, settings.caps, settings.calibration, settings.configs,
                                defaults.BUDGET, defaults.BUDGET_CONTEXT)  # fmt: skip
    frame = ablation.score(
        rows, loaded, evaluator, scheme, defaults.BUDGET, defaults.BUDGET_CONTEXT
    )
    dtype, model_config = loaded.dtype, loaded.model.config
    dense = filled_bytes(
        lambda: DynamicCache(config=model_config), model_config, settings.memory_tokens, dtype
    )
    frame["kv_bytes"] = [
        filled_bytes(
            lambda c=c: KVTunerCache(c, model_config), model_config, settings.memory_tokens, dtype
        )
        for c in frame.config
    ]
    frame["dense_kv_bytes"] = dense
    frame["memory_ratio"] = frame.kv_bytes / dense
    middle = sorted(settings.caps)[len(settings.caps) // 2]
    for index, row in frame.iterrows():
        # the uniform rows once (not again as the best uniform config under a cap)
        timed = row.method == "uniform" and row.label in settings.bench_rows and row.cap != row.cap
        timed |= row.method == "search" and "search" in settings.bench_rows and row.cap == middle
        if not timed:
            continue
        log(
            f"{loaded.name} {scheme} {row.label} {row.method}: decode at {settings.bench_context} tokens"
        )
        bench = run_bench(loaded.model, loaded.tokenizer, row.config, context=settings.bench_context,
                          new_tokens=settings.bench_tokens, rounds=settings.bench_rounds, peer_bits=None)  # fmt: skip
        ours, base_row = bench["rows"][0], bench["rows"][1]
        frame.loc[index, "tokens_per_s"] = ours["tokens_per_s"]
        frame.loc[index, "dense_tokens_per_s"] = base_row["tokens_per_s"]
        frame.loc[index, "speed_ratio"] = ours["tokens_per_s"] / base_row["tokens_per_s"]
    return frame


def peer_rows(
    loaded: Any, settings: Settings, evaluator: Evaluator
) -> tuple[list[dict], list[str]]:
    """transformers' QuantizedCache rows (KL, memory), and a note for each one not available."""
    rows, notes = [], []
    sliding = any(w is not None for w in sliding_windows(loaded.model.config))
    for bits in (4, 2):
        peer = transformers_quantized_cache(loaded.model, bits)
        if peer is None:
            why = (
                "it refuses models with sliding-window layers"
                if sliding
                else "no backend installed (pip install optimum-quanto)"
            )
            notes.append(f"transformers QuantizedCache {bits}-bit: not measured, {why}")
            continue
        label, make = peer
        log(f"{loaded.name} {label}")
        result = evaluator.evaluate_cache(make)
        kv = filled_bytes(make, loaded.model.config, settings.memory_tokens, loaded.dtype)
        rows.append({"label": f"QuantizedCache {'quanto' if 'quanto' in label else 'hqq'} {bits}-bit",
                     "method": "peer", "kl": result.kl, "kl_stderr": result.kl_stderr, "ppl": result.ppl,
                     "equivalent_bits": float(bits), "kv_bytes": kv})  # fmt: skip
    return rows, notes


def results_frame(name: str, scheme: str, frame: pd.DataFrame, peers: list[dict], evaluator: Evaluator,
                  settings: Settings, dtype_bits: int) -> pd.DataFrame:  # fmt: skip
    """The README frame (kvtuner.tables.RESULT_COLUMNS): dense row, then the measured rows."""
    dense_bytes = float(frame.dense_kv_bytes.iloc[0])
    kind = {
        "uniform": "uniform",
        "greedy": "greedy",
        "knapsack": "knapsack",
        "search": "searched",
        "peer": "peer",
    }
    records = [{"model": name, "scheme": scheme, "config": "fp16", "kind": "dense", "equivalent_bits": 16.0,
                "effective_bits": float(dtype_bits), "kl": 0.0, "kl_stderr": 0.0,
                "ppl": evaluator.reference_perplexity(), "kv_bytes": dense_bytes, "memory_ratio": 1.0,
                "note": "the dense DynamicCache (the reference)"}]  # fmt: skip
    for row in frame.itertuples():
        per_cap = row.cap == row.cap  # NaN for the uniform rows listed once
        if row.method == "uniform" and per_cap:
            continue  # the best uniform under a cap: its comparison goes into the notes
        label = row.label if row.method == "uniform" else f"C{row.cap:g} {row.method}"
        diff = ""
        if row.method in ("greedy", "search") and row.diff_vs_knapsack == row.diff_vs_knapsack:
            diff = f"{row.diff_vs_knapsack:+.3g} ± {row.diff_stderr:.2g} vs knapsack ({ablation.verdict(pd.Series(row._asdict()))})"
        records.append({"model": name, "scheme": scheme, "config": label, "kind": kind[row.method],
                        "equivalent_bits": row.equivalent_bits, "effective_bits": row.effective_bits,
                        "kl": row.kl, "kl_stderr": row.kl_stderr, "ppl": row.ppl, "kv_bytes": row.kv_bytes,
                        "dense_kv_bytes": dense_bytes, "memory_ratio": row.memory_ratio,
                        "tokens_per_s": getattr(row, "tokens_per_s", None),
                        "dense_tokens_per_s": getattr(row, "dense_tokens_per_s", None),
                        "speed_ratio": getattr(row, "speed_ratio", None), "source": row.layers, "note": diff})  # fmt: skip
    for peer in peers:
        records.append({"model": name, "scheme": scheme, "config": peer["label"], "kind": "peer",
                        "equivalent_bits": peer["equivalent_bits"],
                        "effective_bits": dtype_bits * peer["kv_bytes"] / dense_bytes,
                        "kl": peer["kl"], "kl_stderr": peer["kl_stderr"], "ppl": peer["ppl"],
                        "kv_bytes": peer["kv_bytes"], "dense_kv_bytes": dense_bytes,
                        "memory_ratio": peer["kv_bytes"] / dense_bytes})  # fmt: skip
    return pd.DataFrame(records, columns=list(RESULT_COLUMNS))


def readme_block(
    results: pd.DataFrame, frame: pd.DataFrame, facts: dict[str, Any], settings: Settings
) -> str:
    model, scheme = facts["model"], facts["scheme"]
    lines = [results_markdown(results), ""]
    per_cap = frame[frame.cap == frame.cap]
    if not per_cap.empty:
        lines += ["Paired differences of held-out KL at each cap (same samples; inside one standard "
                  "error is a tie): the greedy allocation, the best uniform config under the cap and "
                  "the search, each against the knapsack.", ""]  # fmt: skip
        for cap, part in per_cap.groupby("cap"):
            items = []
            for r in part.itertuples():
                if r.method == "knapsack" or r.diff_vs_knapsack != r.diff_vs_knapsack:
                    continue
                name = f"uniform {r.label}" if r.method == "uniform" else r.method
                verdict = ablation.verdict(pd.Series(r._asdict()))
                items.append(f"{name} {r.diff_vs_knapsack:+.3g} ± {r.diff_stderr:.2g} ({verdict})")
            if items:
                lines.append(f"- C{cap:g}: " + "; ".join(items))
        lines.append("")
    best = ablation.near_lossless(frame)
    lines.append(f"Near-lossless (fewest effective bits with KL <= {ablation.NEAR_LOSSLESS}): " + "; ".join(
        f"{r.method} {r.effective_bits:.2f} eff. / {r.equivalent_bits:.2f} equiv. ({r.label})"
        if r.kl == r.kl else f"{r.method} none" for r in best.itertuples()))  # fmt: skip
    lines += ["", (
        f"{model}, {scheme}, {facts['dtype']} on {os.cpu_count()} cores of {cpu_name()}. KL and perplexity: "
        f"{facts['samples']} held-out samples of {facts['context']} + {facts['continuation']} tokens "
        f"(chunks of 32, seed {settings.seed}; reference perplexity {facts['reference_ppl']:.2f}). "
        f"Effective bits: what the cache holds at {defaults.BUDGET_CONTEXT} tokens with 16-bit scales "
        f"(the caps' axis). KV MiB and mem. ratio: a {facts['dtype']} cache filled with "
        f"{settings.memory_tokens} tokens, against the dense cache of the same dtype. tok/s: "
        f"{settings.bench_tokens} decode steps at {settings.bench_context} tokens of context, median of "
        f"{settings.bench_rounds}, the ratio against the dense cache in the same run (timed rows only).")]  # fmt: skip
    lines += [f"- {note}" for note in facts["notes"]]
    folder = os.path.relpath(settings.out, (settings.results_doc or RESULTS_DOC).parent)
    lines += ["", f"![KL vs bits, {model} {scheme}]({folder}/quality_vs_bits_{model}_{scheme}.png)",
              f"![per-layer bits, {model} {scheme}]({folder}/precision_map_{model}_{scheme}.png)",
              "", f"Reproduce: `{command_line()}`"]  # fmt: skip
    return "\n".join(lines)


def measure_model(name: str, settings: Settings) -> dict[str, dict[str, str]]:
    log(f"{name}: loading")
    loaded = load_model(name)
    base = protocol_for(loaded.model.config)
    protocol = EvalProtocol(base.context, settings.continuation, base.chunk)
    samples = eval_samples(loaded.tokenizer, None, settings.samples, protocol, seed=settings.seed)
    evaluator = Evaluator(loaded.model, samples, protocol, progress=True)
    evaluator.reference()
    peers, notes = peer_rows(loaded, settings, evaluator) if settings.peers else ([], [])
    dtype_bits = torch.finfo(loaded.dtype).bits
    blocks = {}
    for scheme in settings.schemes:
        frame = table_rows(loaded, scheme, settings, evaluator)
        results = results_frame(name, scheme, frame, peers, evaluator, settings, dtype_bits)
        stem = f"{name}_{scheme}"
        atomic_write_text(
            settings.out / f"{stem}.csv", results.to_csv(index=False, float_format="%.6g")
        )
        saved = frame.drop(columns="config").assign(
            per_sample=[" ".join(f"{x:.6g}" for x in v) for v in frame.per_sample]
        )
        atomic_write_text(
            settings.out / f"ablation_{stem}.csv", saved.to_csv(index=False, float_format="%.6g")
        )
        title = f"{name}, {scheme}: held-out KL on {settings.samples} samples"
        plot_quality_vs_bits(results, settings.out / f"quality_vs_bits_{stem}.png", title=title)
        searched = [
            (f"C{r.cap:g} ({r.effective_bits:.2f} eff.)", r.config.layers)
            for r in frame.itertuples()
            if r.method == "search"
        ]
        full = [i for i, w in enumerate(sliding_windows(loaded.model.config)) if w is None]
        if searched:
            plot_precision_map(searched, settings.out / f"precision_map_{stem}.png",
                               title=f"{name}, {scheme}: bits per layer of the searched configs",
                               highlight_layers=full if len(full) < loaded.num_layers else ())  # fmt: skip
        facts = {"model": name, "scheme": scheme, "dtype": str(loaded.dtype).removeprefix("torch."),
                 "samples": settings.samples, "context": protocol.context, "continuation": protocol.continuation,
                 "reference_ppl": evaluator.reference_perplexity(), "notes": list(notes)}  # fmt: skip
        if len(full) < loaded.num_layers:
            facts["notes"].append(
                f"Sliding-window layers hold at most their window; layers {', '.join(map(str, full))} hold "
                f"all tokens, so at {defaults.BUDGET_CONTEXT} tokens they are most of the bytes and of the budget.")  # fmt: skip
        markdown = readme_block(results, frame, facts, settings)
        atomic_write_text(settings.out / f"{stem}.md", markdown + "\n")
        blocks[block_key(name, scheme)] = {"markdown": markdown, "title": f"{name}, {scheme}"}
        log(f"wrote {stem}")
    return blocks


def results_summary(out: Path) -> str:
    """The README summary of every per-model table saved under `out` (all models and schemes whose
    `<model>_<scheme>.csv` is there, this run's or an earlier one's); "" when there is none."""
    paths = [out / f"{m}_{s}.csv" for m in MODELS for s in SCHEMES]
    frames = [pd.read_csv(path) for path in paths if path.is_file()]
    if not frames:
        return ""
    return summary_markdown(pd.concat(frames, ignore_index=True), SUMMARY_CAPS)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line() -> str:
    return "python " + shlex.join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results-doc", type=Path, default=RESULTS_DOC)
    parser.add_argument(
        "--no-readme", action="store_true", help="print the blocks only (README and results doc)"
    )
    parser.add_argument(
        "--no-extras", action="store_true", help="no calibration, near-lossless, bench blocks"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip transformers' QuantizedCache")
    parser.add_argument("--calibration", type=Path, default=ROOT / "calibration")
    parser.add_argument("--configs", type=Path, default=ROOT / "searched_configs")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-tokens", type=int, default=4096)
    parser.add_argument("--bench-context", type=int, default=2048)
    parser.add_argument("--bench-tokens", type=int, default=32)
    parser.add_argument("--bench-rounds", type=int, default=1)
    parser.add_argument(
        "--bench-rows",
        default="search",
        help="rows timed in each table, comma-separated: uniform specs (KV8,KV4,KV2) and/or `search` "
        "(the middle cap); '' for none (the headline bench always runs)",
    )
    args = parser.parse_args(argv)
    return Settings(
        models=tuple(args.models), schemes=tuple(args.schemes), caps=defaults.CAPS, out=args.out,
        readme=None if args.no_readme else args.readme,
        results_doc=None if args.no_readme else args.results_doc, calibration=args.calibration,
        configs=args.configs, samples=args.samples, seed=args.seed,
        continuation=defaults.EVAL_CONTINUATION, memory_tokens=args.memory_tokens,
        bench_context=args.bench_context, bench_tokens=args.bench_tokens,
        bench_rounds=args.bench_rounds, bench_rows=tuple(r for r in args.bench_rows.split(",") if r),
        peers=not args.no_peers, extras=not args.no_extras,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    settings.out.mkdir(parents=True, exist_ok=True)
    tables: dict[str, dict[str, str]] = {}  # per model and scheme, for docs/results.md
    for name in settings.models:
        tables.update(measure_model(name, settings))
    blocks: dict[str, dict[str, str]] = {}  # for the README
    summary = results_summary(settings.out)
    if summary:
        blocks["summary"] = {
            "markdown": summary + f"\n\nReproduce: `{command_line()}`",
            "title": "summary",
        }
        atomic_write_text(settings.out / "summary.md", blocks["summary"]["markdown"] + "\n")
    if settings.extras:
        text = summaries.calibration_summary(
            settings.calibration, settings.models, settings.schemes
        )
        blocks["calibration"] = {
            "markdown": text + f"\n\nReproduce: `{command_line()}`",
            "title": "calibration",
        }
        text = summaries.near_lossless_summary(settings.out, settings.models, settings.schemes)
        blocks["near-lossless"] = {
            "markdown": text + f"\n\nReproduce: `{command_line()}`",
            "title": "near-lossless",
        }
        text = summaries.bench_headline(BENCH_MODEL, BENCH_CONFIG, context=settings.bench_context,
                                        new_tokens=settings.bench_tokens, rounds=BENCH_ROUNDS, log=log)  # fmt: skip
        blocks["bench"] = {
            "markdown": text + f"\n\nReproduce: `{command_line()}`",
            "title": "bench",
        }
        for key in ("calibration", "near-lossless", "bench"):
            atomic_write_text(settings.out / f"{key}.md", blocks[key]["markdown"] + "\n")
    env = {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
           "torch": torch.__version__, "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
           "command": command_line(), "wall_time_s": round(time.perf_counter() - _START, 1)}  # fmt: skip
    atomic_write_text(settings.out / "environment.json", json.dumps(env, indent=2) + "\n")
    for path, part in ((settings.results_doc, tables), (settings.readme, blocks)):
        if path is None:
            continue
        missing = update_readme(path, {k: v["markdown"] for k, v in part.items()})
        for key in missing:
            log(f"{path}: no markers for block {key}: printed below, file unchanged there")
    for block in [*tables.values(), *blocks.values()]:
        print(f"\n## {block['title']}\n\n{block['markdown']}")
    log(f"done in {(time.perf_counter() - _START) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
