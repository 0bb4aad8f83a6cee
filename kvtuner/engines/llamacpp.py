"""llama.cpp: one K type and one V type for all layers (`-ctk`, `-ctv`, common/arg.cpp
`kv_cache_types`); a quantized V cache needs flash attention (`-fa on`). Mainline has no per-layer
option; the ik_llama.cpp fork (#1599) adds `--cache-type-k-first TYPE,N`, `--cache-type-k-last
TYPE,N` and the same for V, so a per-layer plan of the form first-N / middle / last-N runs there.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path

from kvtuner.io import atomic_write_text

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
IK_CACHE_TYPES = (*CACHE_TYPES, "q6_0")
UNQUANTIZED = ("f32", "f16", "bf16")


def _check(kind: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"llama.cpp's {kind} is one of {', '.join(allowed)}; got {value!r}")


def cache_args(ctk: str, ctv: str, flash_attn: bool = True) -> list[str]:
    """`-ctk K -ctv V -fa on` for mainline llama.cpp (llama-server, llama-cli)."""
    _check("-ctk", ctk, CACHE_TYPES)
    _check("-ctv", ctv, CACHE_TYPES)
    if ctv not in UNQUANTIZED and not flash_attn:
        raise ValueError(f"a quantized V cache ({ctv}) needs flash attention (-fa on)")
    return ["-ctk", ctk, "-ctv", ctv] + (["-fa", "on"] if flash_attn else [])


def runs(types: Sequence[str]) -> tuple[str, tuple[str, int] | None, tuple[str, int] | None]:
    """Per-layer types -> (middle type, (first type, N) or None, (last type, N) or None).

    Raises ValueError when the list is not first-N / middle / last-N runs.
    """
    if not types:
        raise ValueError("no layers")
    n = len(types)
    head = next((i for i, t in enumerate(types) if t != types[0]), n)
    if head == n:
        return types[0], None, None
    tail = next((i for i, t in enumerate(reversed(types)) if t != types[-1]), n)
    middle = set(types[head : n - tail])
    if not middle:  # two runs: the second is the base, the first the "first N"
        return types[-1], (types[0], head), None
    if len(middle) > 1:
        raise ValueError(
            "ik_llama.cpp sets one type for the first N layers, one for the last N and one for "
            f"the rest; these per-layer types are not of that form: {list(types)}"
        )
    base = middle.pop()
    return base, (types[0], head), (types[-1], tail)


def ik_llama_args(k_types: Sequence[str], v_types: Sequence[str]) -> list[str]:
    """Per-layer K and V types -> `-ctk B -ctv B [--cache-type-k-first T,N] [...-last T,N] ...`."""
    args: list[str] = []
    for side, types in (("k", k_types), ("v", v_types)):
        for t in types:
            _check(f"--cache-type-{side}", t, IK_CACHE_TYPES)
        base, first, last = runs(types)
        args += [f"-ct{side}", base]
        if first is not None:
            args += [f"--cache-type-{side}-first", f"{first[0]},{first[1]}"]
        if last is not None:
            args += [f"--cache-type-{side}-last", f"{last[0]},{last[1]}"]
    return args


def server_command(model_path: str, ctk: str, ctv: str) -> str:
    """`llama-server -m MODEL -ctk K -ctv V -fa on` as one shell line."""
    return shlex.join(["llama-server", "-m", model_path, *cache_args(ctk, ctv)])


def write_args(path: str | Path, args: Sequence[str]) -> Path:
    """Write the argument list as JSON (and the shell form) to `path` atomically."""
    payload = {"args": list(args), "shell": shlex.join(args)}
    return atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
