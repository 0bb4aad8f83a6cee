"""kvtuner.targets: what each engine can store per layer, and what it costs."""

from __future__ import annotations

import pytest

from kvtuner.errors import ConfigError
from kvtuner.memory import engine_effective_bits, engine_layer_costs
from kvtuner.targets import (
    DENSE,
    TARGETS,
    choice_loss,
    families,
    head_dim_problem,
    llamacpp_choice,
    probes,
    usable_families,
    vllm_choice,
)


def test_each_engine_offers_what_it_can_express():
    vllm = families("vllm")
    assert set(vllm) == {"fp8_e4m3", "int8_per_token_head", "fp8_per_token_head",
                         "int4_per_token_head", "nvfp4"}  # fmt: skip
    assert all(DENSE in c and len(c) == 2 for c in vllm.values())  # one dtype, or skipped
    llama = families("llama.cpp")
    assert len(llama) == 7 * 7 - 1 and all(len(c) == 1 for c in llama.values())
    assert [c.label for c in families("modelopt")["MIXED_PRECISION"]] == [
        "FP8", "NVFP4", "FP8_K_NVFP4_V", "dense"]  # fmt: skip
    assert set(families("lmdeploy")) == {"quant_policy 8", "quant_policy 4"}
    with pytest.raises(ConfigError, match="unknown target 'tgi'"):
        families("tgi")


def test_storage_bits_are_each_formats_real_bytes():
    assert vllm_choice("int4_per_token_head").bits(64) == 4.5  # 4 + one fp32 per 64
    assert vllm_choice("int4_per_token_head").bits(128) == 4.25
    assert vllm_choice("fp8_e4m3").bits(64) == 8.0  # per-tensor scale lives outside
    assert llamacpp_choice("q4_0", "q4_0").bits(64) == 4.5
    assert llamacpp_choice("q8_0", "f16").bits(64) == (8.5 + 16) / 2
    assert DENSE.bits(64) == 16


def test_effective_bits_weigh_layers_by_the_tokens_they_hold():
    q4 = llamacpp_choice("q4_0", "q4_0")
    # two full layers and one sliding layer of window 513 at 4096 tokens: 4096, 4096, 512
    windows = [None, None, 513]
    bits = engine_effective_bits([DENSE, DENSE, q4], 64, windows, 4096)
    assert bits == pytest.approx((2 * 4096 * 16 + 512 * 4.5) / (2 * 4096 + 512))
    costs = engine_layer_costs([q4, DENSE], 64, windows, 4096)
    assert sum(c[q4] for c in costs) == pytest.approx(4.5)
    with pytest.raises(ValueError):
        engine_effective_bits([q4], 64, windows, 4096)


def test_pair_losses_add_a_layers_key_only_and_value_only_probes():
    k8, v4 = probes("llama.cpp")[0], probes("llama.cpp")[6 + 4]
    assert (k8.label, v4.label) == ("q8_0/f16", "f16/q4_0")
    measured = {k8: 0.01, v4: 0.2}
    assert choice_loss(measured, llamacpp_choice("q8_0", "q4_0")) == pytest.approx(0.21)
    assert choice_loss(measured, llamacpp_choice("q8_0", "f16")) == 0.01
    assert choice_loss(measured, DENSE) == 0.0
    with pytest.raises(KeyError):
        choice_loss(measured, llamacpp_choice("q5_0", "q4_0"))


def test_head_sizes_an_engine_cannot_take_are_named():
    assert head_dim_problem("llama.cpp", 80) is not None and "80" in head_dim_problem(
        "llama.cpp", 80
    )
    assert head_dim_problem("llama.cpp", 64) is None
    assert "int4_per_token_head" not in usable_families("vllm", 80)  # power of two only
    assert "int8_per_token_head" in usable_families("vllm", 80)
    for target in TARGETS:
        assert usable_families(target, 64) == families(target)
