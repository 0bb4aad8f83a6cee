"""The decode hot path (plane-wise dequantization into a preallocated output) gives the same numbers
and the same tokens as the plain path (unpack every code, then scale by group)."""

import pytest
import torch
from conftest import build_tiny_model

import kvtuner
from kvtuner import cache as cache_module
from kvtuner.compat import with_cache
from kvtuner.quant import (
    dequantize_parts,
    dequantize_reference,
    quantize_per_channel,
    quantize_per_token,
)
from kvtuner.quant import store as store_module


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(
    ("per_channel", "head_dim", "group"),
    [
        (False, 64, 64),
        (False, 64, 32),
        (False, 64, 16),
        (False, 48, 16),
        (False, 256, 32),
        (True, 64, 32),
        (True, 48, 16),
    ],
)
@pytest.mark.parametrize("symmetric", [False, True])
def test_fast_dequantization_matches_the_plain_path(bits, per_channel, head_dim, group, symmetric):
    x = torch.randn(2, 3, 64, head_dim, generator=torch.Generator().manual_seed(bits + head_dim))
    if per_channel:
        q = quantize_per_channel(x, bits, group, symmetric)
    else:
        q = quantize_per_token(x, bits, group, symmetric)
    args = (q.packed, q.scale, q.zero, bits, head_dim, group, per_channel)
    assert torch.allclose(dequantize_parts(*args), dequantize_reference(*args), atol=1e-6)


def test_fast_path_works_on_sliced_history_and_bfloat16():
    x = torch.randn(1, 2, 40, 64, dtype=torch.bfloat16)
    q = quantize_per_token(x, 4)
    args = (q.packed[..., 7:, :], q.scale[..., 7:, :], q.zero[..., 7:, :], 4, 64, 64, False)
    fast = dequantize_parts(*args)
    assert fast.dtype == torch.bfloat16 and fast.shape == (1, 2, 33, 64)
    assert torch.equal(fast, dequantize_reference(*args))


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
def test_fast_decode_gives_the_same_tokens_as_the_plain_path(monkeypatch, scheme):
    model = build_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        cache = kvtuner.quantized_cache(model, "K8V4", scheme=scheme)
        return model.generate(
            ids, **with_cache(model, cache), max_new_tokens=24, min_new_tokens=24, do_sample=False
        )

    fast = run()
    monkeypatch.setattr(store_module, "dequantize_parts", dequantize_reference)
    assert torch.equal(run(), fast)


@pytest.mark.parametrize("beams", [1, 3])
def test_stacked_keys_and_values_give_the_same_tokens_as_two_stores(monkeypatch, beams):
    """KV4 layers hold K and V stacked in one store; two separate stores must decode identically
    (greedy and beam search, which reorders the stacked tensors along the batch dimension)."""
    model = build_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1))

    def run() -> tuple[torch.Tensor, type]:
        cache = kvtuner.quantized_cache(model, "KV4")
        out = model.generate(
            ids,
            **with_cache(model, cache),
            max_new_tokens=12,
            min_new_tokens=12,
            num_beams=beams,
            do_sample=False,
        )
        return out, type(cache.layers[0].stores)

    stacked, kind = run()
    assert kind is store_module.StackedKV

    def separate(key_bits, value_bits, *, kivi, group_size, block_size, smooth):
        return store_module.SeparateKV(
            store_module.make_store(key_bits, per_channel=kivi, group=group_size, smooth=smooth),
            store_module.make_store(value_bits, per_channel=False, group=group_size, smooth=smooth),
        )

    monkeypatch.setattr(cache_module, "make_kv_stores", separate)
    reference, kind = run()
    assert kind is store_module.SeparateKV
    assert torch.equal(stacked, reference)
