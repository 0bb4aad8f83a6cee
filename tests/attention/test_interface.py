"""kvtuner's attention function in transformers: which forwards it answers, and what it leaves alone."""

import pytest
import torch
from conftest import build_tiny_model
from transformers import DynamicCache

import kvtuner
from kvtuner.attention import interface
from kvtuner.compat import with_cache


def generate(model, ids, cache, mask=None, tokens: int = 24):
    out = model.generate(
        ids, attention_mask=mask, **with_cache(model, cache), max_new_tokens=tokens,
        min_new_tokens=tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "mistral", "qwen2"])
@pytest.mark.parametrize("base", ["sdpa", "eager"])
@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
def test_fused_generation_equals_the_dequantizing_path(monkeypatch, arch, base, scheme):
    """Left-padded batch of 2 over 40 + 24 tokens (past the sliding windows of 24): same tokens,
    logits within 1e-4, and every decode step of every layer went through the fused path."""
    model = build_tiny_model(arch)
    model.set_attn_implementation(base)
    ids = torch.randint(4, 120, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    calls = []
    real = interface.decode_attention
    monkeypatch.setattr(
        interface, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    fused = generate(model, ids, kvtuner.quantized_cache(model, "K4V2", scheme=scheme), mask)
    assert model.config._attn_implementation == {"sdpa": "kvtuner", "eager": "kvtuner_eager"}[base]
    assert len(calls) == 23 * model.config.num_hidden_layers  # every decode step, every layer
    calls.clear()
    plain = generate(
        model,
        ids,
        kvtuner.quantized_cache(model, "K4V2", scheme=scheme, fused_attention=False),
        mask,
    )
    assert not calls
    assert torch.equal(fused[0], plain[0])
    assert (fused[1] - plain[1]).abs().max().item() <= 1e-4 * plain[1].abs().max().item()


def test_other_caches_run_the_models_own_attention():
    """After a kvtuner cache switched the model, a DynamicCache gives what it gave before."""
    model = build_tiny_model("llama")
    ids = torch.randint(4, 120, (1, 30), generator=torch.Generator().manual_seed(2))
    before = generate(model, ids, DynamicCache(config=model.config))
    kvtuner.quantized_cache(model, "KV4")
    assert interface.fused_attention(model)
    after = generate(model, ids, DynamicCache(config=model.config))
    assert torch.equal(before[0], after[0]) and torch.allclose(before[1], after[1], atol=1e-5)


def test_an_attention_it_cannot_wrap_warns_once_and_dequantizes(monkeypatch):
    model = build_tiny_model("llama")
    model.config._attn_implementation_internal = "flex_attention"
    monkeypatch.setattr(interface, "_WARNED", set())
    with pytest.warns(UserWarning, match="needs attn_implementation 'sdpa' or 'eager'"):
        cache = kvtuner.quantized_cache(model, "KV4")
    assert not cache.fused_attention
