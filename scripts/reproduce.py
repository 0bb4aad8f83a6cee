#!/usr/bin/env python
"""Regenerate every results table and plot of the README in one run: `python scripts/reproduce.py`.

For each model and scheme, one row per cache:
- `fp16`: the dense DynamicCache (the reference: KL 0 by definition);
- uniform `KV8`, `K8V4`, `KV4`, `K4V2`, `KV2` and the searched configs
  `searched_configs/<model>/<scheme>/kvtuner_c{3.0,3.5,4.0,6.0}.yaml` (missing ones are noted);
- transformers' own `QuantizedCache` at 2 and 4 bits (quanto backend, else hqq) where installed and
  where the model is supported (it refuses sliding-window models such as Gemma 3).
Columns: equivalent bits; effective bits at `--memory-tokens` (formula; peers: from their bytes);
held-out KL and perplexity (`kvtuner.evaluate.Evaluator`, the same samples for every row of a
model); KV bytes at `--memory-tokens` (a fresh cache filled through `update`, counted from the
tensors it holds) and their ratio to the dense cache; decode tokens/s at `--bench-context` tokens
and its ratio to the dense cache measured side by side (`kvtuner.bench.run_bench`).

Writes under `--out`: `<model>_<scheme>.csv`, `quality_vs_bits_<model>_<scheme>.png`,
`precision_map_<model>_<scheme>.png`, `<model>_<scheme>.md` (the README block), `environment.json`;
and the blocks into `--readme` between `<!-- results:<model>:<scheme>:start -->` and
`<!-- results:<model>:<scheme>:end -->` (a README without the markers is left unchanged;
`--readme-only` places the saved blocks later without measuring again).
Progress goes to stderr, the final tables to stdout. `--quick` is a smoke test of a few minutes
(SmolLM2, per-token, 2 samples, short bench) that writes to a temporary folder, not the README.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from transformers import DynamicCache

from kvtuner.bench import cache_bytes, run_bench, transformers_quantized_cache
from kvtuner.cache import KVTunerCache
from kvtuner.compat import model_shape, sliding_windows, text_config
from kvtuner.config import PrecisionConfig, load_config
from kvtuner.evaluate import EvalProtocol, EvalResult, Evaluator, continuation_logits, eval_samples
from kvtuner.io import atomic_write_text
from kvtuner.models import load_model
from kvtuner.plots import plot_precision_map, plot_quality_vs_bits
from kvtuner.precision import SCHEMES
from kvtuner.search.export import DEFAULT_CAPS, config_filename
from kvtuner.tables import RESULT_COLUMNS, block_key, results_markdown, update_readme

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: summaries, compare_random
import summaries  # noqa: E402

MODELS = ("gemma-3-270m", "smollm2-135m")
UNIFORM = ("KV8", "K8V4", "KV4", "K4V2", "KV2")
PEER_BITS = (4, 2)
ROOT = Path(__file__).resolve().parent.parent
# the searched-vs-random comparison and the headline bench (blocks `random` and `bench`)
RANDOM_MODEL, RANDOM_CAP = "gemma-3-270m", 3.5
BENCH_MODEL, BENCH_CONFIG, BENCH_ROUNDS = "smollm2-135m", "KV4", 7


@dataclass(frozen=True)
class Settings:
    models: tuple[str, ...]
    schemes: tuple[str, ...]
    out: Path
    readme: Path | None
    configs_dir: Path
    samples: int
    seed: int
    protocol: EvalProtocol
    memory_tokens: int
    bench_context: int
    bench_tokens: int
    bench_rounds: int
    peers: bool
    extras: bool = True
    readme_only: bool = False


@dataclass
class Row:
    """One cache of one table: what it is, then what was measured (NaN until measured)."""

    config: str
    kind: str  # dense | uniform | searched | peer
    precision: PrecisionConfig | None = None
    source: str = ""
    note: str = ""
    values: dict[str, Any] = field(default_factory=dict)


_START = time.perf_counter()


def log(message: str) -> None:
    """A progress line on stderr with the seconds since the script started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- rows -----------------------------------------------------------------------------------------
