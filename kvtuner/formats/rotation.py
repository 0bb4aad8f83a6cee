"""Hadamard rotations the engines apply to K/V before quantizing them.

Both engines use the Sylvester matrix H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]] (symmetric).
- llama.cpp (PR #21038, src/llama-kv-cache.cpp `ggml_gen_hadamard`): the orthonormal H_n / sqrt(n),
  applied to consecutive chunks of n values along head_dim; H^2 = I, so the same matrix undoes it.
- vLLM int4_per_token_head (vllm/v1/attention/ops/int4_per_token_head.py `single_rht`): random +-1
  signs D, then the unnormalised H over the whole head: y = H D x; since H H = d I, x = D H y / d.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=16)
def _sylvester(n: int) -> torch.Tensor:
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard size must be a power of two; got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def hadamard(n: int, normalized: bool = True) -> torch.Tensor:
    """The `[n, n]` Sylvester Hadamard matrix in float32, divided by sqrt(n) when `normalized`."""
    h = _sylvester(n).clone()
    return h / n**0.5 if normalized else h


def rotate_chunks(x: torch.Tensor, n: int) -> torch.Tensor:
    """Float32 `[..., d]` -> `[..., d]` with every chunk of `n` values multiplied by H_n / sqrt(n).

    Self-inverse: rotate_chunks(rotate_chunks(x, n), n) == x up to rounding.
    """
    d = x.shape[-1]
    h = hadamard(n).to(x.device)
    return (x.float().reshape(*x.shape[:-1], d // n, n) @ h).reshape(x.shape)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform H x along the last axis (a power of two).

    The butterfly of vLLM's CPU fallback (`fast_hadamard_transform`, tier 3), in x's dtype.
    """
    d = x.shape[-1]
    if d & (d - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two size; got {d}")
    h = 1
    while h < d:
        pairs = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(*x.shape[:-1], d)
        h *= 2
    return x


@functools.lru_cache(maxsize=16)
def vllm_rht_signs(d: int) -> torch.Tensor:
    """vLLM's deterministic +-1 signs for head size `d` (`_get_rht_signs(d, round_idx=0)`)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0x9E3779B9)
    return 2.0 * torch.bernoulli(torch.full((d,), 0.5), generator=gen) - 1.0


def vllm_rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """vLLM `single_rht`: float32 `[..., d]` -> H (D x), or with `inverse` D (H x) (not / d)."""
    signs = vllm_rht_signs(x.shape[-1]).to(x.device)
    x = x.float()
    return fwht(x) * signs if inverse else fwht(x * signs)
