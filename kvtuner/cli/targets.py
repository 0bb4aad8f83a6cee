"""`--target ENGINE` of `kvtuner calibrate` and `kvtuner allocate`: the same steps on the KV formats a
serving engine stores (kvtuner.targets), ending in the files that engine reads (kvtuner.engines.export)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from kvtuner import defaults
from kvtuner.cli.common import emit_json, info
from kvtuner.errors import ConfigError

TARGET_HELP = "Serving engine whose KV formats to use: vllm, llama.cpp, modelopt or lmdeploy."


def check_model_target(model: str, target: str, model_config: Any) -> int:
    """The model's head_dim; ConfigError (one line: format, model, rule) when the target has no
    format the model can take."""
    from kvtuner.compat import head_dim
    from kvtuner.targets import check_target, head_dim_problem, probes

    check_target(target)
    size = head_dim(model_config)
    if all(c.check_head_dim(size) for c in probes(target)):
        raise ConfigError(f"{model}: {head_dim_problem(target, size)}")
    return size


def skipped_formats(target: str, head_dim: int) -> list[str]:
    from kvtuner.targets import probes

    return [c.label for c in probes(target) if c.check_head_dim(head_dim)]


def calibrate_target(
    *,
    model: str,
    target: str,
    text: Path | None,
    samples: int,
    context: int | None,
    seed: int,
    out: Path,
    device: str,
    dtype: str | None,
    json: bool,
) -> None:
    """Amax and single-layer KL of every format `target` can store, per layer."""
    from kvtuner.calibrate import output_folder
    from kvtuner.compat import sliding_windows
    from kvtuner.data import calibration_text, calibration_windows
    from kvtuner.engine_calibrate import engine_layer_kl, measure_amax, write_engine_calibration
    from kvtuner.evaluate import EvalProtocol, Evaluator
    from kvtuner.models import load_model, load_model_config

    size = check_model_target(model, target, load_model_config(model))
    corpus = calibration_text(text)
    if not corpus.strip():
        raise ConfigError(f"{text or 'calibration text'}: the text is empty")
    info(f"loading {model} ...", json)
    loaded = load_model(model, device=device, dtype=dtype)
    started = time.perf_counter()
    config = loaded.model.config
    context = context or defaults.eval_context(sliding_windows(config))
    continuation = defaults.LAYER_KL_CONTINUATION
    windows = calibration_windows(
        loaded.tokenizer, corpus, context, skip=0, count=samples, seed=seed
    )[:, : context + continuation]
    kv_amax = measure_amax(loaded.model, windows[:, :context])
    evaluator = Evaluator(
        loaded.model, windows, EvalProtocol(context, continuation, continuation), progress=not json
    )
    table = engine_layer_kl(evaluator, target, kv_amax, size, progress=not json)
    seconds = round(time.perf_counter() - started, 1)
    skipped = skipped_formats(target, size)
    metadata = {
        "model": loaded.name,
        "target": target,
        "num_layers": loaded.num_layers,
        "head_dim": size,
        "probes": sorted(set(table.choice)),
        "skipped": skipped,
        "text": str(text) if text is not None else "pydoc_data.topics",
        "samples": samples,
        "context": context,
        "continuation": continuation,
        "seed": seed,
        "device": device,
        "seconds": seconds,
    }
    folder = output_folder(out, loaded.name, target)
    paths = write_engine_calibration(folder, table, kv_amax, metadata)
    summary = {
        **metadata,
        "kl": {
            label: {
                "min": float(rows.kl.min()),
                "median": float(rows.kl.median()),
                "max": float(rows.kl.max()),
            }
            for label, rows in table.groupby("choice", sort=False)
        },
        "files": {k: str(v) for k, v in paths.items()},
    }
    if json:
        emit_json(summary)
        return
    lines = [
        f"{loaded.name} -> {target}: single-layer KL of {len(summary['kl'])} formats x "
        f"{loaded.num_layers} layers ({samples} samples, {context} context + {continuation} scored), {seconds} s",
        "",
        f"{'format':<22} {'KL min':>9} {'median':>9} {'max':>9}   (over layers)",
    ]
    for label, s in summary["kl"].items():
        lines.append(f"{label:<22} {s['min']:>9.2g} {s['median']:>9.2g} {s['max']:>9.2g}")
    if skipped:
        lines.append(f"skipped (head_dim {size}): {', '.join(skipped)}")
    lines += ["", *(f"wrote {p}" for p in summary["files"].values())]
    typer.echo("\n".join(lines))


def plan_name(cap: float) -> str:
    return f"engine_c{cap:g}" if "." in f"{cap:g}" else f"engine_c{cap:.1f}"


def allocate_target(
    *,
    model: str,
    target: str,
    caps: tuple[float, ...],
    context: int,
    calibration: Path,
    out: Path | None,
    evaluate: bool,
    samples: int,
    device: str,
    dtype: str | None,
    json: bool,
) -> None:
    """Per cap: the engine setting and per-layer choices of least summed single-layer KL, written as
    a plan YAML and the engine's files; with `evaluate`, its held-out KL beside the engine's
    all-layers setting."""
    from kvtuner.calibrate import output_folder
    from kvtuner.compat import sliding_windows, text_config
    from kvtuner.engine_calibrate import load_engine_calibration
    from kvtuner.models import load_model_config, model_name
    from kvtuner.plan import engine_allocation

    name = model_name(model)
    model_config = load_model_config(model)
    size = check_model_target(model, target, model_config)
    num_layers = int(text_config(model_config).num_hidden_layers)
    windows = sliding_windows(model_config)
    folder = output_folder(calibration, name, target)
    measured, kv_amax, _ = load_engine_calibration(folder, target, num_layers)
    out_dir = out if out is not None else Path("searched_configs") / name / target / "knapsack"
    rows: list[dict[str, Any]] = []
    for cap in caps:
        found, uniform = engine_allocation(target, measured, size, windows, context, cap)
        if found is None:
            rows.append({"cap": cap, "plan": None})
            continue
        plan = replace(
            found.plan.with_amax(kv_amax),
            model=name,
            metadata={
                "objective": "summed single-layer KL",
                "value": found.loss,
                "cap": cap,
                "budget": "effective bits of engine storage",
                "budget_context": context,
                "effective_bits": found.bits,
                "found_by": f"kvtuner allocate --target {target}",
            },
        )
        rows.append(
            {
                "cap": cap,
                "plan": plan,
                "uniform": None if uniform is None else uniform.with_amax(kv_amax),
                "summed_kl": found.loss,
            }
        )
    results = _evaluate(model, rows, samples, device, dtype, json) if evaluate else {}
    summary = _write(rows, out_dir, results, size, windows, context, name, target)
    if json:
        emit_json(summary)
        return
    typer.echo(render_allocation(summary))


def _evaluate(
    model: str, rows: list[dict[str, Any]], samples: int, device: str, dtype: str | None, json: bool
) -> dict[tuple[float, str], Any]:
    """Held-out KL of each cap's plan and all-layers setting, on the same samples."""
    from kvtuner.engine_cache import EngineKVCache
    from kvtuner.evaluate import Evaluator, eval_samples, protocol_for
    from kvtuner.models import load_model

    info(f"loading {model} ...", json)
    loaded = load_model(model, device=device, dtype=dtype)
    protocol = protocol_for(loaded.model.config)
    tokens = eval_samples(loaded.tokenizer, None, samples, protocol)
    evaluator = Evaluator(loaded.model, tokens, protocol, progress=not json)
    results = {}
    for row in rows:
        for kind in ("plan", "uniform"):
            plan = row.get(kind)
            if plan is None:
                continue
            results[(row["cap"], kind)] = evaluator.evaluate_cache(
                lambda plan=plan: EngineKVCache(plan, loaded.model.config)
            )
    return results


