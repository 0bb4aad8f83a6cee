"""`kvtuner prune`: Pareto-prune each layer's pairs, cluster layers -> <out>/<model>/<scheme>/space.yaml."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from kvtuner import defaults
from kvtuner.cli.app import app
from kvtuner.cli.common import DEFAULT_MODEL, JsonOption, emit_json
from kvtuner.errors import ConfigError


@app.command()
def prune(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help=f"Model whose calibration to read (default {DEFAULT_MODEL}); checked against --sensitivity.",
        ),
    ] = None,
    scheme: Annotated[
        str | None, typer.Option("--scheme", help="per-token or kivi (default per-token).")
    ] = None,
    sensitivity: Annotated[
        Path | None,
        typer.Option(
            "--sensitivity",
            help="sensitivity.csv (default <out>/<model>/<scheme>/sensitivity.csv).",
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            min=0.0,
            help="Relative e_o margin: drop a pair when a cheaper one is within it.",
        ),
    ] = defaults.TOLERANCE,
    max_size: Annotated[
        int,
        typer.Option(
            "--max-size",
            min=1,
            help="The most layer groups whose space holds at most this many configs (default).",
        ),
    ] = defaults.MAX_SPACE_SIZE,
    max_groups: Annotated[
        int | None,
        typer.Option(
            "--max-groups", min=1, help="At most K groups instead (single linkage on log10 e_o)."
        ),
    ] = None,
    eps: Annotated[
        float | None,
        typer.Option(
            "--eps",
            min=0.0,
            help="The paper's DBSCAN with this radius on log10 e_o profiles instead.",
        ),
    ] = None,
    min_samples: Annotated[
        int, typer.Option("--min-samples", min=1, help="DBSCAN min_samples (with --eps).")
    ] = defaults.MIN_SAMPLES,
    out: Annotated[
        Path, typer.Option("--out", help="Root folder; space.yaml goes to <out>/<model>/<scheme>/.")
    ] = Path("calibration"),
    json: JsonOption = False,
) -> None:
    """Shrink the search space: Pareto pairs per layer, then DBSCAN groups of layers."""
    from kvtuner.calibrate import load_sensitivity, output_folder
    from kvtuner.cluster import build_search_space
    from kvtuner.models import model_name

    if sensitivity is None:
        sensitivity = (
            output_folder(out, model_name(model or DEFAULT_MODEL), scheme or "per-token")
            / "sensitivity.csv"
        )
    table, meta = load_sensitivity(sensitivity)
    if model is not None and model_name(model) != meta["model"]:
        raise ConfigError(
            f"{sensitivity}: calibrated for model '{meta['model']}', not '{model_name(model)}'"
        )
    if scheme is not None and scheme != meta.get("scheme"):
        raise ConfigError(
            f"{sensitivity}: calibrated under scheme '{meta.get('scheme')}', not '{scheme}'"
        )
    result = build_search_space(
        table,
        model=meta["model"],
        num_layers=int(meta["num_layers"]),
        scheme=meta.get("scheme", "per-token"),
        layout=meta,
        tolerance=tolerance,
        eps=eps,
        min_samples=min_samples,
        max_groups=max_groups,
        max_size=max_size,
        metadata={"sensitivity": str(sensitivity)},
    )
    path = result.space.save(
        output_folder(out, meta["model"], meta.get("scheme", "per-token")) / "space.yaml"
    )
    summary = summarize(result, path)
    if json:
        emit_json(summary)
    else:
        typer.echo(render(summary))


def summarize(result: Any, path: Path) -> dict[str, Any]:
    """The `--json` object: groups, sizes before / after pruning / after clustering, eps used."""
    space = result.space
    meta = space.metadata
    return {
        "model": space.model,
        "scheme": space.scheme,
        "num_layers": space.num_layers,
        "tolerance": meta["tolerance"],
        "clustering": result.how,
        "eps": meta["eps"],
        "max_groups": meta["max_groups"],
        "max_size": meta["max_size"],
        "distance": result.distance,
        "min_samples": meta["min_samples"],
        "groups": [
            {"layers": list(g.layers), "candidates": [p.name for p in g.candidates]}
            for g in space.groups
        ],
        "size_before": meta["unpruned_size"],
        "log10_size_before": round(space.log10_unpruned_size, 4),
        "size_pruned": meta["pruned_size"],
        "log10_size_pruned": meta["log10_pruned_size"],
        "size_after": space.size,
        "log10_size_after": round(space.log10_size, 4),
        "space": str(path),
    }


def render(summary: dict[str, Any]) -> str:
    """Readable summary: one line per group, then the space before -> after."""
    cut = f"single linkage on log10 e_o, cut at distance {summary['distance']:.3g}"
    if summary["clustering"] == "max_size":
        how = f"the most groups whose space holds at most {summary['max_size']:,} configs ({cut})"
    elif summary["clustering"] == "max_groups":
        how = f"at most --max-groups {summary['max_groups']} ({cut})"
    else:
        how = f"DBSCAN with --eps {summary['eps']:g} on log10 e_o, min_samples {summary['min_samples']}"
    lines = [
        f"{summary['model']} {summary['scheme']}: {summary['num_layers']} layers -> "
        f"{len(summary['groups'])} groups: {how}; tolerance {summary['tolerance']:g}",
        "",
    ]
    for i, group in enumerate(summary["groups"]):
        layers = layer_ranges(group["layers"])
        lines.append(f"group {i:>2}  {' '.join(group['candidates']):<30} layers {layers}")
    before, pruned, after = (
        summary[k] for k in ("log10_size_before", "log10_size_pruned", "log10_size_after")
    )
    lines += [
        "",
        f"search space: {_size(summary['size_before'], before)} -> pruned {_size(summary['size_pruned'], pruned)}"
        f" -> clustered {_size(summary['size_after'], after)}  ({before - after:.1f} orders of magnitude smaller)",
        f"wrote {summary['space']}",
    ]
    return "\n".join(lines)


def layer_ranges(layers: list[int]) -> str:
    """[1, 2, 3, 5, 7, 8] -> "1-3,5,7-8"."""
    parts: list[str] = []
    start = prev = None
    for layer in [*sorted(layers), None]:
        if prev is not None and layer == prev + 1:
            prev = layer
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = layer
    return ",".join(parts)


def _size(count: int, log10: float) -> str:
    return (
        f"{count:,}"
        if count < 10**7
        else f"10^{log10:.2f}"
        if not math.isinf(log10)
        else str(count)
    )
