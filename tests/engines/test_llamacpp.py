"""llama.cpp / ik_llama.cpp arguments against the documented cache types and flags."""

import json

import pytest

from kvtuner.engines import llamacpp
from kvtuner.formats import FORMATS

# common/arg.cpp `kv_cache_types` (mainline): the values -ctk / -ctv accept
MAINLINE_CACHE_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1"]


def test_cache_types_are_mainlines():
    assert list(llamacpp.CACHE_TYPES) == MAINLINE_CACHE_TYPES
    for name, fmt in FORMATS.items():
        if name.startswith("llamacpp:"):
            assert fmt.engine_value in MAINLINE_CACHE_TYPES


def test_cache_args():
    assert llamacpp.cache_args("q8_0", "q4_0") == ["-ctk", "q8_0", "-ctv", "q4_0", "-fa", "on"]
    assert llamacpp.cache_args("q8_0", "f16", flash_attn=False) == ["-ctk", "q8_0", "-ctv", "f16"]
    assert llamacpp.server_command("m.gguf", "q8_0", "q4_0") == (
        "llama-server -m m.gguf -ctk q8_0 -ctv q4_0 -fa on"
    )


def test_quantized_v_needs_flash_attention():
    with pytest.raises(ValueError, match="flash attention"):
        llamacpp.cache_args("f16", "q4_0", flash_attn=False)


def test_unknown_type_is_refused():
    with pytest.raises(ValueError, match="-ctk is one of"):
        llamacpp.cache_args("q2_k", "q4_0")


def test_ik_llama_first_and_last_layers():
    k = ["q8_0", "q8_0", "q4_0", "q4_0", "q4_0", "q8_0"]
    v = ["q4_0"] * 6
    assert llamacpp.ik_llama_args(k, v) == [
        "-ctk", "q4_0", "--cache-type-k-first", "q8_0,2", "--cache-type-k-last", "q8_0,1",
        "-ctv", "q4_0",
    ]  # fmt: skip


def test_ik_llama_two_runs_use_first():
    args = llamacpp.ik_llama_args(["q8_0", "q5_0", "q5_0"], ["f16", "q8_0", "q8_0"])
    assert args == [
        "-ctk", "q5_0", "--cache-type-k-first", "q8_0,1",
        "-ctv", "q8_0", "--cache-type-v-first", "f16,1",
    ]  # fmt: skip


def test_ik_llama_refuses_a_plan_it_cannot_express():
    with pytest.raises(ValueError, match="first N layers"):
        llamacpp.ik_llama_args(["q8_0", "q4_0", "q8_0", "q4_0", "q8_0"], ["q8_0"] * 5)


def test_write_args(tmp_path):
    path = llamacpp.write_args(tmp_path / "args.json", llamacpp.cache_args("q8_0", "q8_0"))
    assert json.loads(path.read_text())["shell"] == "-ctk q8_0 -ctv q8_0 -fa on"
