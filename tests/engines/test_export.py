"""kvtuner.engines.export: a plan as the files its engine reads, and those files read back."""

from __future__ import annotations

import json

import pytest

from kvtuner.engines.export import commands, read_export, write_engine_files
from kvtuner.errors import ConfigError
from kvtuner.plan import EnginePlan, parse_choice
from kvtuner.targets import DENSE, llamacpp_choice, vllm_choice

AMAX = [(4.48, 8.96), (2.0, 3.0), (1.0, 1.0), (5.0, 6.0)]


def plan_of(target, labels, model="qwen2.5-coder-0.5b"):
    layers = tuple(parse_choice(target, x) for x in labels)
    return EnginePlan(target, "f", layers, model=model).with_amax(AMAX)


def test_vllm_plan_is_a_serve_line_with_skipped_layers(tmp_path):
    plan = plan_of("vllm", ["int4_per_token_head", "dense", "int4_per_token_head", "dense"])
    cmd = commands(plan)
    assert cmd["command"] == (
        "vllm serve Qwen/Qwen2.5-Coder-0.5B-Instruct --kv-cache-dtype int4_per_token_head "
        "--kv-cache-dtype-skip-layers 1 3"
    )
    assert cmd["llm_kwargs"]["kv_cache_dtype_skip_layers"] == ["1", "3"]
    (path,) = write_engine_files(plan, tmp_path / "engine_c6.0")
    assert path.name == "engine_c6.0.vllm.json"
    back = read_export(path, 4)
    assert back.layers == plan.layers


def test_vllm_fp8_carries_the_calibrated_scales(tmp_path):
    plan = plan_of("vllm", ["fp8_e4m3", "fp8_e4m3", "dense", "fp8_e4m3"])
    (path,) = write_engine_files(plan, tmp_path / "p")
    scales = json.loads(path.read_text())["kv_scales"]
    assert scales["0"] == {"k_scale": pytest.approx(0.01), "v_scale": pytest.approx(0.02)}
    assert "2" not in scales  # a skipped layer has no scale
    back = read_export(path, 4)
    assert back.kv_amax[0] == pytest.approx((4.48, 8.96))


def test_llamacpp_uniform_is_mainline_and_first_last_is_ik_llama(tmp_path):
    uniform = plan_of("llama.cpp", ["q8_0/q4_0"] * 4)
    assert commands(uniform)["command"] == "llama-server -m MODEL.gguf -ctk q8_0 -ctv q4_0 -fa on"
    ik = plan_of("llama.cpp", ["q8_0/q8_0", "q4_0/q4_0", "q4_0/q4_0", "f16/f16"])
    args = commands(ik)["command"]
    assert "-ctk q4_0 --cache-type-k-first q8_0,1 --cache-type-k-last f16,1" in args
    assert commands(ik)["engine"] == "ik_llama.cpp"
    for plan in (uniform, ik):
        (path,) = write_engine_files(plan, tmp_path / plan.layers[0].label.replace("/", "-"))
        assert read_export(path, 4).layers == plan.layers


def test_modelopt_writes_hf_quant_config_with_one_entry_per_quantized_layer(tmp_path):
    plan = plan_of("modelopt", ["FP8", "NVFP4", "FP8_K_NVFP4_V", "dense"])
    paths = write_engine_files(plan, tmp_path / "engine_c6.0")
    config = json.loads((tmp_path / "engine_c6.0" / "hf_quant_config.json").read_text())
    quant = config["quantization"]
    assert quant["kv_cache_quant_algo"] == "MIXED_PRECISION"
    assert quant["kv_cache_quantized_layers"] == {
        "model.layers.0.self_attn": {"quant_algo": "FP8"},
        "model.layers.1.self_attn": {"quant_algo": "NVFP4"},
        "model.layers.2.self_attn": {"quant_algo": "FP8_K_NVFP4_V"},
    }
    scales = json.loads(paths[1].read_text())
    assert scales["model.layers.1.self_attn"]["k_scale"] == pytest.approx(2.0 / 2688)
    back = read_export(paths[0], 4)
    assert back.layers == plan.layers and back.layers[3] == DENSE
    assert [x for a in back.kv_amax[:3] for x in a] == pytest.approx(
        [x for a in AMAX[:3] for x in a]
    )


def test_lmdeploy_has_one_policy(tmp_path):
    plan = plan_of("lmdeploy", ["4"] * 4)
    assert commands(plan)["command"].endswith("--quant-policy 4")
    (path,) = write_engine_files(plan, tmp_path / "p")
    assert read_export(path, 4).layers == plan.layers
    with pytest.raises(ConfigError, match="one quant_policy"):
        commands(plan_of("lmdeploy", ["4", "8", "4", "4"]))


def test_vllm_cannot_hold_two_dtypes():
    mixed = EnginePlan("vllm", "x", (vllm_choice("nvfp4"), vllm_choice("fp8_e4m3"), DENSE, DENSE))
    with pytest.raises(ConfigError, match="one --kv-cache-dtype"):
        commands(mixed)
    assert llamacpp_choice("f16", "f16").dense


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ("[1]", "not an engine file"),
        ('{"other": 1}', "not an engine file"),
        ('{"llm_kwargs": {"kv_cache_dtype": "int3"}}', "no per-layer KV setting 'int3'"),
        ('{"llm_kwargs": {"kv_cache_dtype": "nvfp4", "kv_cache_dtype_skip_layers": ["9"]}}',
         "skips layer 9, the model has 4 layers"),
        ('{"engine_config": {"quant_policy": 16}}', "quant_policy 16"),
    ],
)  # fmt: skip
def test_bad_engine_files_get_one_line(tmp_path, text, message):
    path = tmp_path / "x.vllm.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_export(path, 4)
