"""When the cache's hot paths run `torch.compile`d, and what happens when compiling fails.

KVTUNER_COMPILE: `auto` (default) compiles a path once the history it reads holds COMPILE_FROM
tokens (short histories run eagerly: no compile time for a short generation), `1` always, `0`
never. Compiled graphs are kept per function (one per shape family; the token axis is marked
dynamic by the callers). A failed compile (no C++ compiler, an unsupported backend) warns once and
leaves every path eager for the rest of the process.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

COMPILE_FROM = 1024  # tokens from which `auto` compiles (eager kernels are as fast below)
_COMPILED: dict[Callable, Callable] = {}
_FAILED: list[str] = []


def compile_mode() -> str:
    """`auto`, `1` or `0` (from KVTUNER_COMPILE; on/off/true/false accepted)."""
    mode = os.environ.get("KVTUNER_COMPILE", "auto").lower()
    return {"on": "1", "true": "1", "off": "0", "false": "0"}.get(mode, mode)


def failed() -> bool:
    return bool(_FAILED)


def compiled(fn: Callable, tokens: int) -> Callable | None:
    """The compiled `fn`, or None where `fn` should run eagerly (short history, off, failed)."""
    mode = compile_mode()
    if mode == "0" or _FAILED or (mode != "1" and tokens < COMPILE_FROM):
        return None
    if fn not in _COMPILED:
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 64)
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def run(fn: Callable, tokens: int, *args: Any) -> Any:
    """`fn(*args)`, compiled where `compiled` says so; eagerly (with one warning) if that fails."""
    fast = compiled(fn, tokens)
    if fast is not None:
        try:
            return fast(*args)
        except Exception as error:  # no compiler, unsupported backend: eager from now on
            _FAILED.append(f"{type(error).__name__}: {error}".splitlines()[0])
            warnings.warn(
                f"kvtuner: torch.compile failed ({_FAILED[0]}); the cache runs eagerly",
                stacklevel=2,
            )
    return fn(*args)
