"""`kvtuner search`: NSGA-II over layer groups (quality loss, equivalent bits), then export."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from kvtuner.cli.app import app
from kvtuner.cli.common import (
    DEFAULT_MODEL,
    CapsOption,
    ChunkOption,
    ContextOption,
    ContinuationOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    MaxNewTokensOption,
    ModelOption,
    SeedOption,
    emit_json,
    parse_caps,
)

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
        typer.Option("--scheme", help="per-token or kivi (default: the space's, else per-token)."),
    ] = None,
    max_bits: CapsOption = None,
    trials: Annotated[
        int,
        typer.Option("--trials", help="Total completed trials of the study (a rerun continues)."),
    ] = 150,
    population: Annotated[int, typer.Option("--population", help="NSGA-II population size.")] = 20,
    objective: Annotated[
        str, typer.Option("--objective", help="kl, ppl, accuracy (needs --tasks) or proxy.")
    ] = "kl",
    backend: Annotated[
        str, typer.Option("--backend", help="optuna (NSGA-II sampler) or pymoo (NSGA2).")
    ] = "optuna",
    storage: StorageOption = None,
    study_name: StudyOption = None,
    workers: Annotated[
        int, typer.Option("--workers", help="Processes on this machine, each loading the model.")
    ] = 1,
    space: Annotated[
        Path | None,
        typer.Option(
            "--space",
            help="space.yaml (default calibration/<model>/<scheme>/space.yaml; made if missing).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default searched_configs/<model>/<scheme>)."),
    ] = None,
    calibration: Annotated[
        Path, typer.Option("--calibration", help="Root of calibration outputs.")
    ] = Path("calibration"),
    max_groups: Annotated[
        int,
        typer.Option(
            "--max-groups",
            help="Layer groups when the space must be built first (calibrate + prune).",
        ),
    ] = 6,
    samples: Annotated[
        int, typer.Option("--samples", help="Held-out samples per evaluation (kl, ppl).")
    ] = 2,
    context: ContextOption = 512,
    continuation: ContinuationOption = 64,
    chunk: ChunkOption = 32,
    text: Annotated[
        Path | None,
        typer.Option("--text", help="Evaluation text (default: shipped held-out text)."),
    ] = None,
    tasks: Annotated[
        Path | None,
        typer.Option("--tasks", help="JSONL of {question, answer} for --objective accuracy."),
    ] = None,
    max_new_tokens: MaxNewTokensOption = 256,
    seed: SeedOption = 0,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    json: JsonOption = False,
) -> None:
    """Search layer-wise (key bits, value bits) under bit caps; write pareto.csv/png and kvtuner_c<bits>.yaml."""
    from kvtuner.search import SearchSettings, run_search

    caps = parse_caps(max_bits)
    options: dict[str, Any] = {
        "--model": model,
        "--scheme": scheme,
        "--max-bits": ",".join(f"{c:g}" for c in caps),
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
        trials=trials,
        population=population,
        objective=objective,
        backend=backend,
        storage=storage,
        study_name=study_name,
        workers=workers,
        space=str(space) if space is not None else None,
        out=str(out) if out is not None else None,
        calibration=str(calibration),
        max_groups=max_groups,
        samples=samples,
        context=context,
        continuation=continuation,
        chunk=chunk,
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
    lines.append(f"{'cap':>5}  {'bits':>5}  {'eff.':>5}  {'value':>9}  layers")
    for c in summary["configs"]:
        lines.append(
            f"{c['cap']:>5g}  {c['equivalent_bits']:>5.2f}  {(c['effective_bits'] or 0):>5.2f}  {c['value']:>9.4g}  {c['layers']}"
        )
    for cap in summary["missing_caps"]:
        lines.append(f"{cap:>5g}  no evaluated config under this cap")
    lines += [
        "",
        f"wrote {summary['pareto_csv']}, {summary['pareto_png']} and {len(summary['configs'])} configs in {summary['out']}",
    ]
    return "\n".join(lines)
