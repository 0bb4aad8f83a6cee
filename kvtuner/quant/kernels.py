"""The decode hot path: fused unpack + dequantize, compiled with torch.compile where it works.

Eager dequantization runs five or six passes over the history (shift, mask, reshape, convert,
multiply-add); the compiled kernel does one. A kernel is compiled once per (bits, layout) with
dynamic shapes, so a growing history does not recompile. Set `KVTUNER_COMPILE=0` (or call
`set_compile(False)`) for the plain eager path; where compilation fails (no C++ compiler, an
unsupported device) the eager path is used after a one-line warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch

from kvtuner.quant.quantizer import dequantize_parts

_enabled = os.environ.get("KVTUNER_COMPILE", "1").strip().lower() not in {"0", "false", "no", "off"}
_kernels: dict[tuple, Callable[..., torch.Tensor]] = {}
_failed_devices: set[str] = set()


def set_compile(enabled: bool) -> None:
    """Turn the compiled decode kernels on or off for this process."""
    global _enabled
    _enabled = enabled


def compile_enabled() -> bool:
    return _enabled


def _kernel(bits: int, head_dim: int, group: int, per_channel: bool, symmetric: bool) -> Callable:
    key = (bits, head_dim, group, per_channel, symmetric)
    if key not in _kernels:

        def dequantize(
            packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None
        ) -> torch.Tensor:
            return dequantize_parts(packed, scale, zero, bits, head_dim, group, per_channel)

        # each (bits, layout) is its own small graph; allow enough of them before dynamo gives up
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _kernels[key] = torch.compile(dequantize, dynamic=True)
    return _kernels[key]


def dequantize_fast(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    head_dim: int,
    group: int,
    per_channel: bool,
) -> torch.Tensor:
    """Same result as `dequantize_parts` (in the scale's dtype), through a compiled kernel when enabled."""
    device = packed.device.type
    if not _enabled or device in _failed_devices or device == "mps" or packed.shape[-2] == 0:
        return dequantize_parts(packed, scale, zero, bits, head_dim, group, per_channel)
    try:
        return _kernel(bits, head_dim, group, per_channel, zero is None)(packed, scale, zero)
    except Exception as exc:  # a missing compiler must not break decoding
        _failed_devices.add(device)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(
            f"kvtuner: torch.compile unavailable on {device} ({first}); using eager dequantization",
            stacklevel=2,
        )
        return dequantize_parts(packed, scale, zero, bits, head_dim, group, per_channel)
