"""`kvtuner bench` on a tiny model folder: the JSON contract, bytes that match the memory model."""

from __future__ import annotations

import json

import pytest
from search.tiny import write_tiny_checkpoint  # noqa: I001

from kvtuner.cli import main
from kvtuner.compat import model_shape
from kvtuner.config import load_config
from kvtuner.models import load_model_config

SMALL = ["--context", "120", "--new-tokens", "4", "--rounds", "1", "--peer-bits", "0", "--json"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")


def run_bench(capsys, checkpoint, config, *extra):
    rc = main(["bench", "--model", str(checkpoint), "--config", config, *SMALL, *extra])
    return rc, capsys.readouterr()


@pytest.mark.parametrize("scheme", ["per-token", "kivi"])
def test_bench_json_contract_and_bytes(capsys, checkpoint, scheme):
    rc, captured = run_bench(capsys, checkpoint, "KV4", "--scheme", scheme)
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["config"] == "KV4" and out["scheme"] == scheme
    assert out["context"] == 120 and out["new_tokens"] == 4
    assert [row["name"] for row in out["rows"]] == ["kvtuner KV4", "dense DynamicCache"]
    assert 0 < out["kv_bytes"] < out["dense_kv_bytes"]
    assert out["memory_ratio"] == pytest.approx(out["kv_bytes"] / out["dense_kv_bytes"])
    assert out["tokens_per_s"] > 0 and out["dense_tokens_per_s"] > 0
    assert 0.0 <= out["greedy_agreement"] <= 1.0
    assert out["machine"]["cpu"]  # what measured it
    assert out["machine"]["threads"] >= 1 and out["machine"]["decode_path"]
    assert out["memory_source"].startswith("RSS")
    # the effective bits it reports are the memory model's at the tokens the cache really holds:
    # the context and each new token fed back (float32 model: 32 bits dense)
    shape = model_shape(load_model_config(str(checkpoint)))
    precision = load_config("KV4", num_layers=shape.num_layers, scheme=scheme)
    assert out["effective_bits"] == pytest.approx(precision.effective_bits(shape, 124, 32))
    assert 4.0 < out["effective_bits"] < 32.0  # float32: 32 bits is dense


def test_bench_fp16_holds_what_the_dense_cache_holds(capsys, checkpoint):
    rc, captured = run_bench(capsys, checkpoint, "fp16")
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["kv_bytes"] == out["dense_kv_bytes"]
    assert out["effective_bits"] == pytest.approx(32.0)  # float32 model: kept as is
    assert out["greedy_agreement"] == 1.0


def test_bench_table_output(capsys, checkpoint):
    rc = main(["bench", "--model", str(checkpoint), "--config", "K8V4", *SMALL[:-1]])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "memory" in captured.out and "effective bits" in captured.out
    assert "kvtuner K8V4" in captured.out
    assert "machine: " in captured.out and "threads, decode: " in captured.out


def test_bench_unsupported_bits_is_one_line(capsys, checkpoint):
    rc, captured = run_bench(capsys, checkpoint, "KV3")
    assert rc == 2
    assert "KV3" in captured.err and len(captured.err.strip().splitlines()) == 1
