"""EngineKVCache: each layer stores what its engine stores, reads back what the engine reads."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForCausalLM

from kvtuner.compat import with_cache
from kvtuner.engine_cache import EngineKVCache, EngineKVLayer, with_scale
from kvtuner.errors import ConfigError
from kvtuner.formats import fake_quantize, nbytes
from kvtuner.memory import engine_effective_bits
from kvtuner.plan import EnginePlan
from kvtuner.targets import DENSE, TARGETS, llamacpp_choice, probes, vllm_choice

ALL_PROBES = [(t, c) for t in TARGETS for c in probes(t)]
AMAX = (3.0, 2.0)


def states(tokens, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, tokens, 64, generator=g) * 0.7).to(dtype)


@pytest.mark.parametrize(("target", "choice"), ALL_PROBES, ids=lambda x: getattr(x, "label", x))
def test_reads_back_what_the_engine_stores_token_by_token(target, choice):
    layer = EngineKVLayer(choice, AMAX)
    # bfloat16: LMDeploy keeps scale and zero in the model dtype, 16 bits as bits_per_element says
    keys, values = states(30, dtype=torch.bfloat16), states(30, seed=1, dtype=torch.bfloat16)
    k, v = layer.update(keys[:, :, :20], values[:, :, :20])
    assert torch.equal(k, keys[:, :, :20])  # the prompt attends to its exact states
    for t in range(20, 30):  # decode steps: the history, new token included, as stored
        k, v = layer.update(keys[:, :, t : t + 1], values[:, :, t : t + 1])
    kf, vf = choice.formats()
    expect_k = keys if kf is None else fake_quantize(with_scale(kf, AMAX[0]), keys)
    expect_v = values if vf is None else fake_quantize(with_scale(vf, AMAX[1]), values)
    assert torch.equal(k, expect_k) and torch.equal(v, expect_v)
    assert not torch.equal(k, keys) or not torch.equal(v, values)
    held = sum(keys.numel() * 2 if f is None else nbytes(f, tuple(keys.shape)) for f in (kf, vf))
    assert layer.nbytes() == held


def test_a_sliding_layer_keeps_its_window_in_the_engine_format():
    choice = vllm_choice("int4_per_token_head")
    layer = EngineKVLayer(choice, sliding_window=8)
    keys = states(20)
    layer.update(keys[:, :, :12], keys[:, :, :12])
    assert layer._keys.tokens == 7
    k, _ = layer.update(keys[:, :, 12:13], keys[:, :, 12:13])
    assert k.shape[-2] == 8  # window - 1 past tokens + the new one
    assert torch.equal(k, fake_quantize(choice.formats()[0], keys[:, :, 5:13]))
    assert layer.get_mask_sizes(1) == (8, 6)


def test_per_tensor_formats_need_a_calibrated_amax():
    with pytest.raises(ConfigError, match="modelopt:nvfp4 needs a calibrated amax"):
        EngineKVLayer(probes("modelopt")[1])
    fp8 = EngineKVLayer(vllm_choice("fp8_e4m3"))  # vLLM's default scale 1.0 without k_scale
    assert fp8.key_format.scale == 1.0
    assert EngineKVLayer(vllm_choice("fp8_e4m3"), (448.0, 896.0)).value_format.scale == 2.0


def model_with_head_dim(arch, head_dim=64):
    config = tiny_config(arch)
    config.head_dim = head_dim
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cache_bytes_are_the_effective_bits_of_engine_storage(arch):
    from kvtuner.compat import sliding_windows

    model = model_with_head_dim(arch)
    layers = (llamacpp_choice("q8_0", "q4_0"), DENSE, llamacpp_choice("q4_0", "q4_0"),
              llamacpp_choice("f16", "q5_1"))  # fmt: skip
    plan = EnginePlan("llama.cpp", "mixed", layers)
    cache = EngineKVCache(plan, model.config)
    ids = torch.randint(3, 128, (1, 40))
    with torch.no_grad():
        model(**with_cache(model, cache, input_ids=ids[:, :39], use_cache=True))
        out = model(**with_cache(model, cache, input_ids=ids[:, 39:], use_cache=True))
    assert torch.isfinite(out.logits).all()
    windows = sliding_windows(model.config)
    bits = engine_effective_bits(layers, 64, windows, 40)
    assert 16 * cache.nbytes() / cache.dense_nbytes() == pytest.approx(bits)


def test_a_plan_the_model_cannot_take_is_refused():
    model = model_with_head_dim("llama", head_dim=16)
    plan = EnginePlan("llama.cpp", "q4_0/q4_0", (llamacpp_choice("q4_0", "q4_0"),) * 4)
    with pytest.raises(ConfigError, match="multiple of 32; this model has 16"):
        EngineKVCache(plan, model.config)
    with pytest.raises(ConfigError, match="plan has 2 layers, model has 4"):
        EngineKVCache(EnginePlan("vllm", "x", (DENSE, DENSE)), model.config)
