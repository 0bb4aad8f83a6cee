"""The decode hot path (plane-wise dequantization into a preallocated output) gives the same numbers
and the same tokens as the plain path (unpack every code, then scale by group)."""

import pytest
import torch
from conftest import build_tiny_model

import kvtuner
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