def _write(
    rows: list[dict[str, Any]],
    out_dir: Path,
    results: dict[tuple[float, str], Any],
    head_dim: int,
    windows: list[int | None],
    context: int,
    name: str,
    target: str,
) -> dict[str, Any]:
    from kvtuner.engines.export import commands, write_engine_files
    from kvtuner.evaluate import stderr
    from kvtuner.memory import engine_effective_bits

    out_rows = []
    for row in rows:
        plan = row["plan"]
        if plan is None:
            out_rows.append({"cap": row["cap"], "path": None})
            continue
        stem = out_dir / plan_name(row["cap"])
        path = plan.save(stem.with_name(stem.name + ".yaml"))
        files = write_engine_files(plan, stem)
        entry: dict[str, Any] = {
            "cap": row["cap"],
            "path": str(path),
            "files": [str(f) for f in files],
            "setting": plan.family,
            "layers": [c.label for c in plan.layers],
            "effective_bits": engine_effective_bits(plan.layers, head_dim, windows, context),
            "summed_kl": row["summed_kl"],
            **commands(plan),
        }
        uniform = row.get("uniform")
        if uniform is not None:
            entry["uniform"] = {
                "setting": uniform.layers[0].label,
                "effective_bits": engine_effective_bits(uniform.layers, head_dim, windows, context),
            }
        mine, theirs = results.get((row["cap"], "plan")), results.get((row["cap"], "uniform"))
        if mine is not None:
            entry["heldout_kl"] = mine.kl
            entry["heldout_kl_stderr"] = mine.kl_stderr
        if theirs is not None:
            entry["uniform"]["heldout_kl"] = theirs.kl
            entry["uniform"]["heldout_kl_stderr"] = theirs.kl_stderr
            diff = [a - b for a, b in zip(mine.per_sample_kl, theirs.per_sample_kl)]
            entry["paired_difference"] = sum(diff) / len(diff)
            entry["paired_difference_stderr"] = stderr(diff)
        out_rows.append(entry)
    return {"model": name, "target": target, "context": context, "configs": out_rows}


