"""Memory is real: bytes held by the cache for SmolLM2-135M's shapes in bf16 at 4096 tokens."""

import pytest
import torch

from kvtuner.cache import KVTunerCache
from kvtuner.compat import text_config
from kvtuner.config import PrecisionConfig

CONTEXT = 4096


@pytest.fixture(scope="module")
def smollm2_config():
    from kvtuner.models import load_model_config

    return load_model_config("smollm2-135m")


def filled_cache(
    model_config, spec: str, scheme: str = "per-token", decode_steps: int = 8
) -> KVTunerCache:
    """A cache holding a 4096-token prefill plus a few decode steps of bf16 K/V of the model's shapes."""
    cfg = text_config(model_config)
    precision = PrecisionConfig.uniform(spec, cfg.num_hidden_layers, scheme=scheme)
    cache = KVTunerCache(precision, model_config)
    gen = torch.Generator().manual_seed(0)
    shape = (1, cfg.num_key_value_heads, CONTEXT - decode_steps, cfg.head_dim)
    for n in [shape[2]] + [1] * decode_steps:
        for layer in range(cfg.num_hidden_layers):
            k = torch.randn(*shape[:2], n, shape[3], generator=gen).to(torch.bfloat16)
            v = torch.randn(*shape[:2], n, shape[3], generator=gen).to(torch.bfloat16)
            cache.update(k, v, layer)
    return cache


@pytest.mark.parametrize(("spec", "max_ratio"), [("KV4", 0.30), ("KV2", 0.17)])
def test_smollm2_bf16_memory_ratio_per_token(smollm2_config, spec, max_ratio):
    cache = filled_cache(smollm2_config, spec)
    cfg = text_config(smollm2_config)
    dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * CONTEXT * cfg.head_dim * 2  # bf16
    assert cache.dense_nbytes() == dense
    assert cache.nbytes() / dense <= max_ratio
    # the figure is the tensors the cache really holds, and they are packed uint8 codes
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in cache.tensors())
    codes = [t for t in cache.tensors() if t.dtype == torch.uint8]
    bits = int(spec[-1])
    assert (
        sum(t.numel() for t in codes)
        == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * CONTEXT * cfg.head_dim * bits // 8
    )


def test_smollm2_bf16_memory_ratio_kivi(smollm2_config):
    cache = filled_cache(smollm2_config, "KV2", scheme="kivi")
    # 2-bit codes + a bf16 scale and zero per 32 values + a residual of 32-63 tokens
    assert cache.nbytes() / cache.dense_nbytes() <= 0.22
