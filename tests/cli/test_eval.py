"""`kvtuner eval` on a tiny model folder: the JSON contract and bad input."""

from __future__ import annotations

import json

import pytest
from search.tiny import write_tiny_checkpoint  # noqa: I001

from kvtuner.cli import main

SMALL = ["--samples", "2", "--context", "24", "--continuation", "8", "--chunk", "4"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")


def run_eval(capsys, checkpoint, config, *extra):
    rc = main(["eval", "--model", str(checkpoint), "--config", config, *SMALL, "--json", *extra])
    captured = capsys.readouterr()
    return rc, captured


def test_eval_json_contract(capsys, checkpoint):
    rc, captured = run_eval(capsys, checkpoint, "KV4")
    assert rc == 0
    out = json.loads(captured.out)
    assert {"kl", "ppl", "equivalent_bits", "tokens", "effective_bits"} <= set(out)
    assert out["equivalent_bits"] == 4.0 and out["tokens"] == 16
    assert out["effective_bits"] > 4.0  # scales and zero points cost bits
    assert out["kl"] > 0 and len(out["per_sample_kl"]) == 2


def test_full_precision_has_zero_kl_and_lower_bits_more(capsys, checkpoint):
    kl = {}
    for spec in ("fp16", "KV8", "KV2"):
        rc, captured = run_eval(capsys, checkpoint, spec)
        assert rc == 0
        kl[spec] = json.loads(captured.out)["kl"]
    assert kl["fp16"] < 1e-9 < kl["KV8"] < kl["KV2"]


def test_eval_with_accuracy_tasks(capsys, checkpoint, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n")
    rc, captured = run_eval(
        capsys, checkpoint, "KV8", "--tasks", str(tasks), "--max-new-tokens", "4"
    )
    assert rc == 0
    out = json.loads(captured.out)
    assert out["tasks"] == 1 and out["accuracy"] in (0.0, 1.0)


@pytest.mark.parametrize(
    ("config", "extra", "message"),
    [
        ("KV3", [], "KV3"),
        ("missing.yaml", [], "missing.yaml: config file not found"),
        ("KV4", ["--text", "nope.txt"], "nope.txt: text file not found"),
        ("KV4", ["--chunk", "0"], "--chunk': Input should be greater than or equal to 1"),
    ],
)
def test_bad_input(capsys, checkpoint, config, extra, message):
    rc, captured = run_eval(capsys, checkpoint, config, *extra)
    assert rc == 2
    assert captured.err.startswith("kvtuner: error:") and message in captured.err
    assert captured.out == ""


def test_quantize_prefill_is_an_option_and_costs_quality(capsys, checkpoint):
    rc, exact = run_eval(capsys, checkpoint, "KV2")
    assert rc == 0
    rc, quantized = run_eval(capsys, checkpoint, "KV2", "--quantize-prefill")
    assert rc == 0
    exact, quantized = json.loads(exact.out), json.loads(quantized.out)
    assert exact["quantize_prefill"] is False and quantized["quantize_prefill"] is True
    assert quantized["kl"] > exact["kl"]  # the prompt's forward compounds its own errors