def render_allocation(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['model']} -> {summary['target']}: exact knapsack on single-layer KL, caps on "
        f"effective bits of engine storage at {summary['context']} tokens",
    ]
    for row in summary["configs"]:
        lines.append("")
        if row["path"] is None:
            lines.append(f"cap {row['cap']:g}: no setting of {summary['target']} fits")
            continue
        lines.append(
            f"cap {row['cap']:g}: {row['setting']}, {row['effective_bits']:.2f} effective bits, "
            f"summed single-layer KL {row['summed_kl']:.4g}"
        )
        if "command" in row:
            lines.append(f"  {row['command']}")
        if "kv_cache_quant_algo" in row:
            lines.append(
                f"  hf_quant_config.json: kv_cache_quant_algo {row['kv_cache_quant_algo']}"
            )
        if "heldout_kl" in row:
            lines.append(f"  held-out KL {row['heldout_kl']:.4f} ± {row['heldout_kl_stderr']:.4f}")
        uniform = row.get("uniform")
        if uniform and "heldout_kl" in uniform:
            lines.append(
                f"  all layers {uniform['setting']} ({uniform['effective_bits']:.2f} bits): "
                f"{uniform['heldout_kl']:.4f} ± {uniform['heldout_kl_stderr']:.4f}; paired "
                f"difference {row['paired_difference']:+.4f} ± {row['paired_difference_stderr']:.4f}"
            )
        lines.append(f"  wrote {row['path']} and {', '.join(row['files'])}")
    return "\n".join(lines)


