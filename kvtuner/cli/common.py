"""Options and helpers shared by the command modules."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

DEFAULT_MODEL = "gemma-3-270m"

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Embedded name (gemma-3-270m, smollm2-135m), hub id, folder or .gguf file.",
    ),
]
ConfigOption = Annotated[
    str,
    typer.Option(
        "--config",
        "-c",
        help="Precision config: a YAML path or a uniform spec (fp16, KV8, K8V4, KV4, K4V2, KV2).",
    ),
]
SchemeOption = Annotated[
    str, typer.Option("--scheme", help="Quantization scheme: per-token or kivi.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu, cuda or mps.")]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        "--dtype", help="float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)."
    ),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Random seed.")]
# the evaluation protocol of `eval` and `search` (defaults differ per command)
ContinuationOption = Annotated[
    int, typer.Option("--continuation", min=1, help="Scored tokens per sample.")
]
ChunkOption = Annotated[int, typer.Option("--chunk", min=1, help="Scored tokens fed per forward.")]
MaxNewTokensOption = Annotated[
    int, typer.Option("--max-new-tokens", help="Answer length for --tasks (accuracy).")
]
CapsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--max-bits",
        help="Bit cap(s), repeated or comma-separated (default 3.0 3.5 4.0 6.0), on --budget bits.",
    ),
]
BudgetOption = Annotated[
    str,
    typer.Option(
        "--budget",
        help="Caps on effective bits (what the cache holds at --context tokens) or equivalent "
        "bits (the paper's mean of (k + v) / 2).",
    ),
]
BudgetContextOption = Annotated[
    int,
    typer.Option("--context", min=1, help="Tokens at which effective bits are counted."),
]
QuantizePrefillOption = Annotated[
    bool,
    typer.Option(
        "--quantize-prefill",
        help="The prompt's own forward attends to its quantized keys and values (default: exact, "
        "stored quantized, as in KIVI and transformers' QuantizedCache).",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON object and nothing else on stdout.")
]


def emit_json(obj: Any) -> None:
    """Print `obj` as one JSON object on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    sys.stdout.flush()


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "__fspath__"):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def info(message: str, quiet: bool = False) -> None:
    """Human-readable progress line on stderr (stdout stays clean for --json)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def parse_caps(values: list[str] | None) -> tuple[float, ...]:
    """`["3", "3.5,4"]` -> (3.0, 3.5, 4.0); None -> the default caps."""
    from kvtuner import defaults
    from kvtuner.errors import ConfigError

    if not values:
        return defaults.CAPS
    caps = []
    for value in values:
        for part in str(value).split(","):
            try:
                caps.append(float(part))
            except ValueError:
                raise ConfigError(f"--max-bits: '{part}' is not a number") from None
    if any(cap <= 0 for cap in caps):
        raise ConfigError(f"--max-bits must be positive numbers; got {caps}")
    return tuple(sorted(set(caps)))


def check_budget(budget: str) -> str:
    """`budget` if it is effective or equivalent, else a ConfigError naming --budget."""
    from kvtuner.errors import ConfigError
    from kvtuner.memory import BUDGETS

    if budget not in BUDGETS:
        raise ConfigError(f"--budget must be one of {', '.join(BUDGETS)}; got '{budget}'")
    return budget


@contextlib.contextmanager
def quiet_progress(quiet: bool) -> Iterator[None]:
    """Silence transformers' loading progress bars while `quiet` (stdout and stderr stay clean)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
