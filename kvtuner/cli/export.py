"""`kvtuner export`: write pareto.csv, pareto.png and kvtuner_c<bits>.yaml from a search study."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kvtuner.cli.app import app
from kvtuner.cli.common import (
    DEFAULT_MODEL,
    CapsOption,
    JsonOption,
    ModelOption,
    emit_json,
    parse_caps,
)
from kvtuner.cli.search import StorageOption, StudyOption, export_summary, render
from kvtuner.cli.targets import TARGET_HELP
from kvtuner.errors import ConfigError


@app.command()
def export(
    model: ModelOption = DEFAULT_MODEL,
    scheme: Annotated[str, typer.Option("--scheme", help="per-token or kivi.")] = "per-token",
    objective: Annotated[
        str, typer.Option("--objective", help="The study's objective (for its default name).")
    ] = "kl",
    max_bits: CapsOption = None,
    storage: StorageOption = None,
    study_name: StudyOption = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Output folder (default searched_configs/<model>/<scheme>)."),
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help=TARGET_HELP)] = None,
    json: JsonOption = False,
) -> None:
    """Export the Pareto front and the best config under each cap from an existing study. With
    --target, the best engine plan under each cap of a `kvtuner search --target` study, as plan
    YAML and the engine's files."""
    if target is not None:
        from kvtuner import defaults
        from kvtuner.cli.targets import export_target

        export_target(
            model=model,
            target=target,
            caps=parse_caps(max_bits) if max_bits else defaults.ENGINE_CAPS,
            storage=storage,
            study_name=study_name,
            out=out,
            json=json,
        )
        return
    from kvtuner.models import model_name
    from kvtuner.search.export import export_study
    from kvtuner.search.study import (
        default_storage,
        default_study_name,
        load_existing_study,
        open_storage,
        redact,
        storage_errors,
    )

    caps = parse_caps(max_bits)
    name = model_name(model)
    out_dir = out if out is not None else Path("searched_configs") / name / scheme
    if storage is None:
        if not (out_dir / "study.db").is_file():
            raise ConfigError(
                f"{out_dir / 'study.db'}: no study there (run `kvtuner search` first, or pass --storage)"
            )
        storage = default_storage(out_dir)
    with storage_errors(storage):  # a database lost mid-export: one line, no password
        study = load_existing_study(
            open_storage(storage),
            study_name or default_study_name(name, scheme, objective),
            where=redact(storage),
        )
        result = export_study(study, out_dir, caps)
    summary = export_summary(result, study.user_attrs.get("objective", objective))
    if json:
        emit_json(summary)
        return
    typer.echo(render(summary))
