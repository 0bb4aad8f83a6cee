"""`kvtuner calibrate`: per-layer, per-pair attention errors of a model -> calibration/<model>/<scheme>/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kvtuner import defaults
from kvtuner.cli.app import app
from kvtuner.cli.common import (
    DEFAULT_MODEL,
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    SchemeOption,
    SeedOption,
    emit_json,
    info,
)
from kvtuner.cli.targets import TARGET_HELP

# options of the e_o calibration that `--target` (single-layer KL of an engine's formats) has no use for
E_O_ONLY = ("scheme", "samples", "seq_len", "query_tokens", "bits", "group_size", "block_size",
            "residual_length", "sink_tokens", "smooth", "layer_kl", "additivity")  # fmt: skip


@app.command()
def calibrate(
    ctx: typer.Context,
    model: ModelOption = DEFAULT_MODEL,
    scheme: SchemeOption = defaults.SCHEME,
    text: Annotated[
        Path | None,
        typer.Option(
            "--text",
            help="Calibration text: plain text, or JSONL with a 'text' field (default: pydoc_data.topics).",
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option("--samples", min=1, help="Text samples for e_o.")
    ] = defaults.CALIBRATION_SAMPLES,
    seq_len: Annotated[
        int, typer.Option("--seq-len", min=2, help="Tokens per e_o sample.")
    ] = defaults.CALIBRATION_SEQ_LEN,
    query_tokens: Annotated[
        int,
        typer.Option(
            "--query-tokens",
            min=1,
            help="Queries from the last N positions of each sample (the decoding side).",
        ),
    ] = defaults.QUERY_TOKENS,
    bits: Annotated[
        str, typer.Option("--bits", help="Bit widths of the candidate pairs, from 2, 4, 8, 16.")
    ] = ",".join(str(b) for b in defaults.CANDIDATE_BITS),
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size",
            min=0,
            help=f"Channels per scale and zero point (default {defaults.PER_TOKEN_GROUP_SIZE} "
            f"per-token, {defaults.KIVI_GROUP_SIZE} KIVI; 0: one group per head).",
        ),
    ] = None,
    block_size: Annotated[
        int, typer.Option("--block-size", min=1, help="KIVI: tokens per key block.")
    ] = defaults.KIVI_BLOCK_SIZE,
    residual_length: Annotated[
        int | None,
        typer.Option(
            "--residual-length",
            min=0,
            help=f"KIVI full-precision residual tokens (default {defaults.KIVI_RESIDUAL_LENGTH}).",
        ),
    ] = None,
    sink_tokens: Annotated[
        int,
        typer.Option("--sink-tokens", min=0, help="First tokens kept in full precision."),
    ] = defaults.SINK_TOKENS,
    smooth: Annotated[
        bool | None,
        typer.Option(
            "--smooth/--no-smooth",
            help="Per-token groups see channels divided by their prompt-time peak "
            "(default: on per-token, off KIVI).",
        ),
    ] = None,
    seed: SeedOption = 0,
    layer_kl: Annotated[
        bool,
        typer.Option(
            "--layer-kl/--no-layer-kl",
            help="Also the single-layer KL of every Pareto pair, and the additivity check.",
        ),
    ] = True,
    layer_kl_samples: Annotated[
        int, typer.Option("--layer-kl-samples", min=1, help="Samples of the single-layer KL.")
    ] = defaults.LAYER_KL_SAMPLES,
    layer_kl_context: Annotated[
        int | None,
        typer.Option(
            "--layer-kl-context",
            min=2,
            help="Context tokens of those samples (default: 512, or twice the widest window).",
        ),
    ] = None,
    additivity: Annotated[
        int,
        typer.Option("--additivity", min=0, help="Random configs of the additivity check."),
    ] = defaults.ADDITIVITY_CONFIGS,
    out: Annotated[
        Path, typer.Option("--out", help="Root folder; files go to <out>/<model>/<scheme>/.")
    ] = Path("calibration"),
    context: Annotated[
        int | None,
        typer.Option(
            "--context",
            min=2,
            help="Measure at the context you serve at: sets --seq-len and --layer-kl-context.",
        ),
    ] = None,
    target: Annotated[str | None, typer.Option("--target", help=TARGET_HELP)] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    json: JsonOption = False,
) -> None:
    """Measure each layer's sensitivity: e_o for every (key bits, value bits) pair, and the
    end-to-end KL of quantizing each layer alone at its Pareto pairs. With --target, the
    single-layer KL of every KV format that engine stores (and each layer's key/value amax)."""
    if context is not None:
        seq_len, layer_kl_context = context, context
    if target is not None:
        from kvtuner.cli.targets import calibrate_target

        check_target_options(ctx)
        calibrate_target(
            model=model,
            target=target,
            text=text,
            samples=layer_kl_samples,
            context=layer_kl_context,
            seed=seed,
            out=out,
            device=device,
            dtype=dtype,
            json=json,
        )
        return
    from kvtuner.calibrate import (
        CalibrationSettings,
        calibrate,
        check_settings,
        output_folder,
        parse_bits,
        write_outputs,
    )
    from kvtuner.calibrate import (
        layer_kl_samples as make_layer_samples,
    )
    from kvtuner.data import calibration_text, token_samples
    from kvtuner.models import load_model, load_model_config

    settings = CalibrationSettings(
        scheme=scheme,
        bits=parse_bits(bits),
        samples=samples,
        seq_len=seq_len,
        query_tokens=query_tokens,
        group_size=defaults.SCHEME_DEFAULT if group_size is None else (group_size or None),
        block_size=block_size,
        residual_length=residual_length,
        sink_tokens=sink_tokens,
        smooth=defaults.SCHEME_DEFAULT if smooth is None else smooth,
        seed=seed,
        text=str(text) if text is not None else None,
        layer_kl=layer_kl,
        layer_kl_samples=layer_kl_samples,
        layer_kl_context=layer_kl_context,
        additivity=additivity,
    )
    corpus = calibration_text(text)
    if not corpus.strip():
        from kvtuner.errors import ConfigError

        raise ConfigError(f"{text or 'calibration text'}: the text is empty")
    check_settings(settings, load_model_config(model))  # fail fast, before the model loads
    info(f"loading {model} ...", json)
    loaded = load_model(model, device=device, dtype=dtype)
    tokens = token_samples(loaded.tokenizer, corpus, samples, seq_len, seed=seed)
    layer_samples = None
    if layer_kl:
        layer_samples = make_layer_samples(loaded.tokenizer, corpus, settings, loaded.model.config)
    result = calibrate(
        loaded.model,
        tokens,
        settings,
        model_name=loaded.name,
        layer_samples=layer_samples,
        progress=not json,
    )
    paths = write_outputs(result, output_folder(out, loaded.name, settings.scheme))
    summary = summarize(result, paths)
    if json:
        emit_json(summary)
    else:
        typer.echo(render(summary))


def check_target_options(ctx: typer.Context) -> None:
    """ConfigError naming the e_o options given with `--target`: they would be silently ignored."""
    from kvtuner.errors import ConfigError

    # by name: typer may bring its own copy of click's ParameterSource enum
    given = [
        name
        for name in E_O_ONLY
        if getattr(ctx.get_parameter_source(name), "name", "DEFAULT")
        not in ("DEFAULT", "DEFAULT_MAP")
    ]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(
            f"{flags}: not used with --target (it measures the engine's own formats; "
            "set its samples and context with --layer-kl-samples and --layer-kl-context)"
        )


def summarize(result: Any, paths: dict[str, Path]) -> dict[str, Any]:
    """The `--json` object: model, scheme, files, seconds, e_o range per pair, end-to-end check."""
    table, meta = result.table, result.metadata
    by_pair = table.groupby(["key_bits", "value_bits"], sort=False).e_o
    e_o = {
        _pair_name(k, v): {
            "min": float(s.min()),
            "median": float(s.median()),
            "max": float(s.max()),
        }
        for (k, v), s in by_pair
    }
    summary: dict[str, Any] = {
        "model": meta["model"],
        "scheme": meta["scheme"],
        "num_layers": meta["num_layers"],
        "group_size": meta["group_size"],
        "residual_length": meta["residual_length"],
        "samples": meta["samples"],
        "seq_len": meta["seq_len"],
        "seconds": meta["seconds"],
        "timings": meta["timings"],
        "e_o": e_o,
        "files": {name: str(path) for name, path in paths.items()},
    }
    if result.layer_kl is not None:
        by_pair = result.layer_kl.groupby(["key_bits", "value_bits"], sort=False).kl
        summary["layer_kl"] = {
            **meta["layer_kl"],
            "kl": {
                _pair_name(k, v): {
                    "min": float(x.min()),
                    "median": float(x.median()),
                    "max": float(x.max()),
                }
                for (k, v), x in by_pair
            },
        }
    return summary


def render(summary: dict[str, Any]) -> str:
    """Readable summary: e_o over layers per pair, time, files, the end-to-end rank check."""
    group = summary["group_size"] if summary["group_size"] is not None else "one per head"
    lines = [
        f"{summary['model']} {summary['scheme']} (group {group}, residual {summary['residual_length']}): "
        f"{summary['num_layers']} layers, {summary['samples']} samples x {summary['seq_len']} tokens, "
        f"{summary['seconds']:.1f} s",
        "",
        "pair    e_o min   median      max   (over layers)",
    ]
    for name, stats in summary["e_o"].items():
        lines.append(f"{name:<6} {stats['min']:>8.4f} {stats['median']:>8.4f} {stats['max']:>8.4f}")
    if "layer_kl" in summary:
        kl = summary["layer_kl"]
        lines += [
            "",
            f"single-layer KL ({kl['samples']} samples x {kl['continuation']} scored tokens after "
            f"{kl['context']}):",
            "pair     KL min   median      max   (over layers)",
        ]
        for name, stats in kl["kl"].items():
            lines.append(
                f"{name:<6} {stats['min']:>8.2g} {stats['median']:>8.2g} {stats['max']:>8.2g}"
            )
        lines.append(
            f"Spearman(e_o, single-layer KL) over layers and pairs = {kl['spearman_e_o_kl']:.3f}"
        )
        if kl.get("spearman_e_o_kl_across_layers") is not None:
            lines.append(
                "  across layers at one pair (mean over pairs) = "
                f"{kl['spearman_e_o_kl_across_layers']:.3f}"
            )
        if "spearman_summed_joint" in kl:
            lines.append(
                f"additivity: Spearman(summed single-layer KL, joint KL) over "
                f"{kl['additivity_configs']} random configs = {kl['spearman_summed_joint']:.3f}; "
                f"joint / summed = {kl['joint_over_summed']:.2f} on average"
            )
    lines += ["", *(f"wrote {path}" for path in summary["files"].values())]
    return "\n".join(lines)


def _pair_name(key_bits: int, value_bits: int) -> str:
    from kvtuner.precision import PrecisionPair

    return PrecisionPair(int(key_bits), int(value_bits)).name
