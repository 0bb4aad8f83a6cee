"""scripts/gpu_check.py, the check a lent GPU machine runs, on the CPU with a tiny random model:
it must run end to end here, so that its few device minutes are not spent on its own bugs."""

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import tiny_config, word_tokenizer

from kvtuner.attention import interface

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prepared(tmp_path):
    """The layout `--prepare` writes, with a tiny llama and the word tokenizer."""
    tiny_config("llama").save_pretrained(tmp_path / "configs" / "tiny-llama")
    word_tokenizer().save_pretrained(tmp_path / "tokenizer")
    return tmp_path


def run(gpu_check, prepared) -> tuple[int, dict]:
    out = prepared / "result.json"
    rc = gpu_check.main(
        ["--device", "cpu", "--weights", "random", "--prepared", str(prepared),
         "--models", "tiny-llama", "--prompt-tokens", "200", "--steps", "3",
         "--contexts", "200", "--new-tokens", "2", "--rounds", "1", "--out", str(out)]
    )  # fmt: skip
    return rc, json.loads(out.read_text())


def test_the_gpu_check_runs_end_to_end_on_the_cpu(gpu_check, prepared):
    rc, result = run(gpu_check, prepared)
    assert rc == 0 and result["errors"] == []
    assert result["environment"]["device"] == "cpu"
    paired = result["paired"]
    assert [(r["scheme"], r["config"]) for r in paired] == [
        ("per-token", "KV4"), ("per-token", "K4V2"), ("kivi", "KV4"), ("kivi", "K4V2")
    ]  # fmt: skip
    for row in paired:
        assert row["weights"] == "random" and row["steps"] == 3 and row["ok"]
        assert row["rms_difference"] <= 1e-3  # tiny float32 model: no code rounds otherwise
    assert [(r["scheme"], r["context"]) for r in result["bench"]] == [
        ("per-token", 200), ("kivi", 200)
    ]  # fmt: skip
    for row in result["bench"]:
        assert row["kv_bytes"] < row["dense_kv_bytes"] and row["tokens_per_s"] > 0


def test_a_fused_path_that_misreads_the_values_fails_the_check(gpu_check, prepared, monkeypatch):
    real = interface.decode_attention
    monkeypatch.setattr(interface, "decode_attention", lambda *a, **k: real(*a, **k) * 1.5)
    rc, result = run(gpu_check, prepared)
    assert rc == 1
    assert not any(row["ok"] for row in result["paired"])
