"""The compiled decode path gives the same numbers and the same tokens as the plain path."""

import pytest
import torch
from conftest import build_tiny_model

import kvtuner
from kvtuner.compat import with_cache
from kvtuner.quant import kernels, quantize_per_channel, quantize_per_token
from kvtuner.quant.quantizer import dequantize_parts


@pytest.fixture
def compiled():
    kernels.set_compile(True, min_tokens=0)
    yield


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_compiled_dequantization_matches_eager(compiled, bits, per_channel):
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(bits))
    q = quantize_per_channel(x, bits, 16) if per_channel else quantize_per_token(x, bits, 16)
    args = (q.packed, q.scale, q.zero, bits, 32, 16, per_channel)
    fast = kernels.dequantize_fast(*args)
    assert torch.allclose(fast, dequantize_parts(*args), atol=1e-6)
    # a longer history reuses the same kernel (dynamic shapes) and stays exact
    x2 = torch.randn(2, 3, 96, 32, generator=torch.Generator().manual_seed(9))
    q2 = quantize_per_channel(x2, bits, 16) if per_channel else quantize_per_token(x2, bits, 16)
    args2 = (q2.packed, q2.scale, q2.zero, bits, 32, 16, per_channel)
    assert torch.allclose(kernels.dequantize_fast(*args2), dequantize_parts(*args2), atol=1e-6)


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
def test_fast_decode_gives_the_same_tokens_as_the_plain_path(scheme):
    model = build_tiny_model("llama")
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))

    def run() -> torch.Tensor:
        cache = kvtuner.quantized_cache(model, "K8V4", scheme=scheme)
        return model.generate(
            ids, **with_cache(model, cache), max_new_tokens=24, min_new_tokens=24, do_sample=False
        )

    kernels.set_compile(False)
    plain = run()
    kernels.set_compile(True, min_tokens=0)
    fast = run()
    assert torch.equal(fast, plain)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compiled_quantization_matches_eager(compiled, bits):
    x = torch.randn(1, 3, 5, 32, generator=torch.Generator().manual_seed(bits))
    x[0, 0, 0, 0] = float("nan")
    packed, scale, zero = kernels.quantize_tokens_fast(x, bits, 16)
    q = quantize_per_token(x, bits, 16)
    assert torch.equal(packed, q.packed)
    assert torch.equal(scale, q.scale) and torch.equal(zero, q.zero)
