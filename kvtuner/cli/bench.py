"""`kvtuner bench`: KV bytes and decode tokens/s of a config's cache against the dense cache."""

from __future__ import annotations

from typing import Annotated

import typer

from kvtuner import defaults
from kvtuner.cli.app import app
from kvtuner.cli.common import (
    DEFAULT_MODEL,
    ConfigOption,
    DeviceOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    QuantizePrefillOption,
    emit_json,
    info,
)

MIB = 1024**2


@app.command()
def bench(
    model: ModelOption = DEFAULT_MODEL,
    config: ConfigOption = "KV4",
    context: Annotated[
        int, typer.Option("--context", min=1, help="Tokens of context before decoding.")
    ] = 2048,
    contexts: Annotated[
        str | None,
        typer.Option(
            "--contexts", help="Several contexts, comma-separated (e.g. 1024,4096,16384)."
        ),
    ] = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Rows decoded together.")] = 1,
    new_tokens: Annotated[
        int, typer.Option("--new-tokens", min=1, help="Greedy decode steps timed.")
    ] = 64,
    rounds: Annotated[
        int, typer.Option("--rounds", min=1, help="Interleaved rounds; the median is reported.")
    ] = 3,
    scheme: Annotated[
        str | None, typer.Option("--scheme", help="per-token or kivi (for specs).")
    ] = None,
    peer_bits: Annotated[
        int,
        typer.Option(
            "--peer-bits", help="Bits of the transformers QuantizedCache row (0: no row)."
        ),
    ] = 4,
    memory_limit: Annotated[
        int | None,
        typer.Option(
            "--memory-limit",
            min=1,
            help="Bytes: report the longest context and largest batch each cache fits in them.",
        ),
    ] = None,
    plot: Annotated[
        str | None, typer.Option("--plot", help="PNG: tokens/s and memory against context.")
    ] = None,
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    quantize_prefill: QuantizePrefillOption = defaults.QUANTIZE_PREFILL,
    json: JsonOption = False,
) -> None:
    """Measure memory and decode speed of this cache, the dense DynamicCache (and transformers'
    QuantizedCache) in one run, at one or several contexts."""
    from kvtuner.bench import longest_fit, run_benches
    from kvtuner.config import load_config
    from kvtuner.errors import KVTunerError
    from kvtuner.models import load_model, load_model_config, text_config

    if peer_bits not in (0, 2, 4):
        raise KVTunerError(f"--peer-bits must be 0, 2 or 4; got {peer_bits}")
    lengths = parse_contexts(contexts) if contexts is not None else [context]
    model_config = text_config(load_model_config(model))
    precision = load_config(config, num_layers=int(model_config.num_hidden_layers), scheme=scheme)
    max_positions = getattr(model_config, "max_position_embeddings", None)
    for length in lengths:
        if max_positions and length + new_tokens + 1 > max_positions:
            raise KVTunerError(
                f"--context: {length} + {new_tokens} new tokens exceeds the model's {max_positions} positions"
            )
    loaded = load_model(model, device=device, dtype=dtype)
    results = run_benches(
        loaded.model,
        loaded.tokenizer,
        precision,
        contexts=lengths,
        new_tokens=new_tokens,
        rounds=rounds,
        batch=batch,
        peer_bits=peer_bits or None,
        quantize_prefill=quantize_prefill,
        progress=None if json else (lambda msg: info(msg)),
    )
    for result in results:
        result["model"] = loaded.name
    fit = longest_fit(results, memory_limit, max_positions) if memory_limit else None
    if plot:
        from kvtuner.plots import plot_bench

        plot_bench(results, plot)
    if json:
        if contexts is None:
            out = results[0] if fit is None else {**results[0], "memory_limit": fit}
        else:
            out = (
                {"contexts": results} if fit is None else {"contexts": results, "memory_limit": fit}
            )
        emit_json(out)
        return
    for result in results:
        print_result(result)
    if fit:
        print_fit(fit)
    if plot:
        info(f"wrote {plot}")


def parse_contexts(text: str) -> list[int]:
    from kvtuner.errors import KVTunerError

    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise KVTunerError(
            f"--contexts: expected comma-separated token counts; got {text!r}"
        ) from None
    if not lengths or min(lengths) < 1:
        raise KVTunerError(f"--contexts: expected positive token counts; got {text!r}")
    return sorted(set(lengths))


def print_result(result: dict) -> None:
    from kvtuner.machine import summary

    print(
        f"{result['model']}, {result['dtype']} on {result['device']}, context {result['context']}, "
        f"batch {result['batch']}, {result['new_tokens']} decode steps, median of {result['rounds']}"
    )
    if "machine" in result:
        print(f"machine: {summary(result['machine'])}")
    print(f"{'cache':44} {'KV MiB':>9} {'tok/s':>8} {'prefill MiB':>12} {'decode MiB':>11}")
    for row in result["rows"]:
        print(
            f"{row['name']:44} {row['kv_bytes'] / MIB:9.2f} {row['tokens_per_s']:8.2f} "
            f"{row['prefill_peak_memory_bytes'] / MIB:12.1f} {row['decode_level_memory_bytes'] / MIB:11.1f}"
        )
    saved = result["decode_memory_saved_fraction"]
    saved_text = "" if saved is None else f", decode memory saved {saved:.0%} of the KV bytes saved"
    print(
        f"memory {result['memory_ratio']:.3f}x dense ({result['effective_bits']:.2f} effective bits, "
        f"{result['equivalent_bits']:.2f} equivalent), speed {result['speed_ratio']:.2f}x dense"
        f"{saved_text}, greedy agreement {result['greedy_agreement']:.0%}"
    )
    print(
        "(prefill MiB: peak above the start during prefill; decode MiB: decode-phase peak above the start)"
    )


def print_fit(fit: dict) -> None:
    print(
        f"within {fit['memory_limit_bytes'] / MIB:.0f} MiB (extrapolated from context {fit['context']}, "
        f"batch {fit['batch']}):"
    )
    for name, row in fit["fits"].items():
        print(
            f"  {name:44} longest context {row['longest_context']:>8}   largest batch {row['largest_batch']:>5}"
        )
