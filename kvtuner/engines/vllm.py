"""vLLM: one `--kv-cache-dtype` for the model, layers listed in `--kv-cache-dtype-skip-layers` keep
the model dtype (PR #33695). Names from vllm/config/cache.py (`CacheDType`, `CacheConfig.
kv_cache_dtype_skip_layers: list[str]`, layer indices or "sliding_window") and
vllm/engine/arg_utils.py (EngineArgs / LLM keyword `kv_cache_dtype`, CLI `--kv-cache-dtype`).
Per-tensor k_scale / v_scale are read from the checkpoint's weights only (1.0 when absent); there
is no flag for them, so `write_launch` records them beside the command for the checkpoint writer.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvtuner.io import atomic_write_text

KV_CACHE_DTYPES = (
    "auto",
    "float16",
    "bfloat16",
    "fp8",
    "fp8_e4m3",
    "fp8_e5m2",
    "int8_per_token_head",
    "fp8_per_token_head",
    "int4_per_token_head",
    "nvfp4",
    "nvfp4_4over6",
)
SKIP_PATTERNS = ("sliding_window",)


@dataclass(frozen=True)
class VllmLaunch:
    """A vLLM KV setting: one dtype, the layers that skip it, optional per-layer (k_scale, v_scale)."""

    model: str
    kv_cache_dtype: str
    skip_layers: tuple[int | str, ...] = ()
    kv_scales: Mapping[int, tuple[float, float]] = field(default_factory=dict)


def launch(
    model: str,
    kv_cache_dtype: str,
    skip_layers: Sequence[int | str] = (),
    kv_scales: Mapping[int, tuple[float, float]] | None = None,
) -> VllmLaunch:
    """Check the names and return the launch; skipped layers sorted, indices before patterns."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"vLLM's --kv-cache-dtype is one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}"
        )
    indices = sorted({int(s) for s in skip_layers if not isinstance(s, str) or s.isdigit()})
    patterns = sorted({s for s in skip_layers if isinstance(s, str) and not s.isdigit()})
    bad = [p for p in patterns if p not in SKIP_PATTERNS] + [i for i in indices if i < 0]
    if bad:
        raise ValueError(
            f"--kv-cache-dtype-skip-layers takes layer indices >= 0 or {', '.join(SKIP_PATTERNS)}; got {bad[0]!r}"
        )
    if kv_cache_dtype == "auto" and (indices or patterns):
        raise ValueError("skipping layers needs a quantized --kv-cache-dtype, not 'auto'")
    return VllmLaunch(model, kv_cache_dtype, (*indices, *patterns), dict(kv_scales or {}))


def skip_layer_strings(launch: VllmLaunch) -> list[str]:
    """The skipped layers as vLLM's list[str]: ["0", "1", "23"]."""
    return [str(s) for s in launch.skip_layers]


def serve_argv(launch: VllmLaunch) -> list[str]:
    """`vllm serve MODEL --kv-cache-dtype X [--kv-cache-dtype-skip-layers 0 1 23]` as argv."""
    argv = ["vllm", "serve", launch.model, "--kv-cache-dtype", launch.kv_cache_dtype]
    if launch.skip_layers:
        argv += ["--kv-cache-dtype-skip-layers", *skip_layer_strings(launch)]
    return argv


def serve_command(launch: VllmLaunch) -> str:
    """The serve command as one shell line."""
    return shlex.join(serve_argv(launch))


def llm_kwargs(launch: VllmLaunch) -> dict[str, object]:
    """Keyword arguments for `vllm.LLM(...)` / `EngineArgs(...)`."""
    kwargs: dict[str, object] = {"model": launch.model, "kv_cache_dtype": launch.kv_cache_dtype}
    if launch.skip_layers:
        kwargs["kv_cache_dtype_skip_layers"] = skip_layer_strings(launch)
    return kwargs


def launch_json(launch: VllmLaunch) -> dict[str, object]:
    """Command, LLM kwargs and the per-layer scales a checkpoint must carry, as one JSON object."""
    scales = {
        str(layer): {"k_scale": k, "v_scale": v}
        for layer, (k, v) in sorted(launch.kv_scales.items())
    }
    return {
        "command": serve_command(launch),
        "argv": serve_argv(launch),
        "llm_kwargs": llm_kwargs(launch),
        "kv_scales": scales,
    }


def write_launch(path: str | Path, launch: VllmLaunch) -> Path:
    """Write `launch_json(launch)` to `path` atomically."""
    return atomic_write_text(path, json.dumps(launch_json(launch), indent=2) + "\n")