def searched_rows(
    configs_dir: Path, model: str, scheme: str, num_layers: int
) -> tuple[list[Row], list[str]]:
    """The searched configs of (model, scheme) that exist, and a note for each missing cap."""
    rows, notes = [], []
    for cap in DEFAULT_CAPS:
        path = configs_dir / model / scheme / config_filename(cap)
        if not path.is_file():
            notes.append(f"{_relative(path)} not found: row C{cap:g} skipped")
            continue
        config = load_config(path, num_layers=num_layers, scheme=scheme)
        rows.append(Row(f"kvtuner C{cap:g}", "searched", config, _relative(path)))
    return rows, notes


def search_windows(rows: list[Row], settings: Settings) -> int:
    """How many held-out windows the searches scored configs on (seed and protocol as ours), so
    the final evaluation can leave them out: `eval_samples` with one seed is a prefix of the same
    permutation, so the search's windows are the first ones."""
    used = 0
    for row in rows:
        raw = (row.precision.metadata if row.precision else {}).get("evaluation")
        try:
            evaluation = json.loads(raw) if isinstance(raw, str) else (raw or {})
        except json.JSONDecodeError:
            continue
        same = (
            evaluation.get("text", "heldout") == "heldout"
            and evaluation.get("seed") == settings.seed
            and evaluation.get("context") == settings.protocol.context
            and evaluation.get("continuation") == settings.protocol.continuation
        )
        if same:
            used = max(used, int(evaluation.get("samples", 0)))
    return used


