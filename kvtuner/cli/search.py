"""`kvtuner search`: NSGA-II from the knapsack front (quality loss, budget bits), then export."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from kvtuner import defaults
from kvtuner.cli.app import app
from kvtuner.cli.common import (
    DEFAULT_MODEL,
    BudgetContextOption,
    BudgetOption,
    CapsOption,
    ChunkOption,
    ContinuationOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    MaxNewTokensOption,
    ModelOption,
    SeedOption,
    check_budget,
    emit_json,
    parse_caps,
)
from kvtuner.cli.targets import TARGET_HELP

StorageOption = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Optuna storage: sqlite:///file.db, journal:///file.journal (or a .db / .journal path), "
        "postgresql://user:pass@host/db (default: <out>/study.db).",
    ),
]
StudyOption = Annotated[
    str | None,
    typer.Option("--study-name", help="Study name (default <model>-<scheme>-<objective>)."),
]


@app.command()
def search(
    model: ModelOption = DEFAULT_MODEL,
    scheme: Annotated[
        str | None,
        typer.Option(
            "--scheme", help="per-token or kivi (default: a space file's, else per-token)."
        ),
    ] = None,
    max_bits: CapsOption = None,
    budget: BudgetOption = defaults.BUDGET,
    context: BudgetContextOption = defaults.BUDGET_CONTEXT,
    trials: Annotated[
        int,
        typer.Option(
            "--trials", min=1, help="Total completed trials of the study (a rerun continues)."
        ),
    ] = defaults.TRIALS,
    population: Annotated[
        int, typer.Option("--population", min=2, help="NSGA-II population size.")
    ] = defaults.POPULATION,
    objective: Annotated[
        str, typer.Option("--objective", help="kl, ppl, accuracy (needs --tasks) or proxy.")
    ] = "kl",
    backend: Annotated[
        str, typer.Option("--backend", help="optuna (NSGA-II sampler) or pymoo (NSGA2).")
    ] = "optuna",
    storage: StorageOption = None,
    study_name: StudyOption = None,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, help="Processes on this machine, each loading the model."),
    ] = 1,
    space: Annotated[
        str,
        typer.Option(
            "--space",
            help="layers (one variable per layer over its Pareto pairs, the default), groups "
            "(prune's clustered space.yaml), or a space.yaml path.",
        ),
    ] = "layers",
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default searched_configs/<model>/<scheme>)."),
    ] = None,
    calibration: Annotated[
        Path, typer.Option("--calibration", help="Root of calibration outputs (made if missing).")
    ] = Path("calibration"),
    max_size: Annotated[
        int,
        typer.Option(
            "--max-size", min=1, help="Largest grouped space when it must be built (prune)."
        ),
    ] = defaults.MAX_SPACE_SIZE,
    samples: Annotated[
        int,
        typer.Option("--samples", min=1, help="Calibration-side samples per trial (kl, ppl)."),
    ] = defaults.SEARCH_SAMPLES,
    eval_context: Annotated[
        int | None,
        typer.Option(
            "--eval-context",
            min=2,
            help="Context tokens of a trial's samples (default: the calibration's, 512 or twice "
            "the widest sliding window).",
        ),
    ] = None,
    continuation: ContinuationOption = defaults.SEARCH_CONTINUATION,
    chunk: ChunkOption = defaults.EVAL_CHUNK,
    rescore_samples: Annotated[
        int,
        typer.Option(
            "--rescore-samples",
            min=0,
            help="More samples the best candidates of each cap are scored on before export.",
        ),
    ] = defaults.RESCORE_SAMPLES,
    rescore_top: Annotated[
        int,
        typer.Option("--rescore-top", min=0, help="Candidates per cap re-scored."),
    ] = defaults.RESCORE_TOP,
    text: Annotated[
        Path | None,
        typer.Option(
            "--text", help="Text the trials are scored on (default: the calibration text)."
        ),
    ] = None,
    tasks: Annotated[
        Path | None,
        typer.Option("--tasks", help="JSONL of {question, answer} for --objective accuracy."),
    ] = None,
    max_new_tokens: MaxNewTokensOption = 256,
    seed: SeedOption = 0,
    target: Annotated[str | None, typer.Option("--target", help=TARGET_HELP)] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    json: JsonOption = False,
) -> None:
    """Search layer-wise (key bits, value bits) under bit caps from the exact knapsack front; write
    pareto.csv/png and kvtuner_c<bits>.yaml. With --target, over the settings and per-layer
    formats that engine can express, writing plans and the engine's files."""
    from kvtuner.search import SearchSettings, run_search

    if target is not None:
        from kvtuner.cli.targets import search_target

        search_target(
            model=model,
            target=target,
            caps=parse_caps(max_bits) if max_bits else defaults.ENGINE_CAPS,
            context=context,
            trials=trials,
            population=population,
            storage=storage,
            study_name=study_name,
            out=out,
            calibration=calibration,
            samples=samples,
            continuation=continuation,
            text=text,
            seed=seed,
            device=device,
            dtype=dtype,
            json=json,
        )
        return
    caps = parse_caps(max_bits)
    check_budget(budget)
    options: dict[str, Any] = {
        "--model": model,
        "--scheme": scheme,
        "--max-bits": ",".join(f"{c:g}" for c in caps),
        "--budget": budget,
        "--context": context if budget == "effective" else None,
        "--space": space,
        "--objective": objective,
        "--backend": backend,
        "--trials": trials,
        "--population": population,
        "--samples": samples if objective in ("kl", "ppl") else None,
        "--tasks": tasks,
        "--seed": seed,
    }
    command = "kvtuner search " + " ".join(
        f"{k} {shlex.quote(str(v))}" for k, v in options.items() if v is not None
    )
    settings = SearchSettings(
        model=model,
        scheme=scheme,
        caps=caps,
        budget=budget,
        budget_context=context,
        trials=trials,
        population=population,
        objective=objective,
        backend=backend,
        storage=storage,
        study_name=study_name,
        workers=workers,
        space=space,
        out=str(out) if out is not None else None,
        calibration=str(calibration),
        max_size=max_size,
        samples=samples,
        context=eval_context,
        continuation=continuation,
        chunk=chunk,
        rescore_samples=rescore_samples,
        rescore_top=rescore_top,
        text=str(text) if text is not None else None,
        tasks=str(tasks) if tasks is not None else None,
        max_new_tokens=max_new_tokens,
        seed=seed,
        device=device,
        dtype=dtype,
        command=command,
    )
    outcome = run_search(settings, quiet=json)
    summary = summarize(outcome)
    if json:
        emit_json(summary)
        return
    typer.echo(render(summary))


