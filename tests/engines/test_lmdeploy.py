"""LMDeploy launch: --quant-policy values and TurbomindEngineConfig keyword, as documented."""

import json

import pytest

from kvtuner.engines import lmdeploy
from kvtuner.formats import FORMATS

# lmdeploy/messages.py `QuantPolicy`: NONE 0, INT4 4, INT8 8, FP8 16, FP8_E5M2 17, TURBO_QUANT 42
LMDEPLOY_QUANT_POLICIES = {0, 4, 8, 16, 17, 42}


def test_policies_are_lmdeploys():
    assert set(lmdeploy.QUANT_POLICIES) <= LMDEPLOY_QUANT_POLICIES
    for name, fmt in FORMATS.items():
        if name.startswith("lmdeploy:"):
            assert fmt.engine_value in lmdeploy.QUANT_POLICIES


def test_serve_and_engine_config():
    # docs/en/quantization/kv_quant.md: lmdeploy serve api_server MODEL --quant-policy 8
    assert lmdeploy.serve_command("internlm/internlm2-chat-7b", 8) == (
        "lmdeploy serve api_server internlm/internlm2-chat-7b --quant-policy 8"
    )
    assert lmdeploy.serve_argv("m", 4, backend="pytorch") == [
        "lmdeploy", "serve", "api_server", "m", "--backend", "pytorch", "--quant-policy", "4",
    ]  # fmt: skip
    assert lmdeploy.engine_config_kwargs(4) == {"quant_policy": 4}


@pytest.mark.parametrize("policy", [0, 2, 16])
def test_other_policies_are_refused(policy):
    with pytest.raises(ValueError, match="quant_policy"):
        lmdeploy.engine_config_kwargs(policy)


def test_bad_backend_is_refused():
    with pytest.raises(ValueError, match="--backend"):
        lmdeploy.serve_argv("m", 8, backend="vllm")  # type: ignore[arg-type]


def test_writer(tmp_path):
    path = lmdeploy.write_launch(tmp_path / "lmdeploy.json", "m", 8)
    assert json.loads(path.read_text()) == {
        "command": "lmdeploy serve api_server m --quant-policy 8",
        "engine_config": {"quant_policy": 8},
    }
