"""iq4_nl's block search, as ggml's CPU reference writes it (`quantize_row_iq4_nl_ref`).

ggml/src/ggml-quants.c `quantize_row_iq4_nl_impl(32, 32, x, ..., quant_weights=NULL, ntry=7)`:
weights w = x^2; a first scale d = max / 127 (max: the value of largest magnitude); then for each
scale id = (t - 127) / max, t in -7..7, pick each value's nearest level (`best_index_int8`),
d = sum(w q x) / sum(w q^2), keep the d with the largest d * sum(w q x); store fp16(d) and
re-pick the levels with 1 / d. A block with amax < 1e-15 stores d = 0 and level 8 everywhere.
The sums run in float32 in element order, as the C loop does (no fused multiply-add).
CUDA's set_rows kernel (ggml-cuda/cpy-utils.cuh) uses a shorter search; this is the CPU one.
"""

from __future__ import annotations

import torch

from kvtuner.formats.ggml_blocks import IQ4_NL_LEVELS

NTRY = 7
GROUP_MAX_EPS = 1e-15


def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4_NL_LEVELS, dtype=torch.float32, device=device)


def best_index(x: torch.Tensor) -> torch.Tensor:
    """`best_index_int8(16, levels, x)`: the nearest level's index, the upper one on a tie."""
    levels = _levels(x.device)
    upper = torch.searchsorted(levels, x.contiguous(), right=True).clamp(1, 15)
    below, above = levels[upper - 1], levels[upper]
    idx = torch.where(x - below < above - x, upper - 1, upper)
    idx = torch.where(x <= levels[0], 0, idx)
    return torch.where(x >= levels[15], 15, idx)


def _sums(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum(w*q*x), sum(w*q*q) over the 32 values `[n, 32]`, accumulated left to right in float32."""
    wq = w * q
    wqx, wqq = wq * x, wq * q
    sumqx = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    sumq2 = torch.zeros_like(sumqx)
    for j in range(x.shape[1]):
        sumqx = sumqx + wqx[:, j]
        sumq2 = sumq2 + wqq[:, j]
    return sumqx, sumq2


def quantize_iq4_nl(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 blocks `[n, 32]` -> (d float32 `[n, 1]`, level indices uint8 `[n, 32]`)."""
    levels = _levels(blocks.device)
    w = blocks * blocks
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # signed, [n, 1]
    empty = peak.abs() < GROUP_MAX_EPS
    safe_peak = torch.where(empty, torch.ones_like(peak), peak)

    d = -safe_peak / levels[0]
    sumqx, sumq2 = _sums(w, levels[best_index((1 / d) * blocks)], blocks)
    d = (sumqx / sumq2)[:, None]
    best = d[:, 0] * sumqx
    for itry in range(-NTRY, NTRY + 1):
        inv = (itry + levels[0]) / safe_peak
        sumqx, sumq2 = _sums(w, levels[best_index(inv * blocks)], blocks)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better[:, None], (sumqx / sumq2)[:, None], d)
        best = torch.where(better, d[:, 0] * sumqx, best)

    d = torch.where(empty, torch.zeros_like(d), d)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return d, best_index(inv * blocks).to(torch.uint8)
