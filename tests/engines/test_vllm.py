"""vLLM launch: flag and keyword names, values within vLLM's documented options, the writer."""

import json

import pytest

from kvtuner.engines import vllm
from kvtuner.formats import FORMATS

# vllm/config/cache.py `CacheDType` (Literal), autumn 2026
VLLM_CACHE_DTYPES = {
    "auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "fp8_ds_mla",
    "nvfp4_ds_mla", "turboquant_k8v4", "turboquant_4bit_nc", "turboquant_k3v4_nc",
    "turboquant_3bit_nc", "int4_per_token_head", "int8_per_token_head", "fp8_per_token_head",
    "nvfp4", "nvfp4_4over6",
}  # fmt: skip
# vllm/config/cache.py `kv_cache_dtype_skip_layers: list[str]`: layer indices or attention types
VLLM_SKIP_PATTERNS = {"sliding_window"}


def test_offered_values_are_vllms():
    assert set(vllm.KV_CACHE_DTYPES) <= VLLM_CACHE_DTYPES
    assert set(vllm.SKIP_PATTERNS) <= VLLM_SKIP_PATTERNS
    for name, fmt in FORMATS.items():
        if name.startswith("vllm:"):
            assert fmt.engine_value in vllm.KV_CACHE_DTYPES


def test_serve_command_and_llm_kwargs():
    launch = vllm.launch("Qwen/Qwen2.5-7B-Instruct", "int4_per_token_head", [23, 0, 1, 1])
    assert vllm.serve_argv(launch) == [
        "vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--kv-cache-dtype", "int4_per_token_head",
        "--kv-cache-dtype-skip-layers", "0", "1", "23",
    ]  # fmt: skip
    assert vllm.serve_command(launch) == (
        "vllm serve Qwen/Qwen2.5-7B-Instruct --kv-cache-dtype int4_per_token_head "
        "--kv-cache-dtype-skip-layers 0 1 23"
    )
    assert vllm.llm_kwargs(launch) == {
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "kv_cache_dtype": "int4_per_token_head",
        "kv_cache_dtype_skip_layers": ["0", "1", "23"],  # list[str], as CacheConfig types it
    }


def test_no_skip_layers_means_no_flag():
    launch = vllm.launch("/models/llama", "fp8")
    assert vllm.serve_argv(launch) == ["vllm", "serve", "/models/llama", "--kv-cache-dtype", "fp8"]
    assert "kv_cache_dtype_skip_layers" not in vllm.llm_kwargs(launch)


def test_patterns_and_string_indices():
    launch = vllm.launch("m", "fp8", ["sliding_window", "3", 1])
    assert vllm.skip_layer_strings(launch) == ["1", "3", "sliding_window"]


@pytest.mark.parametrize(
    ("dtype", "skip", "match"),
    [
        ("int3", (), "--kv-cache-dtype"),
        ("fp8", (-1,), "indices"),
        ("fp8", ("full",), "sliding_window"),
        ("auto", (0,), "quantized"),
    ],
)
def test_bad_values_are_refused_in_one_line(dtype, skip, match):
    with pytest.raises(ValueError, match=match):
        vllm.launch("m", dtype, skip)


def test_write_launch_is_json_with_scales(tmp_path):
    launch = vllm.launch("m", "fp8_e4m3", [0], kv_scales={1: (0.02, 0.03), 0: (0.01, 0.04)})
    path = vllm.write_launch(tmp_path / "launch.json", launch)
    data = json.loads(path.read_text())
    assert (
        data["command"] == "vllm serve m --kv-cache-dtype fp8_e4m3 --kv-cache-dtype-skip-layers 0"
    )
    assert data["llm_kwargs"]["kv_cache_dtype_skip_layers"] == ["0"]
    assert data["kv_scales"] == {
        "0": {"k_scale": 0.01, "v_scale": 0.04},
        "1": {"k_scale": 0.02, "v_scale": 0.03},
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launch.json"]  # no temporary left
