"""Memory is real: the bytes formula (`kvtuner.memory`) against `nbytes()` of really filled caches."""

import pytest
import torch
from conftest import tiny_config

from kvtuner.cache import KVTunerCache
from kvtuner.compat import model_shape, text_config
from kvtuner.config import PrecisionConfig
from kvtuner.memory import (
    ModelShape,
    cache_bytes,
    dense_bytes,
    effective_bits,
    held_tokens,
    layer_costs,
)
from kvtuner.precision import Layout, PrecisionPair

MIXED = (PrecisionPair(8, 4), PrecisionPair(2, 2), PrecisionPair(16, 16), PrecisionPair(16, 4))


def fill(cache: KVTunerCache, shape: ModelShape, chunks: list[int], dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for n in chunks:
        for layer in range(shape.num_layers):
            k = torch.randn(1, shape.kv_heads, n, shape.head_dim, generator=gen).to(dtype)
            cache.update(k, k.clone(), layer)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral"])
@pytest.mark.parametrize(
    "layout",
    [
        dict(scheme="per-token"),
        dict(scheme="per-token", group_size=None, sink_tokens=0),
        dict(scheme="per-token", group_size=8, sink_tokens=3),
        dict(scheme="kivi", block_size=8, residual_length=8),
        dict(scheme="kivi", block_size=4, residual_length=6, sink_tokens=5, group_size=4),
    ],
)
@pytest.mark.parametrize("context", [3, 17, 24, 25, 61, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_formula_matches_nbytes_of_a_filled_cache(arch, layout, context, dtype):
    config = tiny_config(arch)  # gemma3 and mistral: sliding windows of 24 tokens
    shape = model_shape(config)
    precision = PrecisionConfig(layers=MIXED, **layout)
    size = torch.finfo(dtype).bits // 8
    prefill = KVTunerCache(precision, config)
    fill(prefill, shape, [context], dtype)
    assert prefill.nbytes() == cache_bytes(MIXED, precision.layout, shape, context, size)
    assert prefill.dense_nbytes() == dense_bytes(shape, context, size)
    # decoding token by token ends in the same state (windows of 24 >= residual + block here)
    stepwise = KVTunerCache(precision, config)
    fill(stepwise, shape, [min(context, 5)] + [1] * (context - min(context, 5)), dtype)
    assert stepwise.live_nbytes() == prefill.nbytes()
    # decoding grows the stores with spare rows: allocated, so counted in nbytes, but bounded
    rows = 17 * 2 * shape.kv_heads * shape.head_dim * size * shape.num_layers
    assert prefill.nbytes() <= stepwise.nbytes() <= prefill.nbytes() * 9 / 8 + rows


def test_effective_bits_by_hand():
    shape = ModelShape(num_layers=1, kv_heads=2, head_dim=64, windows=(None,))
    kv4 = [PrecisionPair(4, 4)]
    per_head = Layout("per-token", group_size=None, sink_tokens=0, smooth=False)
    # one scale and zero (16 bits each) per head of 64: 4 + 32 / 64 = 4.5 bits
    assert effective_bits(kv4, per_head, shape, 100) == 4.5
    # groups of 32 channels: 4 + 1; 4 sinks of 100 tokens at 16 bits: 96 * 5 / 100 + 4 * 16 / 100
    g32 = Layout("per-token", group_size=32, smooth=False)
    assert effective_bits(kv4, g32, shape, 100) == pytest.approx((96 * 5 + 4 * 16) / 100)
    # smoothing adds one 16-bit scale per channel and head for keys and for values; the default
    # per-token group is 64 channels (one per head here): 4.5 bits, and the sinks
    assert effective_bits(kv4, Layout("per-token"), shape, 100) == pytest.approx(
        (96 * 4.5 + 4 * 16 + 16) / 100
    )
    # KIVI at 128 tokens, 4 sinks, residual 32, blocks 32: 64 quantized, 60 residual
    kivi = Layout("kivi", residual_length=32, smooth=False)
    assert held_tokens(kivi, kv4[0], 128).quantized == 64
    expected = (64 * 5 + 64 * 16) / 128  # keys: 1 bit of per-channel scales; values: 1 bit
    assert effective_bits(kv4, kivi, shape, 128) == pytest.approx(expected)
    with pytest.raises(ValueError):
        effective_bits(kv4, kivi, shape, 0)


def test_sliding_layers_weigh_by_what_they_hold():
    """Gemma 3-like: at 4096 tokens a window-512 layer holds 511 tokens, a global one 4096."""
    shape = ModelShape(num_layers=2, kv_heads=1, head_dim=256, windows=(512, None))
    layout = Layout("per-token", group_size=32, sink_tokens=0, smooth=False)
    costs = layer_costs([[PrecisionPair(4, 4)]] * 2, layout, shape, 4096)
    sliding, full = costs[0][PrecisionPair(4, 4)], costs[1][PrecisionPair(4, 4)]
    assert full / sliding == pytest.approx(4096 / 511)
    assert sliding + full == pytest.approx(
        effective_bits([PrecisionPair(4, 4)] * 2, layout, shape, 4096)
    )
    assert sliding + full == pytest.approx(5.0)


@pytest.fixture(scope="module")
def smollm2_config():
    from kvtuner.models import load_model_config

    return load_model_config("smollm2-135m")


@pytest.mark.parametrize(
    ("spec", "scheme", "max_ratio"),
    [("KV4", "per-token", 0.32), ("KV2", "per-token", 0.19), ("KV2", "kivi", 0.22)],
)
def test_smollm2_bf16_memory_ratio_at_4096_tokens(smollm2_config, spec, scheme, max_ratio):
    """SmolLM2-135M's shapes, bf16, 4096 tokens: codes + 16-bit scales per 32 values (+ residual)."""
    cfg = text_config(smollm2_config)
    shape = model_shape(smollm2_config)
    precision = PrecisionConfig.uniform(spec, cfg.num_hidden_layers, scheme=scheme)
    cache = KVTunerCache(precision, smollm2_config)
    fill(cache, shape, [4088] + [1] * 8, torch.bfloat16)
    dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 4096 * cfg.head_dim * 2
    assert cache.dense_nbytes() == dense
    assert cache.live_nbytes() / dense <= max_ratio
    assert cache.nbytes() == sum(t.numel() * t.element_size() for t in cache.tensors())
    assert cache.live_nbytes() == cache_bytes(precision.layers, precision.layout, shape, 4096, 2)
    # the decode steps grew the stores by a sixteenth: allocated, counted in nbytes
    assert cache.live_nbytes() < cache.nbytes() <= cache.live_nbytes() * 17 / 16
    codes = sum(t.numel() for t in cache.layers[0].stores.live_tensors() if t.dtype == torch.uint8)
    codes *= cfg.num_hidden_layers
    held = held_tokens(precision.layout, precision.layers[0], 4096)
    bits = int(spec[-1])
    assert (
        codes
        == 2
        * cfg.num_hidden_layers
        * cfg.num_key_value_heads
        * held.quantized
        * cfg.head_dim
        * bits
        // 8
    )