def eval_engine(
    *,
    model: str,
    config: str,
    text: Path | None,
    samples: int,
    context: int | None,
    continuation: int,
    chunk: int,
    seed: int,
    device: str,
    dtype: str | None,
    json: bool,
) -> None:
    """`kvtuner eval --config` on an engine plan or exported engine file: held-out KL of what that
    engine will store (kvtuner.engine_cache)."""
    from kvtuner.compat import head_dim, sliding_windows, text_config
    from kvtuner.data import heldout_text
    from kvtuner.engine_cache import EngineKVCache
    from kvtuner.engines.export import load_engine_config, needs_amax
    from kvtuner.evaluate import EvalProtocol, Evaluator, eval_samples, protocol_for
    from kvtuner.memory import engine_effective_bits
    from kvtuner.models import load_model, load_model_config

    model_config = load_model_config(model)
    plan = load_engine_config(config, int(text_config(model_config).num_hidden_layers))
    size = head_dim(model_config)
    for choice in set(plan.layers):
        problem = choice.check_head_dim(size)
        if problem:
            raise ConfigError(f"{model}: {problem}")
    EvalProtocol(context or defaults.EVAL_CONTEXT, continuation, chunk)
    long = (context or 0) > defaults.LONG_CONTEXT  # long contexts need the long held-out text
    corpus = heldout_text(text, long=long)
    info(f"loading {model} ...", json)
    loaded = load_model(model, device=device, dtype=dtype)
    if needs_amax(plan):
        plan = plan.with_amax(_calibration_amax(loaded, seed))
        info("per-tensor scales: amax measured on the calibration text", json)
    protocol = EvalProtocol(
        context or protocol_for(loaded.model.config).context, continuation, chunk
    )
    tokens = eval_samples(loaded.tokenizer, corpus, samples, protocol, seed=seed)
    result = Evaluator(loaded.model, tokens, protocol, progress=not json).evaluate_cache(
        lambda: EngineKVCache(plan, loaded.model.config)
    )
    windows = sliding_windows(loaded.model.config)
    summary = {
        "model": loaded.name,
        "config": str(config),
        "target": plan.target,
        "setting": plan.family,
        "layers": [c.label for c in plan.layers],
        "kl": result.kl,
        "kl_stderr": result.kl_stderr,
        "ppl": result.ppl,
        "reference_ppl": result.reference_ppl,
        "effective_bits": engine_effective_bits(
            plan.layers, size, windows, defaults.BUDGET_CONTEXT
        ),
        "effective_bits_context": defaults.BUDGET_CONTEXT,
        "tokens": result.tokens,
        "samples": samples,
        "context": protocol.context,
        "continuation": continuation,
        "per_sample_kl": list(result.per_sample_kl),
        "text": str(text) if text is not None else ("heldout-long" if long else "heldout"),
    }
    if json:
        emit_json(summary)
        return
    typer.echo(
        "\n".join(
            [
                f"{summary['model']}  {config}  ({plan.target}: {plan.family})",
                f"effective bits   {summary['effective_bits']:.3f} of engine storage (at "
                f"{defaults.BUDGET_CONTEXT} tokens)",
                f"KL(fp || engine) {result.kl:.4f} ± {result.kl_stderr:.4f} nats/token",
                f"perplexity       {result.ppl:.3f}   (full precision {result.reference_ppl:.3f})",
                f"scored tokens    {result.tokens}  ({samples} samples, {protocol.context} context"
                f" + {continuation} scored)",
            ]
        )
    )


def _calibration_amax(
    loaded: Any, seed: int, text: Path | None = None
) -> list[tuple[float, float]]:
    from kvtuner.compat import sliding_windows
    from kvtuner.data import calibration_text, calibration_windows
    from kvtuner.engine_calibrate import measure_amax

    context = defaults.eval_context(sliding_windows(loaded.model.config))
    windows = calibration_windows(
        loaded.tokenizer, calibration_text(text), context, skip=0,
        count=defaults.LAYER_KL_SAMPLES, seed=seed,
    )  # fmt: skip
    return measure_amax(loaded.model, windows[:, :context])


def show_engine(config: str, model: str | None, context: int, json: bool) -> None:
    """`kvtuner show` of an engine plan or exported file: per-layer formats, what to paste, and
    (with a model, or a plan naming its model) effective bits of engine storage."""
    from kvtuner.compat import head_dim, sliding_windows, text_config
    from kvtuner.engines.export import commands, is_engine_file, load_engine_config
    from kvtuner.memory import engine_effective_bits
    from kvtuner.models import load_model_config
    from kvtuner.plan import load_plan

    if model is None and not is_engine_file(config):
        model = load_plan(config).model
    if model is None:
        raise ConfigError(f"{config}: an engine file does not name its layer count: pass --model")
    model_config = load_model_config(model)
    plan = load_engine_config(config, int(text_config(model_config).num_hidden_layers))
    size = head_dim(model_config)
    summary = {
        "config": str(config),
        "target": plan.target,
        "setting": plan.family,
        "model": model,
        "num_layers": plan.num_layers,
        "layers": [c.label for c in plan.layers],
        "effective_bits": engine_effective_bits(
            plan.layers, size, sliding_windows(model_config), context
        ),
        "context": context,
        **commands(plan),
    }
    if json:
        emit_json(summary)
        return
    lines = [
        f"config:          {config}  ({plan.target}: {plan.family}, model {model})",
        f"effective bits:  {summary['effective_bits']:.3f} of engine storage (at {context} tokens)",
    ]
    if "command" in summary:
        lines.append(f"command:         {summary['command']}")
    if "kv_cache_quant_algo" in summary:
        lines.append(f"kv_cache_quant_algo: {summary['kv_cache_quant_algo']}")
    lines += ["", "layer  keys / values"]
    lines += [f"{i:>5}  {c.label}" for i, c in enumerate(plan.layers)]
    typer.echo("\n".join(lines))


