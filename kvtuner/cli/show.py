"""`kvtuner show CONFIG`: the layers of a precision config, its equivalent bits and scheme."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from kvtuner import defaults
from kvtuner.cli.app import app
from kvtuner.cli.common import JsonOption, emit_json
from kvtuner.config import PrecisionConfig, load_config
from kvtuner.precision import FULL_PRECISION


@app.command()
def show(
    config: Annotated[
        str, typer.Argument(help="YAML path or uniform spec (KV8, K8V4, KV4, fp16...).")
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Check the layer count against this model (needed for a uniform spec).",
        ),
    ] = None,
    scheme: Annotated[
        str | None,
        typer.Option("--scheme", help="per-token or kivi (for specs and presets without one)."),
    ] = None,
    context: Annotated[
        int,
        typer.Option(
            "--context", min=1, help="Tokens at which effective bits are counted (with --model)."
        ),
    ] = defaults.BUDGET_CONTEXT,
    json: JsonOption = False,
) -> None:
    """Show a precision config: one row per layer, equivalent bits, scheme. An engine plan or
    exported engine file: its per-layer formats and the command that sets them."""
    from kvtuner.engines.export import is_engine_config

    if is_engine_config(config):
        from kvtuner.cli.targets import show_engine

        show_engine(config, model, context, json)
        return
    num_layers = shape = None
    if model is not None:
        from kvtuner.compat import model_shape
        from kvtuner.models import load_model_config

        shape = model_shape(load_model_config(model))
        num_layers = shape.num_layers
    cfg = load_config(config, num_layers=num_layers, scheme=scheme)
    if shape is None and cfg.model:  # a config naming its model: effective bits without --model
        shape = _named_model_shape(cfg)
    summary = summarize(cfg, shape=shape, context=context)
    if json:
        emit_json(summary)
        return
    typer.echo(render(cfg, summary))


def _named_model_shape(cfg: PrecisionConfig) -> Any:
    """The shape of the model a config names, if that model resolves and matches; else None."""
    from kvtuner.compat import model_shape
    from kvtuner.errors import KVTunerError
    from kvtuner.models import load_model_config

    try:
        shape = model_shape(load_model_config(cfg.model))
    except (KVTunerError, OSError, ValueError):
        return None
    return shape if shape.num_layers == cfg.num_layers else None


def summarize(cfg: PrecisionConfig, shape: Any = None, context: int = 4096) -> dict[str, Any]:
    """The `--json` object: num_layers, equivalent_bits, scheme, layers [{layer, key_bits, value_bits}]."""
    summary: dict[str, Any] = {
        "num_layers": cfg.num_layers,
        "equivalent_bits": cfg.equivalent_bits,
        "scheme": cfg.scheme,
        "group_size": cfg.group_size,
        "residual_length": cfg.residual_length,
        "model": cfg.model,
        "source": cfg.source,
        "layers": [
            {"layer": i, "key_bits": p.key_bits, "value_bits": p.value_bits}
            for i, p in enumerate(cfg.layers)
        ],
    }
    if shape is not None:
        summary["effective_bits"] = cfg.effective_bits(shape, context)
        summary["context"] = context
    if cfg.heads is not None:
        summary["heads_per_layer"] = len(cfg.heads[0])
    return summary


def render(cfg: PrecisionConfig, summary: dict[str, Any]) -> str:
    """Human-readable table: header lines, then one row per layer with K and V bars."""
    group = cfg.group_size if cfg.group_size is not None else "head_dim"
    lines = [
        f"config:          {cfg.source or cfg.name}"
        + (f"  (model {cfg.model})" if cfg.model else ""),
        f"scheme:          {cfg.scheme}  (group size {group}, residual {cfg.residual_length})",
        f"layers:          {cfg.num_layers}",
        f"equivalent bits: {cfg.equivalent_bits:.3f}",
    ]
    if "effective_bits" in summary:
        lines.append(
            f"effective bits:  {summary['effective_bits']:.3f}  (at {summary['context']} tokens)"
        )
    if cfg.heads is not None:
        lines.append(
            f"head-wise:       {len(cfg.heads[0])} heads a layer; each row is the max over its heads"
        )
    lines.append("")
    lines.append("layer  pair   K  V   keys      values")
    for i, pair in enumerate(cfg.layers):
        lines.append(
            f"{i:>5}  {pair.name:<5} {pair.key_bits:>2} {pair.value_bits:>2}   "
            f"{_bar(pair.key_bits)}  {_bar(pair.value_bits)}"
        )
    return "\n".join(lines)


def _bar(bits: int) -> str:
    """8 cells for 16 bits: one full cell per 2 bits."""
    cells = bits // 2
    return "█" * cells + "·" * (FULL_PRECISION // 2 - cells)