def summarize(outcome: Any) -> dict[str, Any]:
    """The `--json` object of search (and export): study, trials, files, and the config per cap."""
    export = outcome.export
    summary = {
        "study": outcome.study_name,
        "storage": outcome.storage,
        "objective": outcome.objective,
        "backend": outcome.backend,
        "trials": outcome.trials,
        "new_trials": outcome.new_trials,
        "seconds": round(outcome.seconds, 1),
        "groups": outcome.groups,
        "space_size": outcome.space_size,
    }
    return {**summary, **export_summary(export, outcome.objective)}


def export_summary(export: Any, objective: str) -> dict[str, Any]:
    return {
        "out": str(export.out_dir),
        "pareto_csv": str(export.pareto_csv),
        "pareto_png": str(export.pareto_png),
        "configs_evaluated": export.trials,
        "front_size": len(export.front),
        "configs": [
            {
                "cap": c.cap,
                "path": str(c.path),
                "equivalent_bits": c.equivalent_bits,
                "effective_bits": c.effective_bits,
                "value": c.loss,
                **c.metrics,
                "source": c.source,
                "layers": c.layers,
                "trial": c.trial,
            }
            for c in export.choices
        ],
        "missing_caps": list(export.missing_caps),
    }


def render(summary: dict[str, Any]) -> str:
    lines = []
    if "study" in summary:
        lines.append(
            f"study {summary['study']} ({summary['storage']}): {summary['trials']} trials "
            f"({summary['new_trials']} new, {summary['seconds']:.0f} s), {summary['groups']} groups, "
            f"{summary['space_size']:,} configs in the space"
        )
    lines.append(
        f"{summary['configs_evaluated']} distinct configs evaluated, {summary['front_size']} on the Pareto front"
    )
    lines.append("")
    lines.append(f"{'cap':>5}  {'eff.':>5}  {'equiv.':>6}  {'value':>9}  {'source':<8}  layers")
    for c in summary["configs"]:
        lines.append(
            f"{c['cap']:>5g}  {(c['effective_bits'] or 0):>5.2f}  {c['equivalent_bits']:>6.2f}  "
            f"{c['value']:>9.4g}  {c.get('source', ''):<8}  {c['layers']}"
        )
    for cap in summary["missing_caps"]:
        lines.append(f"{cap:>5g}  no evaluated config under this cap")
    lines += [
        "",
        f"wrote {summary['pareto_csv']}, {summary['pareto_png']} and {len(summary['configs'])} configs in {summary['out']}",
    ]
    return "\n".join(lines)