def _engine_space(model: str, target: str, context: int) -> tuple[Any, str, Any]:
    from kvtuner.compat import sliding_windows, text_config
    from kvtuner.models import load_model_config, model_name
    from kvtuner.search.engine import EngineSpace

    model_config = load_model_config(model)
    size = check_model_target(model, target, model_config)
    num_layers = int(text_config(model_config).num_hidden_layers)
    space = EngineSpace.of(target, num_layers, size, sliding_windows(model_config), context)
    return space, model_name(model), model_config


def search_target(
    *,
    model: str,
    target: str,
    caps: tuple[float, ...],
    context: int,
    trials: int,
    population: int,
    storage: str | None,
    study_name: str | None,
    out: Path | None,
    calibration: Path,
    samples: int,
    continuation: int,
    text: Path | None,
    seed: int,
    device: str,
    dtype: str | None,
    json: bool,
) -> None:
    """NSGA-II over the engine's settings and per-layer choices (kvtuner.search.engine), seeded
    with the knapsack's plans when the target was calibrated; then the best plan per cap."""
    from kvtuner.calibrate import output_folder
    from kvtuner.data import calibration_text, calibration_windows
    from kvtuner.engine_cache import EngineKVCache
    from kvtuner.engine_calibrate import load_engine_calibration
    from kvtuner.evaluate import EvalProtocol, Evaluator
    from kvtuner.models import load_model
    from kvtuner.plan import allocate_plan
    from kvtuner.search.engine import run_engine_search
    from kvtuner.search.study import default_storage, open_storage, redact, storage_errors

    space, name, _ = _engine_space(model, target, context)
    out_dir = out if out is not None else Path("searched_configs") / name / target
    storage = storage or default_storage(out_dir)
    if storage.startswith("sqlite:///"):
        out_dir.mkdir(parents=True, exist_ok=True)
    study_name = study_name or f"{name}-{target}"
    folder = output_folder(calibration, name, target)
    seeds, kv_amax = [], None
    if (folder / "layer_kl.csv").is_file():
        measured, kv_amax, _ = load_engine_calibration(folder, target, space.num_layers)
        for cap in caps:
            found = allocate_plan(target, measured, space.head_dim, space.windows, context, cap)
            if found is not None:
                seeds.append(found.plan)
    info(f"loading {model} ...", json)
    loaded = load_model(model, device=device, dtype=dtype)
    eval_context = defaults.eval_context(space.windows)
    # the windows after the calibration's (0..LAYER_KL_SAMPLES-1), as kvtuner's own search does
    windows = calibration_windows(
        loaded.tokenizer,
        calibration_text(text),
        eval_context,
        skip=defaults.LAYER_KL_SAMPLES,
        count=samples,
        seed=seed,
    )[:, : eval_context + continuation]
    if kv_amax is None:
        kv_amax = _calibration_amax(loaded, seed, text)
    evaluator = Evaluator(loaded.model, windows, EvalProtocol(eval_context, continuation))

    def score(plan: Any) -> float:
        plan = plan.with_amax(kv_amax)
        return evaluator.evaluate_cache(lambda: EngineKVCache(plan, loaded.model.config)).kl

    with storage_errors(storage):
        study = run_engine_search(
            space,
            score,
            max_bits=max(caps),
            trials=trials,
            population=population,
            storage=open_storage(storage),
            study_name=study_name,
            seeds=seeds,
            seed=seed,
            progress=not json,
        )
        study.set_user_attr("kv_amax", [list(a) for a in kv_amax])
        study.set_user_attr("model", name)
        study.set_user_attr("context", context)
        _export(study, space, caps, kv_amax, out_dir, name, redact(storage), json)


