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
    device: DeviceOption = "cpu",
    dtype: DtypeOption = None,
    quantize_prefill: QuantizePrefillOption = defaults.QUANTIZE_PREFILL,
    json: JsonOption = False,
) -> None:
    """Measure memory and decode speed of this cache and of the dense DynamicCache in one run."""
    from kvtuner.bench import run_bench
    from kvtuner.config import load_config
    from kvtuner.errors import KVTunerError
    from kvtuner.models import load_model, load_model_config, text_config

    if peer_bits not in (0, 2, 4):
        raise KVTunerError(f"--peer-bits must be 0, 2 or 4; got {peer_bits}")
    model_config = text_config(load_model_config(model))
    precision = load_config(config, num_layers=int(model_config.num_hidden_layers), scheme=scheme)
    max_positions = getattr(model_config, "max_position_embeddings", None)
    if max_positions and context + new_tokens + 1 > max_positions:
        raise KVTunerError(
            f"--context: {context} + {new_tokens} new tokens exceeds the model's {max_positions} positions"
        )
    loaded = load_model(model, device=device, dtype=dtype)
    result = run_bench(
        loaded.model,
        loaded.tokenizer,
        precision,
        context=context,
        new_tokens=new_tokens,
        rounds=rounds,
        peer_bits=peer_bits or None,
        quantize_prefill=quantize_prefill,
        progress=None if json else (lambda msg: info(msg)),
    )
    result["model"] = loaded.name
    if json:
        emit_json(result)
        return
    print(
        f"{loaded.name}, {result['dtype']} on {result['device']}, context {context}, {new_tokens} decode steps, median of {rounds}"
    )
    print(f"{'cache':44} {'KV MiB':>9} {'tok/s':>8} {'peak MiB':>9}")
    for row in result["rows"]:
        print(
            f"{row['name']:44} {row['kv_bytes'] / MIB:9.2f} {row['tokens_per_s']:8.2f} "
            f"{row['peak_memory_bytes'] / MIB:9.1f}"
        )
    print(
        f"memory {result['memory_ratio']:.3f}x dense ({result['effective_bits']:.2f} effective bits, "
        f"{result['equivalent_bits']:.2f} equivalent), speed {result['speed_ratio']:.2f}x dense, "
        f"greedy agreement {result['greedy_agreement']:.0%}"
    )
