"""`kvtuner allocate`: the exact knapsack over layers on the calibration's single-layer KL."""

from __future__ import annotations

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
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    check_budget,
    emit_json,
    parse_caps,
)
from kvtuner.cli.targets import TARGET_HELP
from kvtuner.errors import ConfigError


@app.command()
def allocate(
    model: ModelOption = DEFAULT_MODEL,
    scheme: Annotated[str, typer.Option("--scheme", help="per-token or kivi.")] = defaults.SCHEME,
    max_bits: CapsOption = None,
    budget: BudgetOption = defaults.BUDGET,
    context: BudgetContextOption = defaults.BUDGET_CONTEXT,
    calibration: Annotated[
        Path, typer.Option("--calibration", help="Root of calibration outputs.")
    ] = Path("calibration"),
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Output folder (default searched_configs/<model>/<scheme>/knapsack)."
        ),
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help=TARGET_HELP)] = None,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval/--no-eval",
            help="--target: held-out KL of each plan beside the engine's all-layers setting.",
        ),
    ] = True,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="--target: held-out samples of that KL.")
    ] = defaults.EVAL_SAMPLES,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    json: JsonOption = False,
) -> None:
    """Pick, per cap, the per-layer pairs that minimise the summed single-layer KL (exact, no search).
    With --target, the engine setting and per-layer formats it can express, written as the files
    that engine reads."""
    if target is not None:
        from kvtuner.cli.targets import allocate_target

        allocate_target(
            model=model,
            target=target,
            caps=parse_caps(max_bits) if max_bits else defaults.ENGINE_CAPS,
            context=context,
            calibration=calibration,
            out=out,
            evaluate=evaluate,
            samples=samples,
            device=device,
            dtype=dtype,
            json=json,
        )
        return
    from kvtuner.allocate import allocate_configs
    from kvtuner.calibrate import base_config, load_layer_kl, load_sensitivity, output_folder
    from kvtuner.compat import model_shape
    from kvtuner.layer_kl import losses
    from kvtuner.models import load_model_config, model_name
    from kvtuner.search.export import config_filename

    caps = parse_caps(max_bits)
    check_budget(budget)
    name = model_name(model)
    folder = output_folder(calibration, name, scheme)
    _, meta = load_sensitivity(folder / "sensitivity.csv")
    num_layers = int(meta["num_layers"])
    table = load_layer_kl(folder, num_layers)
    if table is None:
        raise ConfigError(
            f"{folder / 'layer_kl.csv'}: no single-layer KL table (run `kvtuner calibrate` "
            "without --no-layer-kl)"
        )
    shape = model_shape(load_model_config(model))
    if shape.num_layers != num_layers:
        raise ConfigError(
            f"{folder}: num_layers: calibration has {num_layers} layers, model has {shape.num_layers}"
        )
    base = base_config(meta)
    configs = allocate_configs(
        losses(table, num_layers), base, shape, caps, budget=budget, context=context
    )
    out_dir = out if out is not None else Path("searched_configs") / name / scheme / "knapsack"
    rows: list[dict[str, Any]] = []
    for cap, config in configs.items():
        if config is None:
            rows.append({"cap": cap, "path": None})
            continue
        path = config.save(out_dir / config_filename(cap))
        meta_out = config.metadata
        rows.append(
            {
                "cap": cap,
                "path": str(path),
                "equivalent_bits": meta_out["equivalent_bits"],
                "effective_bits": meta_out["effective_bits"],
                "summed_kl": meta_out["value"],
                "layers": layers_text(config.layers),
            }
        )
    summary = {
        "model": name,
        "scheme": scheme,
        "budget": budget,
        "context": context,
        "configs": rows,
    }
    if json:
        emit_json(summary)
        return
    typer.echo(render(summary))


def layers_text(layers: Any) -> str:
    from kvtuner.search.problem import layers_key

    return layers_key(layers)


def render(summary: dict[str, Any]) -> str:
    budget = (
        f"effective bits at {summary['context']} tokens"
        if summary["budget"] == "effective"
        else "equivalent bits"
    )
    lines = [
        f"{summary['model']} {summary['scheme']}: exact knapsack on single-layer KL, caps on {budget}",
        "",
        f"{'cap':>5}  {'eff.':>5}  {'equiv.':>6}  {'sum KL':>9}  layers",
    ]
    for row in summary["configs"]:
        if row["path"] is None:
            lines.append(f"{row['cap']:>5g}  no config fits under this cap")
            continue
        lines.append(
            f"{row['cap']:>5g}  {row['effective_bits']:>5.2f}  {row['equivalent_bits']:>6.2f}  "
            f"{row['summed_kl']:>9.4g}  {row['layers']}"
        )
    written = [row["path"] for row in summary["configs"] if row["path"]]
    if written:
        lines += ["", f"wrote {len(written)} configs in {Path(written[0]).parent}"]
    return "\n".join(lines)