def export_target(
    *,
    model: str,
    target: str,
    caps: tuple[float, ...],
    storage: str | None,
    study_name: str | None,
    out: Path | None,
    json: bool,
) -> None:
    """The best plan per cap of an existing `kvtuner search --target` study."""
    import optuna

    from kvtuner.models import model_name
    from kvtuner.search.study import (
        default_storage,
        open_storage,
        redact,
        storage_errors,
        study_exists,
    )

    name = model_name(model)
    out_dir = out if out is not None else Path("searched_configs") / name / target
    if storage is None:
        if not (out_dir / "study.db").is_file():
            raise ConfigError(
                f"{out_dir / 'study.db'}: no study there (run `kvtuner search --target {target}` "
                "first, or pass --storage)"
            )
        storage = default_storage(out_dir)
    with storage_errors(storage):
        opened, label = open_storage(storage), study_name or f"{name}-{target}"
        if not study_exists(opened, label):
            names = ", ".join(s.study_name for s in opened.get_all_studies()) or "none"
            raise ConfigError(
                f"study '{label}' in {redact(storage)}: no such study (studies there: {names})"
            )
        study = optuna.load_study(study_name=label, storage=opened)
        if study.user_attrs.get("target") != target:
            raise ConfigError(
                f"study {study.study_name}: searched for target {study.user_attrs.get('target')!r}, not {target!r}"
            )
        context = int(study.user_attrs.get("context", defaults.BUDGET_CONTEXT))
        space, name, _ = _engine_space(model, target, context)
        kv_amax = [tuple(a) for a in study.user_attrs["kv_amax"]]
        _export(study, space, caps, kv_amax, out_dir, name, redact(storage), json)


def _export(
    study: Any,
    space: Any,
    caps: tuple[float, ...],
    kv_amax: Any,
    out_dir: Path,
    name: str,
    where: str,
    json: bool,
) -> None:
    from kvtuner.engines.export import commands, write_engine_files
    from kvtuner.search.engine import best_per_cap

    rows: list[dict[str, Any]] = []
    for cap, best in best_per_cap(study, space, caps).items():
        if best is None:
            rows.append({"cap": cap, "path": None})
            continue
        plan, kl, bits = best
        plan = replace(
            plan.with_amax(kv_amax),
            model=name,
            metadata={
                "objective": "joint KL on calibration samples",
                "value": kl,
                "cap": cap,
                "budget": "effective bits of engine storage",
                "budget_context": space.context,
                "effective_bits": bits,
                "found_by": f"kvtuner search --target {space.target} (NSGA-II)",
            },
        )
        stem = out_dir / plan_name(cap)
        path = plan.save(stem.with_name(stem.name + ".yaml"))
        files = write_engine_files(plan, stem)
        rows.append(
            {
                "cap": cap,
                "path": str(path),
                "files": [str(f) for f in files],
                "setting": plan.family,
                "layers": [c.label for c in plan.layers],
                "effective_bits": bits,
                "search_kl": kl,
                **commands(plan),
            }
        )
    finished = sum(1 for t in study.trials if t.state.name == "COMPLETE")
    summary = {
        "model": name,
        "target": space.target,
        "storage": where,
        "study": study.study_name,
        "trials": finished,
        "configs": rows,
    }
    if json:
        emit_json(summary)
        return
    lines = [f"{name} -> {space.target}: {finished} trials in {where} (study {study.study_name})"]
    for row in rows:
        lines.append("")
        if row["path"] is None:
            lines.append(f"cap {row['cap']:g}: no trial fits")
            continue
        lines.append(
            f"cap {row['cap']:g}: {row['setting']}, {row['effective_bits']:.2f} effective bits, "
            f"joint KL {row['search_kl']:.4g} (calibration samples)"
        )
        if "command" in row:
            lines.append(f"  {row['command']}")
        lines.append(f"  wrote {row['path']} and {', '.join(row['files'])}")
    typer.echo("\n".join(lines))
