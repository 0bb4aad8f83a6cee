"""The decode hot path, compiled with torch.compile where it works.

Eager dequantization runs five or six passes over the history (shift, mask, reshape, convert,
multiply-add) and quantizing one new token dispatches a dozen tiny ops; compiled, each is one
kernel. Kernels are compiled once per (bits, layout) with dynamic shapes, so a growing history does
not recompile. Set `KVTUNER_COMPILE=0` (or call `set_compile(False)`) for the plain eager path;
where compilation fails (no C++ compiler, an unsupported device) the eager path is used after a
one-line warning. Both paths compute the same numbers.

Compiling costs seconds per kernel (cached on disk after the first time), so kernels are only used
once a history reaches `KVTUNER_COMPILE_MIN_TOKENS` tokens (default 1024): short generations
never pay for it, long contexts, where dequantization dominates a decode step, do.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from kvtuner.quant.quantizer import dequantize_parts, quantize_per_token

_enabled = os.environ.get("KVTUNER_COMPILE", "1").strip().lower() not in {"0", "false", "no", "off"}
_min_tokens = int(os.environ.get("KVTUNER_COMPILE_MIN_TOKENS", "1024"))
_kernels: dict[tuple, Callable[..., object]] = {}
_failed_devices: set[str] = set()


def set_compile(enabled: bool, min_tokens: int | None = None) -> None:
    """Turn the compiled kernels on or off for this process; `min_tokens`: history length from which they are used."""
    global _enabled, _min_tokens
    _enabled = enabled
    if min_tokens is not None:
        _min_tokens = min_tokens


def compile_enabled() -> bool:
    return _enabled


def compile_settings() -> tuple[bool, int]:
    """(enabled, min_tokens), to restore with `set_compile(*settings)`."""
    return _enabled, _min_tokens


def _dequantize_kernel(bits: int, head_dim: int, group: int, per_channel: bool) -> Callable:
    def dequantize(
        packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
    ) -> torch.Tensor:
        return dequantize_parts(packed, scale, zero, bits, head_dim, group, per_channel)

    return dequantize


def _quantize_kernel(bits: int, group: int) -> Callable:
    def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        q = quantize_per_token(x, bits, group)
        return q.packed, q.scale, q.zero

    return quantize


def _run(
    key: tuple, build: Callable[[], Callable], eager: Callable, device: str, history: int, *args
):
    if not _enabled or history < _min_tokens or device in _failed_devices or device == "mps":
        return eager(*args)
    if key not in _kernels:
        # each (bits, layout) is its own small graph; allow enough of them before dynamo gives up
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _kernels[key] = torch.compile(build(), dynamic=True)
    try:
        return _kernels[key](*args)
    except Exception as exc:  # a missing compiler must not break decoding
        _failed_devices.add(device)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"kvtuner: torch.compile unavailable on {device} ({first}); using eager kernels",
            stacklevel=3,
        )
        return eager(*args)


def dequantize_fast(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    head_dim: int,
    group: int,
    per_channel: bool,
) -> torch.Tensor:
    """Same result as `dequantize_parts` (in the scale's dtype), one fused kernel when enabled."""
    if packed.shape[-2] == 0:
        return dequantize_parts(packed, scale, zero, bits, head_dim, group, per_channel)
    eager = _dequantize_kernel(bits, head_dim, group, per_channel)
    key = ("dequantize", bits, head_dim, group, per_channel, zero is None)
    return _run(
        key, lambda: eager, eager, packed.device.type, packed.shape[-2], packed, scale, zero
    )


def quantize_tokens_fast(
    x: torch.Tensor, bits: int, group: int, history: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same result as `quantize_per_token` (packed, scale, zero), one fused kernel when enabled.

    `history`: tokens already stored; decides, like for dequantization, whether compiling pays.
    """
    eager = _quantize_kernel(bits, group)
    key = ("quantize", bits, group, x.dtype)
    return _run(key, lambda: eager, eager, x.device.type, history, x)
