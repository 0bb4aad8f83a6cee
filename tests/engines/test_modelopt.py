"""ModelOpt hf_quant_config.json: keys and per-layer algo names as ModelOpt's export writes them."""

import json

import pytest

from kvtuner.engines import modelopt
from kvtuner.formats import FORMATS, PAIRS

# NVIDIA/Model-Optimizer tests/unit/torch/export/test_convert_hf_config.py and KV AutoQuantize
# (#2272): per-layer "quant_algo" values, and the whole-model value for a mixed map
MODELOPT_LAYER_ALGOS = {"FP8", "NVFP4", "FP8_K_NVFP4_V"}
MODELOPT_MIXED = "MIXED_PRECISION"


def test_names_are_modelopts():
    assert set(modelopt.LAYER_ALGOS) == MODELOPT_LAYER_ALGOS
    assert modelopt.MIXED == MODELOPT_MIXED
    assert {p.engine_value for p in PAIRS.values()} == MODELOPT_LAYER_ALGOS
    assert {
        FORMATS["modelopt:fp8"].engine_value,
        FORMATS["modelopt:nvfp4"].engine_value,
    } <= MODELOPT_LAYER_ALGOS


def test_mixed_layers():
    cfg = modelopt.hf_quant_config(["FP8", "NVFP4", "FP8_K_NVFP4_V"])
    q = cfg["quantization"]
    assert q == {
        "quant_algo": None,
        "kv_cache_quant_algo": "MIXED_PRECISION",
        "kv_cache_quantized_layers": {
            "model.layers.0.self_attn": {"quant_algo": "FP8"},
            "model.layers.1.self_attn": {"quant_algo": "NVFP4"},
            "model.layers.2.self_attn": {"quant_algo": "FP8_K_NVFP4_V"},
        },
        "kv_cache_schema_version": 1,
    }
    assert cfg["producer"]["name"] == "kvtuner"


def test_uniform_layers_name_the_algo_and_keep_the_map():
    q = modelopt.hf_quant_config(["FP8_K_NVFP4_V"] * 2)["quantization"]
    assert q["kv_cache_quant_algo"] == "FP8_K_NVFP4_V"
    assert len(q["kv_cache_quantized_layers"]) == 2


def test_unquantized_layers_are_left_out_and_make_it_mixed():
    q = modelopt.hf_quant_config([None, "FP8", "FP8"])["quantization"]
    assert q["kv_cache_quant_algo"] == "MIXED_PRECISION"
    assert list(q["kv_cache_quantized_layers"]) == [
        "model.layers.1.self_attn",
        "model.layers.2.self_attn",
    ]
    assert modelopt.hf_quant_config([None, None])["quantization"] == {
        "quant_algo": None,
        "kv_cache_quant_algo": None,
    }


def test_module_name_template():
    q = modelopt.hf_quant_config(["FP8"], module_name="model.language_model.layers.{}.self_attn")
    assert list(q["quantization"]["kv_cache_quantized_layers"]) == [
        "model.language_model.layers.0.self_attn"
    ]


def test_unknown_algo_is_refused():
    with pytest.raises(ValueError, match="layer 1 has 'INT4'"):
        modelopt.hf_quant_config(["FP8", "INT4"])


def test_writer(tmp_path):
    cfg = modelopt.hf_quant_config(["FP8", "NVFP4"])
    path = modelopt.write_hf_quant_config(tmp_path / "hf_quant_config.json", cfg)
    assert json.loads(path.read_text()) == cfg