# -- measurements ---------------------------------------------------------------------------------
def filled_bytes(make_cache: Callable[[], Any], model_config: Any, tokens: int, dtype) -> int:
    """Bytes a fresh cache holds after `tokens` tokens of right-shaped K/V went into every layer.

    Storage does not depend on the values, so one random `[1, kv_heads, tokens, head_dim]` tensor
    serves every layer.
    """
    cfg = text_config(model_config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(1, cfg.num_key_value_heads, tokens, head_dim, generator=generator)
    states = states.to(dtype)
    cache = make_cache()
    with torch.inference_mode():
        for layer in range(cfg.num_hidden_layers):
            cache.update(states, states.clone(), layer)
    return cache_bytes(cache)


@torch.inference_mode()
def evaluate_cache(evaluator: Evaluator, make_cache: Callable[[], Any]) -> EvalResult:
    """`Evaluator.evaluate` for any transformers Cache (a peer's), same samples and reference."""
    from kvtuner.evaluate import _token_stats  # the same KL/NLL as Evaluator.evaluate

    reference, targets = evaluator.reference(), evaluator.targets
    size = getattr(evaluator, "batch_size", 1)
    kls, nlls = [], []
    for start in range(0, len(evaluator.samples), size):
        batch = evaluator.samples[start : start + size]
        logits = continuation_logits(evaluator.model, batch, make_cache(), evaluator.protocol)
        for j in range(len(batch)):
            kl, nll = _token_stats(reference[start + j], logits[j], targets[start + j])
            kls.append(kl)
            nlls.append(nll)
    return EvalResult(
        kl=sum(kls) / len(kls),
        ppl=math.exp(sum(nlls) / len(nlls)),
        reference_ppl=reference_perplexity(evaluator),
        tokens=len(kls) * evaluator.protocol.continuation,
        per_sample_kl=tuple(kls),
        per_sample_nll=tuple(nlls),
    )


def reference_perplexity(evaluator: Evaluator) -> float:
    """Perplexity of the full-precision model on the evaluator's scored tokens."""
    reference, targets = evaluator.reference(), evaluator.targets
    nll = [-reference[i].gather(-1, targets[i][:, None]).mean().item() for i in range(len(targets))]
    return math.exp(sum(nll) / len(nll))


def quality(result: EvalResult) -> dict[str, float]:
    return {"kl": result.kl, "kl_stderr": result.kl_stderr, "ppl": result.ppl}


def speed(bench: dict[str, Any], row_index: int = 0) -> dict[str, float]:
    """tokens/s of `bench["rows"][row_index]` and its ratio to the dense row (index 1) of the same run."""
    rows = bench["rows"]
    ours, dense = rows[row_index]["tokens_per_s"], rows[1]["tokens_per_s"]
    return {"tokens_per_s": ours, "dense_tokens_per_s": dense, "speed_ratio": ours / dense}


# -- one model --------------------------------------------------------------------------------------
@dataclass
class ModelRun:
    """A loaded model with its evaluator and dense baseline: measures one row at a time."""

    name: str
    loaded: Any
    evaluator: Evaluator
    settings: Settings
    dense_bytes: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def dtype_bits(self) -> int:
        return torch.finfo(self.loaded.dtype).bits

    @property
    def head_dim(self) -> int:
        cfg = text_config(self.loaded.model.config)
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def memory(self, make_cache: Callable[[], Any]) -> dict[str, float]:
        """KV bytes at `memory_tokens` and the bits per element they amount to."""
        kv = filled_bytes(
            make_cache, self.loaded.model.config, self.settings.memory_tokens, self.loaded.dtype
        )
        return {"kv_bytes": kv, "measured_bits": self.dtype_bits * kv / self.dense_bytes}

    def measure_dense(self, row: Row) -> None:
        self.dense_bytes = filled_bytes(
            lambda: DynamicCache(config=self.loaded.model.config),
            self.loaded.model.config,
            self.settings.memory_tokens,
            self.loaded.dtype,
        )
        bits = float(self.dtype_bits)
        row.values.update(
            equivalent_bits=16.0,
            effective_bits=bits,
            measured_bits=bits,
            kl=0.0,
            kl_stderr=0.0,
            ppl=reference_perplexity(self.evaluator),
            kv_bytes=self.dense_bytes,
        )

    def measure_config(self, row: Row, peer_bits: int | None) -> dict[str, Any] | None:
        """Quality, memory and speed of a KVTunerCache row; returns the bench result (None if it failed)."""
        config, settings = row.precision, self.settings
        row.values.update(
            equivalent_bits=config.equivalent_bits,
            effective_bits=config.effective_bits(
                model_shape(self.loaded.model.config), settings.memory_tokens, self.dtype_bits
            ),
        )
        log(f"{self.name} {config.scheme} {row.config}: quality")
        self.attempt(row, "quality", lambda: quality(self.evaluator.evaluate(config)))
        self.attempt(
            row,
            "memory",
            lambda: self.memory(lambda: KVTunerCache(config, self.loaded.model.config)),
        )
        log(f"{self.name} {config.scheme} {row.config}: decode at {settings.bench_context} tokens")
        bench = self.attempt(
            row,
            "decode speed",
            lambda: run_bench(
                self.loaded.model,
                self.loaded.tokenizer,
                config,
                context=settings.bench_context,
                new_tokens=settings.bench_tokens,
                rounds=settings.bench_rounds,
                peer_bits=peer_bits,
                progress=lambda message: log(f"  {row.config} bench {message}"),
            ),
            record=False,
        )
        if bench is not None:
            row.values.update(speed(bench))
        return bench

    def measure_peer(self, row: Row, bits: int, make: Callable[[], Any]) -> None:
        log(f"{self.name} {row.config}: quality")
        row.values["equivalent_bits"] = float(bits)
        self.attempt(row, "quality", lambda: quality(evaluate_cache(self.evaluator, make)))
        if self.attempt(row, "memory", lambda: self.memory(make)) is not None:
            row.values["effective_bits"] = row.values["measured_bits"]

    def attempt(self, row: Row, what: str, measure: Callable[[], Any], record: bool = True) -> Any:
        """`measure()` (its dict merged into the row when `record`), or None after logging a failure:
        one broken row must not cost the hour of measurements around it."""
        try:
            result = measure()
        except Exception as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            message = f"{what} failed ({type(exc).__name__}: {text})"
            log(f"{self.name} {row.config}: {message}")
            row.note = f"{row.note}; {message}" if row.note else message
            self.failures.append(f"{self.name} {row.config}: {message}")
            return None
        if record:
            row.values.update(result)
        return result


def table_rows(
    loaded: Any, settings: Settings
) -> tuple[dict[str, list[Row]], dict[str, list[str]], list[tuple[Row, int, Callable]]]:
    """{scheme: rows}, {scheme: notes} and the peers (row, bits, factory) shared by every table."""
    tables: dict[str, list[Row]] = {}
    notes: dict[str, list[str]] = {}
    peers, peer_notes = peer_rows(loaded.model) if settings.peers else ([], [])
    for scheme in settings.schemes:
        rows = [Row("fp16", "dense", note="the dense DynamicCache (the reference)")]
        rows += [
            Row(spec, "uniform", load_config(spec, num_layers=loaded.num_layers, scheme=scheme))
            for spec in UNIFORM
        ]
        found, missing = searched_rows(settings.configs_dir, loaded.name, scheme, loaded.num_layers)
        tables[scheme] = rows + found + [row for row, _, _ in peers]
        notes[scheme] = missing + peer_notes
        for line in missing:
            log(f"{loaded.name} {scheme}: {line}")
    return tables, notes, peers


def measure_model(name: str, settings: Settings) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """All tables of one model: {scheme: results frame}, plus facts for the captions."""
    log(f"{name}: loading")
    loaded = load_model(name)
    tables, notes, peers = table_rows(loaded, settings)
    skip = search_windows([r for rows in tables.values() for r in rows], settings)
    samples = eval_samples(
        loaded.tokenizer,
        num_samples=skip + settings.samples,
        protocol=settings.protocol,
        seed=settings.seed,
    )[skip:]
    evaluator = Evaluator(loaded.model, samples, settings.protocol, progress=True)
    run = ModelRun(name, loaded, evaluator, settings)
    log(f"{name}: reference on {len(samples)} held-out samples (after the {skip} the search used)")
    peer_bench: dict[int, dict[str, float]] = {}
    for index, scheme in enumerate(settings.schemes):
        dense_speeds = []
        for row in tables[scheme]:
            if row.kind == "dense" and index == 0:
                run.measure_dense(row)
            elif row.kind == "dense":
                row.values = dict(tables[settings.schemes[0]][0].values)
            elif row.kind != "peer":
                # peers are timed beside the uniform row of their bits, in the first table
                bits = {"KV4": 4, "KV2": 2}.get(row.config) if index == 0 and peers else None
                bench = run.measure_config(row, bits)
                if bench is None:
                    continue
                dense_speeds.append(bench["dense_tokens_per_s"])
                if bits and len(bench["rows"]) > 2:
                    peer_bench[bits] = speed(bench, 2)
        dense = tables[scheme][0]
        if dense_speeds:
            median = statistics.median(dense_speeds)
            dense.values.update(tokens_per_s=median, dense_tokens_per_s=median, speed_ratio=1.0)
            dense.note = f"the dense DynamicCache (the reference); tok/s: median of its {len(dense_speeds)} runs"
    for row, bits, make in peers:
        run.measure_peer(row, bits, make)
        row.values.update(peer_bench.get(bits, {}))
    frames = {
        scheme: results_frame(name, scheme, rows, run.dense_bytes)
        for scheme, rows in tables.items()
    }
    facts = {
        "num_layers": loaded.num_layers,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "samples": len(samples),
        "skipped_windows": skip,
        "reference_ppl": tables[settings.schemes[0]][0].values["ppl"],
        "notes": notes,
        "failures": run.failures,
        "sliding": [i for i, w in enumerate(sliding_windows(loaded.model.config)) if w is not None],
        "searched": {
            scheme: [
                (
                    f"{r.config.removeprefix('kvtuner ')} ({r.precision.equivalent_bits:.2f} b)",
                    r.precision.layers,
                )
                for r in rows
                if r.kind == "searched"
            ]
            for scheme, rows in tables.items()
        },
    }
    return frames, facts


def results_frame(model: str, scheme: str, rows: list[Row], dense_bytes: int) -> pd.DataFrame:
    """One table's rows as a frame with the columns of `kvtuner.tables.RESULT_COLUMNS`."""
    records = []
    for row in rows:
        record: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
        record.update(row.values)
        record.update(
            model=model,
            scheme=scheme,
            config=row.config,
            kind=row.kind,
            source=row.source,
            note=row.note,
            dense_kv_bytes=dense_bytes,
            memory_ratio=row.values["kv_bytes"] / dense_bytes if "kv_bytes" in row.values else None,
        )
        records.append(record)
    return pd.DataFrame(records, columns=list(RESULT_COLUMNS))


def peer_rows(model: Any) -> tuple[list[tuple[Row, int, Callable[[], Any]]], list[str]]:
    """transformers' QuantizedCache as (row, bits, factory), and a note for each one not available."""
    peers, notes = [], []
    sliding = any(w is not None for w in sliding_windows(model.config))
    for bits in PEER_BITS:
        peer = transformers_quantized_cache(model, bits)
        if peer is None:
            why = (
                "not supported: it refuses models with sliding-window layers"
                if sliding
                else "no backend installed (pip install optimum-quanto)"
            )
            notes.append(f"transformers QuantizedCache {bits}-bit: {why}")
            continue
        label, make = peer
        backend = "quanto" if "quanto" in label else "hqq"
        row = Row(
            f"QuantizedCache {backend} {bits}-bit",
            "peer",
            source=label,
            note="transformers' own cache: groups of 64 values, a 128-token full-precision "
            "residual, the whole history re-quantized each time the residual fills",
        )
        peers.append((row, bits, make))
    return peers, notes


# -- outputs ----------------------------------------------------------------------------------------
def readme_block(
    frame: pd.DataFrame, model: str, scheme: str, facts: dict[str, Any], settings: Settings
) -> str:
    """The markdown the README shows for one table: the table, what was measured, the plots."""
    p = settings.protocol
    skipped = (
        f", after the {facts['skipped_windows']} windows the search scored"
        if facts["skipped_windows"]
        else ""
    )
    lines = [
        results_markdown(frame),
        "",
        f"{model}, {scheme} scheme, {facts['dtype']} on {os.cpu_count()} cores of {cpu_name()}. "
        f"KL and perplexity: {facts['samples']} held-out samples of {p.context} + "
        f"{p.continuation} tokens (chunks of {p.chunk}, seed {settings.seed}{skipped}; "
        f"reference perplexity {facts['reference_ppl']:.2f}); fp16 is the dense cache itself. "
        f"Effective bits (scales and zeros in {facts['dtype']}) and KV memory at "
        f"{settings.memory_tokens} tokens, the ratio against the dense cache of the same dtype. "
        "Decode tok/s at "
        f"{settings.bench_context} tokens of context, {settings.bench_tokens} new tokens, "
        f"median of {settings.bench_rounds} round(s), each ratio against the dense cache measured "
        "in the same run.",
    ]
    notes = list(facts["notes"].get(scheme, []))
    if facts["sliding"]:
        full = ", ".join(str(i) for i in range(facts["num_layers"]) if i not in facts["sliding"])
        notes.append(
            f"Sliding-window layers hold at most their window; layers {full} hold all "
            f"{settings.memory_tokens} tokens. Equivalent and effective bits average over layers, "
            "so a mixed config's memory (mem. ratio) follows its bits on those layers more."
        )
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    folder = _relative_to(settings.out, settings.readme.parent if settings.readme else ROOT)
    lines += ["", f"![KL vs bits, {model} {scheme}]({folder}/quality_vs_bits_{model}_{scheme}.png)"]
    if (frame["kind"] == "searched").any():
        lines.append(
            f"![per-layer bits, {model} {scheme}]({folder}/precision_map_{model}_{scheme}.png)"
        )
    lines += ["", f"Reproduce: `{_command_line()}`"]
    return "\n".join(lines)


def write_outputs(
    name: str,
    frames: dict[str, pd.DataFrame],
    facts: dict[str, Any],
    settings: Settings,
) -> dict[str, dict[str, str]]:
    """Write one model's CSVs and plots; return its README blocks {key: {"markdown", "title"}}."""
    blocks = {}
    for scheme, frame in frames.items():
        stem = f"{name}_{scheme}"
        csv = settings.out / f"{stem}.csv"
        atomic_write_text(csv, frame.to_csv(index=False, float_format="%.6g"))
        title = f"{name}, {scheme}: KL on {facts['samples']} held-out sample(s)"
        plot_quality_vs_bits(frame, settings.out / f"quality_vs_bits_{stem}.png", title=title)
        if facts["searched"][scheme]:
            full = [i for i in range(facts["num_layers"]) if i not in facts["sliding"]]
            plot_precision_map(
                facts["searched"][scheme],
                settings.out / f"precision_map_{stem}.png",
                title=f"{name}, {scheme}: bits per layer of the searched configs",
                highlight_layers=full if facts["sliding"] else (),
            )
        log(f"wrote {_relative(csv)} and its plots")
        markdown = readme_block(frame, name, scheme, facts, settings)
        atomic_write_text(settings.out / f"{stem}.md", markdown + "\n")
        blocks[block_key(name, scheme)] = {"markdown": markdown, "title": f"{name}, {scheme}"}
    return blocks


def environment(settings: Settings, wall_s: float) -> dict[str, Any]:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("optimum-quanto", "hqq"):
        try:
            from importlib.metadata import version

            versions[package] = version(package)
        except Exception:
            versions[package] = None
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        **versions,
        "dtype": "float32 (the CPU default of kvtuner.models.load_model)",
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "command": _command_line(),
        "wall_time_s": round(wall_s, 1),
        "models": list(settings.models),
        "schemes": list(settings.schemes),
        "samples": settings.samples,
        "seed": settings.seed,
        "protocol": vars(settings.protocol),
        "memory_tokens": settings.memory_tokens,
        "bench": {
            "context": settings.bench_context,
            "new_tokens": settings.bench_tokens,
            "rounds": settings.bench_rounds,
        },
    }


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _command_line() -> str:
    return "python " + shlex.join([_relative(Path(sys.argv[0])), *sys.argv[1:]])


