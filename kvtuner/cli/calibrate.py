"""`kvtuner calibrate`: per-layer, per-pair attention errors of a model -> calibration/<model>/<scheme>/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

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


@app.command()
def calibrate(
    model: ModelOption = DEFAULT_MODEL,
    scheme: SchemeOption = "per-token",
    text: Annotated[
        Path | None,
        typer.Option(
            "--text",
            help="Calibration text: plain text, or JSONL with a 'text' field (default: pydoc_data.topics).",
        ),
    ] = None,
    samples: Annotated[int, typer.Option("--samples", help="Number of text samples.")] = 8,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sample.")] = 512,
    query_tokens: Annotated[
        int,
        typer.Option(
            "--query-tokens",
            help="Queries from the last N positions of each sample (the decoding side).",
        ),
    ] = 64,
    bits: Annotated[
        str, typer.Option("--bits", help="Bit widths of the candidate pairs, from 2, 4, 8, 16.")
    ] = "2,4,8",
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size", help="Quantization group (default: head_dim per-token, 32 kivi)."
        ),
    ] = None,
    residual_length: Annotated[
        int | None,
        typer.Option(
            "--residual-length",
            help="KIVI full-precision residual tokens (default 32; per-token: 0).",
        ),
    ] = None,
    seed: SeedOption = 0,
    end_to_end: Annotated[
        bool,
        typer.Option(
            "--end-to-end",
            help="Also the KL of the output with only one layer's KV at the lowest pair.",
        ),
    ] = False,
    out: Annotated[
        Path, typer.Option("--out", help="Root folder; files go to <out>/<model>/<scheme>/.")
    ] = Path("calibration"),
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    json: JsonOption = False,
) -> None:
    """Measure each layer's attention-output error e_o for every candidate (key bits, value bits) pair."""
    from kvtuner.calibrate import (
        CalibrationSettings,
        calibrate,
        check_settings,
        output_folder,
        parse_bits,
        write_outputs,
    )
    from kvtuner.data import calibration_text, token_samples
    from kvtuner.models import load_model, load_model_config

    settings = CalibrationSettings(
        scheme=scheme,
        bits=parse_bits(bits),
        samples=samples,
        seq_len=seq_len,
        query_tokens=query_tokens,
        group_size=group_size,
        residual_length=residual_length,
        seed=seed,
        text=str(text) if text is not None else None,
        end_to_end=end_to_end,
    )
    corpus = calibration_text(text)
    if not corpus.strip():
        from kvtuner.errors import ConfigError

        raise ConfigError(f"{text or 'calibration text'}: the text is empty")
    check_settings(settings, load_model_config(model))  # fail fast, before the model loads
    info(f"loading {model} ...", json)
    loaded = load_model(model, device=device, dtype=dtype)
    tokens = token_samples(loaded.tokenizer, corpus, samples, seq_len, seed=seed)
    result = calibrate(loaded.model, tokens, settings, model_name=loaded.name, progress=not json)
    paths = write_outputs(result, output_folder(out, loaded.name, settings.scheme))
    summary = summarize(result, paths)
    if json:
        emit_json(summary)
    else:
        typer.echo(render(summary))


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
    if result.end_to_end is not None:
        summary["end_to_end"] = {
            **meta["end_to_end"],
            "kl": [round(float(x), 6) for x in result.end_to_end.kl],
        }
    return summary


def render(summary: dict[str, Any]) -> str:
    """Readable summary: e_o over layers per pair, time, files, the end-to-end rank check."""
    group = summary["group_size"] if summary["group_size"] is not None else "head_dim"
    lines = [
        f"{summary['model']} {summary['scheme']} (group {group}, residual {summary['residual_length']}): "
        f"{summary['num_layers']} layers, {summary['samples']} samples x {summary['seq_len']} tokens, "
        f"{summary['seconds']:.1f} s",
        "",
        "pair    e_o min   median      max   (over layers)",
    ]
    for name, stats in summary["e_o"].items():
        lines.append(f"{name:<6} {stats['min']:>8.4f} {stats['median']:>8.4f} {stats['max']:>8.4f}")
    if "end_to_end" in summary:
        e2e = summary["end_to_end"]
        lines += [
            "",
            f"end to end: single-layer {e2e['pair']} KL per layer: "
            + " ".join(f"{x:.3g}" for x in e2e["kl"]),
            f"Spearman(e_o, KL) over layers = {e2e['spearman_e_o_kl']:.3f}",
        ]
    lines += ["", *(f"wrote {path}" for path in summary["files"].values())]
    return "\n".join(lines)


def _pair_name(key_bits: int, value_bits: int) -> str:
    from kvtuner.precision import PrecisionPair

    return PrecisionPair(int(key_bits), int(value_bits)).name
