"""`kvtuner generate`: greedy text through the quantized cache, KV memory report, bad input."""

import json

import pytest
from conftest import save_tiny_folder

from kvtuner import models
from kvtuner.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama (4 layers, 2 KV heads, head_dim 16) and a word-level tokenizer, saved as a folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_folder(folder)
    return folder


PROMPT = "w1 w2 w3 w4 w5 w6 w7 w8"


def run(capsys, *args):
    rc = main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_fp16_matches_plain_greedy(capsys, tiny_folder):
    rc, out, _ = run(
        capsys,
        "--model",
        str(tiny_folder),
        "--config",
        "fp16",
        "--prompt",
        PROMPT,
        "-n",
        "6",
        "--json",
    )
    assert rc == 0
    result = json.loads(out)
    loaded = models.load_model(tiny_folder)
    ids = loaded.tokenizer(PROMPT, return_tensors="pt")
    reference = loaded.model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = loaded.tokenizer.decode(
        reference[0, ids["input_ids"].shape[-1] :], skip_special_tokens=True
    )
    assert result["text"] == expected
    assert result["prompt_tokens"] == 8
    assert result["kv_live_bytes"] == result["dense_kv_bytes"] <= result["kv_bytes"]


def test_kv8_report(capsys, tiny_folder):
    rc, out, _ = run(
        capsys,
        "--model",
        str(tiny_folder),
        "--config",
        "KV8",
        "--prompt",
        PROMPT,
        "-n",
        "4",
        "--json",
    )
    assert rc == 0
    result = json.loads(out)
    assert 1 <= result["new_tokens"] <= 4
    assert result["equivalent_bits"] == 8.0
    # fp32 dense: 4 full-precision sinks, then 8-bit codes (1/4 of the bytes) plus an fp32
    # scale and zero per 16-value group: what kvtuner.memory counts for these tokens
    from conftest import tiny_config

    from kvtuner.compat import model_shape
    from kvtuner.config import PrecisionConfig
    from kvtuner.memory import cache_bytes, dense_bytes

    shape = model_shape(tiny_config("llama"))
    tokens = result["prompt_tokens"] + result["new_tokens"] - 1  # the last token is not cached
    kv8 = PrecisionConfig.uniform("KV8", 4)
    assert result["kv_bytes"] == cache_bytes(kv8.layers, kv8.layout, shape, tokens, 4)
    assert result["dense_kv_bytes"] == dense_bytes(shape, tokens, 4)
    assert result["kv_ratio"] < 1
    assert result["kv_ratio"] == pytest.approx(result["kv_bytes"] / result["dense_kv_bytes"])


def test_streams_text_and_prints_memory_to_stderr(capsys, tiny_folder):
    rc, out, err = run(
        capsys, "--model", str(tiny_folder), "--config", "K8V4", "--prompt", PROMPT, "-n", "4"
    )
    assert rc == 0
    assert out.startswith(PROMPT)
    memory = [line for line in err.splitlines() if line.startswith("KV cache (K8V4")]
    assert len(memory) == 1
    assert "MiB held vs" in memory[0] and "MiB dense (" in memory[0] and "x)" in memory[0]


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt_exits_2(capsys, prompt):
    rc, out, err = run(capsys, "--prompt", prompt, "--model", "no-such-model")
    assert rc == 2 and out == ""
    assert err.strip().splitlines() == [
        "kvtuner: error: --prompt: the prompt is empty; pass some text to continue"
    ]


def test_bad_config_fails_before_loading_the_model(capsys, tmp_path, tiny_folder, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load when the config is bad")

    monkeypatch.setattr(models, "load_model", no_load)
    path = tmp_path / "bad.yaml"
    path.write_text("0: {nbits_key: 4, nbits_value: 3}\n")
    rc, _, err = run(capsys, "--model", str(tiny_folder), "--config", str(path), "--prompt", "w1")
    assert rc == 2
    assert (
        err.strip()
        == f"kvtuner: error: {path}: layers.0.nbits_value must be one of 2, 4, 8, 16; got 3"
    )
    rc, _, err = run(capsys, "--model", str(tiny_folder), "--config", "KV3", "--prompt", "w1")
    assert rc == 2
    assert err.strip() == "kvtuner: error: KV3: key_bits must be one of 2, 4, 8, 16; got 3"
    rc, _, err = run(
        capsys, "--model", str(tiny_folder), "--config", "KV4", "--prompt", "w1", "--dtype", "int3"
    )
    assert rc == 2
    assert "--dtype: 'int3' is not one of float32, bfloat16, float16" in err


def test_wrong_layer_count_exits_2(capsys, tmp_path, tiny_folder):
    from kvtuner.config import PrecisionConfig

    path = PrecisionConfig.uniform("KV4", 18).save(tmp_path / "gemma.yaml")
    rc, _, err = run(capsys, "--model", str(tiny_folder), "--config", str(path), "--prompt", "w1")
    assert rc == 2
    assert err.strip() == f"kvtuner: error: {path}: num_layers: config has 18 layers, model has 4"


@pytest.mark.slow
def test_generate_gemma_kv8(capsys, gemma, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: gemma)
    rc, out, _ = run(
        capsys, "--config", "KV8", "--prompt", "The capital of France is", "-n", "8", "--json"
    )
    assert rc == 0
    result = json.loads(out)
    assert result["model"] == "gemma-3-270m" and result["new_tokens"] == 8
    # what kvtuner.memory counts for Gemma 3's shapes in float32 at these tokens
    from kvtuner.compat import model_shape
    from kvtuner.config import PrecisionConfig
    from kvtuner.memory import cache_bytes, dense_bytes

    shape = model_shape(gemma.model.config)
    kv8 = PrecisionConfig.uniform("KV8", shape.num_layers)
    tokens = result["prompt_tokens"] + result["new_tokens"] - 1
    held = cache_bytes(kv8.layers, kv8.layout, shape, tokens, 4)
    assert result["kv_bytes"] == held and result["dense_kv_bytes"] == dense_bytes(shape, tokens, 4)