def _relative(path: Path) -> str:
    return _relative_to(path, ROOT)


def _relative_to(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()
    except ValueError:
        return str(path)


# -- command line -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, help="default: both")
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, help="default: both")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: SmolLM2, per-token, tiny counts"
    )
    parser.add_argument("--out", type=Path, help="default docs/results (--quick: a temp folder)")
    parser.add_argument("--readme", type=Path, help="default README.md (--quick: none)")
    parser.add_argument("--no-readme", action="store_true", help="print the tables only")
    parser.add_argument(
        "--no-extras",
        action="store_true",
        help="skip the calibration summary, the searched-vs-random comparison and the headline bench",
    )
    parser.add_argument(
        "--readme-only",
        action="store_true",
        help="measure nothing: put the tables saved in --out (<model>_<scheme>.md) into --readme",
    )
    parser.add_argument("--configs", type=Path, default=ROOT / "searched_configs")
    parser.add_argument("--samples", type=int, help="held-out samples per model (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="which held-out windows (default 0)")
    parser.add_argument("--memory-tokens", type=int, default=4096)
    parser.add_argument("--bench-context", type=int, default=2048)
    parser.add_argument(
        "--bench-tokens", type=int, help="decode steps timed per round (default 32)"
    )
    parser.add_argument(
        "--bench-rounds", type=int, help="timed rounds per bench, median (default 3)"
    )
    parser.add_argument("--no-peers", action="store_true", help="skip transformers' QuantizedCache")
    args = parser.parse_args(argv)
    quick = args.quick
    readme = None if args.no_readme else args.readme or (None if quick else ROOT / "README.md")
    out = args.out or (
        Path(tempfile.gettempdir()) / "kvtuner-reproduce-quick" if quick else ROOT / "docs/results"
    )
    return Settings(
        models=tuple(args.models or (("smollm2-135m",) if quick else MODELS)),
        schemes=tuple(args.schemes or (("per-token",) if quick else SCHEMES)),
        out=out,
        readme=readme,
        configs_dir=args.configs,
        samples=args.samples or (2 if quick else 12),
        seed=args.seed,
        protocol=EvalProtocol(),
        memory_tokens=args.memory_tokens,
        bench_context=args.bench_context if not quick or args.bench_context != 2048 else 256,
        bench_tokens=args.bench_tokens or (4 if quick else 32),
        bench_rounds=args.bench_rounds or (1 if quick else 3),
        peers=not args.no_peers,
        extras=not (quick or args.no_extras),
        readme_only=args.readme_only,
    )


EXTRAS = {
    "calibration": "calibration and search space",
    "random": f"{RANDOM_MODEL} per-token: searched C{RANDOM_CAP:g} against uniform and random configs",
    "bench": f"{BENCH_MODEL} {BENCH_CONFIG}: decode speed and memory against the dense cache",
}


def extra_blocks(settings: Settings) -> dict[str, dict[str, str]]:
    """The README blocks besides the per-model tables (see scripts/summaries.py), saved in --out."""
    markdown = {
        "calibration": summaries.calibration_summary(ROOT / "calibration", MODELS, SCHEMES),
        "random": summaries.random_comparison(RANDOM_MODEL, RANDOM_CAP, log),
        "bench": summaries.bench_headline(
            BENCH_MODEL,
            BENCH_CONFIG,
            context=settings.bench_context,
            new_tokens=settings.bench_tokens,
            rounds=BENCH_ROUNDS,
            log=log,
        ),
    }
    blocks = {}
    for key, text in markdown.items():
        text += f"\n\nReproduce: `{_command_line()}`"
        atomic_write_text(settings.out / f"{key}.md", text + "\n")
        blocks[key] = {"markdown": text, "title": EXTRAS[key]}
    return blocks


def saved_blocks(settings: Settings) -> dict[str, dict[str, str]]:
    """The README blocks a previous run saved in `--out`, for the models and schemes asked."""
    blocks = {}
    for name in settings.models:
        for scheme in settings.schemes:
            path = settings.out / f"{name}_{scheme}.md"
            if path.is_file():
                markdown = path.read_text(encoding="utf-8").strip("\n")
                blocks[block_key(name, scheme)] = {
                    "markdown": markdown,
                    "title": f"{name}, {scheme}",
                }
            else:
                log(f"{_relative(path)} not found: run without --readme-only first")
    for key, title in EXTRAS.items():
        path = settings.out / f"{key}.md"
        if settings.extras and path.is_file():
            blocks[key] = {"markdown": path.read_text(encoding="utf-8").strip("\n"), "title": title}
    return blocks


def place_tables(settings: Settings, tables: dict[str, dict[str, str]]) -> None:
    """Write the blocks into the README (where its markers are) and print them on stdout."""
    if settings.readme is not None:
        missing = update_readme(settings.readme, {k: v["markdown"] for k, v in tables.items()})
        for key in missing:
            log(
                f"{settings.readme}: no markers <!-- results:{key}:start/end --> (or the file is "
                "missing): table printed below, README left unchanged"
            )
    for table in tables.values():
        print(f"\n## {table['title']}\n\n{table['markdown']}")


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    settings = parse_args(argv)
    if settings.readme_only:
        place_tables(settings, saved_blocks(settings))
        return 0
    log(
        f"models {', '.join(settings.models)}; schemes {', '.join(settings.schemes)}; "
        f"{settings.samples} samples; out {settings.out}"
    )
    tables: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    for name in settings.models:
        frames, facts = measure_model(name, settings)
        tables.update(write_outputs(name, frames, facts, settings))
        failures += facts["failures"]
    if settings.extras:
        tables.update(extra_blocks(settings))
    wall = time.perf_counter() - start
    env = environment(settings, wall)
    atomic_write_text(settings.out / "environment.json", json.dumps(env, indent=2) + "\n")
    place_tables(settings, tables)
    for failure in failures:
        log(f"FAILED: {failure}")
    log(
        f"done in {wall / 60:.1f} min"
        + (f", {len(failures)} measurement(s) failed" if failures else "")
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
