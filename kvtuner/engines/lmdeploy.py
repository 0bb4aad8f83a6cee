"""LMDeploy: one `quant_policy` for the whole model (lmdeploy/messages.py `QuantPolicy`: NONE 0,
INT4 4, INT8 8, FP8 16, FP8_E5M2 17, TURBO_QUANT 42; TurbomindEngineConfig rejects 16 and 17).
CLI `lmdeploy serve api_server MODEL --quant-policy 8`; Python `TurbomindEngineConfig(quant_policy=8)`
or `PytorchEngineConfig(quant_policy=8)` (docs/en/quantization/kv_quant.md).
kvtuner's formats cover 4 and 8 (kvtuner.formats.lmdeploy).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Literal

from kvtuner.io import atomic_write_text

QUANT_POLICIES = (4, 8)
BACKENDS = ("turbomind", "pytorch")


def _check(quant_policy: int) -> None:
    if quant_policy not in QUANT_POLICIES:
        raise ValueError(
            f"kvtuner exports LMDeploy quant_policy {' or '.join(map(str, QUANT_POLICIES))}; got {quant_policy!r}"
        )


def serve_argv(
    model: str, quant_policy: int, backend: Literal["turbomind", "pytorch"] | None = None
) -> list[str]:
    """`lmdeploy serve api_server MODEL [--backend B] --quant-policy N` as argv."""
    _check(quant_policy)
    argv = ["lmdeploy", "serve", "api_server", model]
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(
                f"LMDeploy's --backend is one of {', '.join(BACKENDS)}; got {backend!r}"
            )
        argv += ["--backend", backend]
    return argv + ["--quant-policy", str(quant_policy)]


def serve_command(model: str, quant_policy: int, backend: str | None = None) -> str:
    """The serve command as one shell line."""
    return shlex.join(serve_argv(model, quant_policy, backend))  # type: ignore[arg-type]


def engine_config_kwargs(quant_policy: int) -> dict[str, int]:
    """Keyword arguments for `TurbomindEngineConfig(...)` or `PytorchEngineConfig(...)`."""
    _check(quant_policy)
    return {"quant_policy": quant_policy}


def write_launch(path: str | Path, model: str, quant_policy: int) -> Path:
    """Write the serve command and engine-config kwargs as JSON to `path` atomically."""
    payload = {
        "command": serve_command(model, quant_policy),
        "engine_config": engine_config_kwargs(quant_policy),
    }
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
