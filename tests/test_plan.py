"""kvtuner.plan: allocation over what an engine can express, checked against brute force; plan files."""

from __future__ import annotations

import itertools
import random

import pytest

from kvtuner.errors import ConfigError
from kvtuner.memory import engine_effective_bits
from kvtuner.plan import (
    EnginePlan,
    allocate_plan,
    best_uniform,
    first_last_plan,
    load_plan,
    parse_choice,
)
from kvtuner.targets import (
    DENSE,
    choice_loss,
    families,
    llamacpp_choice,
    probes,
    vllm_choice,
)

HEAD_DIM = 64


def random_losses(target, layers, seed=0):
    rng = random.Random(seed)
    return [{c: rng.random() * 2 ** -c.bits(HEAD_DIM) * 100 for c in probes(target)}
            for _ in range(layers)]  # fmt: skip


@pytest.mark.parametrize("target", ["vllm", "modelopt", "lmdeploy", "llama.cpp"])
@pytest.mark.parametrize("cap", [4.5, 5.2, 6.0, 9.0])
def test_allocation_is_the_best_any_setting_allows_under_the_cap(target, cap):
    windows = [None, 33, None, None, 33]
    measured = random_losses(target, len(windows), seed=int(cap * 10))
    found = allocate_plan(target, measured, HEAD_DIM, windows, 128, cap)
    best = None
    for candidates in families(target).values():
        for layers in itertools.product(candidates, repeat=len(windows)):
            if engine_effective_bits(layers, HEAD_DIM, windows, 128) > cap + 1e-9:
                continue
            loss = sum(choice_loss(m, c) for m, c in zip(measured, layers))
            best = loss if best is None else min(best, loss)
    if best is None:
        assert found is None
        return
    assert found.loss == pytest.approx(best, rel=1e-9)
    assert found.bits <= cap + 1e-9
    assert found.bits == pytest.approx(
        engine_effective_bits(found.plan.layers, HEAD_DIM, windows, 128)
    )
    if target == "vllm":  # one dtype, the rest skipped
        assert len({c for c in found.plan.layers if not c.dense}) <= 1


def test_nothing_fits_below_the_cheapest_setting():
    measured = random_losses("lmdeploy", 3)
    assert allocate_plan("lmdeploy", measured, HEAD_DIM, [None] * 3, 64, 4.4) is None
    uniform = best_uniform("lmdeploy", measured, HEAD_DIM, [None] * 3, 64, 6.0)
    assert uniform.plan.layers[0].label == "quant_policy 4"


def test_first_last_form_matches_brute_force():
    n, windows = 5, [None] * 5
    measured = random_losses("llama.cpp", n, seed=3)
    cap = 6.0
    found = first_last_plan(measured, HEAD_DIM, windows, 64, cap)
    best = None
    bases = [c for (c,) in families("llama.cpp").values()]
    for base in bases:
        for up in (llamacpp_choice("q8_0", "q8_0"), llamacpp_choice("f16", "f16")):
            if up.bits(HEAD_DIM) <= base.bits(HEAD_DIM):
                continue
            for first in range(n + 1):
                for last in range(n - first + 1):
                    if first + last == 0:
                        continue
                    layers = [up] * first + [base] * (n - first - last) + [up] * last
                    if engine_effective_bits(layers, HEAD_DIM, windows, 64) > cap + 1e-9:
                        continue
                    loss = sum(choice_loss(m, c) for m, c in zip(measured, layers))
                    best = loss if best is None else min(best, loss)
    assert found.loss == pytest.approx(best)
    layers = found.plan.layers
    assert layers[0] != layers[n // 2] or layers[-1] != layers[n // 2]


def test_a_plan_file_round_trips(tmp_path):
    layers = (vllm_choice("int4_per_token_head"), DENSE, vllm_choice("int4_per_token_head"))
    plan = EnginePlan("vllm", "int4_per_token_head", layers, model="m",
                      metadata={"cap": 6.0}).with_amax([(1.5, 2.0)] * 3)  # fmt: skip
    path = plan.save(tmp_path / "p.yaml")
    back = load_plan(path)
    assert back == plan


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [", "not valid YAML"),
        ("target: vllm\nlayers: [nvfp4]\n", "not a kvtuner engine plan"),
        ("kvtuner_engine_plan: 1\ntarget: tgi\nlayers: [x]\n", "unknown target 'tgi'"),
        (
            "kvtuner_engine_plan: 1\ntarget: vllm\nlayers: [int3]\n",
            "vllm has no per-layer KV setting 'int3'",
        ),
        ("kvtuner_engine_plan: 1\ntarget: vllm\nlayers: []\n", "non-empty list"),
        (
            "kvtuner_engine_plan: 1\ntarget: vllm\nlayers: [nvfp4]\nkv_amax: [[1, 2], [1, 2]]\n",
            "kv_amax",
        ),
    ],
)
def test_bad_plan_files_get_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_plan(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_plan(tmp_path / "missing.yaml")


def test_engine_names_parse_to_choices():
    assert parse_choice("llama.cpp", "q8_0/q4_0") == llamacpp_choice("q8_0", "q4_0")
    assert parse_choice("lmdeploy", "4").label == "quant_policy 4"
    assert parse_choice("modelopt", "FP8_K_NVFP4_V").key == "modelopt:fp8"
    with pytest.raises(ConfigError):
        parse_choice("llama.cpp", "q3_k/q4_0")


def test_engine_allocation_judges_vllm_against_its_own_dtype_on_every_layer():
    from kvtuner.plan import engine_allocation

    measured = random_losses("vllm", 4, seed=5)
    found, uniform = engine_allocation("vllm", measured, HEAD_DIM, [None] * 4, 64, 6.0)
    dtype = next(c for c in found.plan.layers if not c.dense)
    assert uniform.layers == (dtype,) * 4
    found, uniform = engine_allocation(
        "lmdeploy", random_losses("lmdeploy", 4), HEAD_DIM, [None] * 4, 64, 9.0
    )
    assert uniform.layers == found.plan.layers  # one setting for all layers: its own baseline
    lmdeploy = random_losses("lmdeploy", 4)
    assert engine_allocation("lmdeploy", lmdeploy, HEAD_DIM, [None] * 4, 64, 4.0) == (None, None)
