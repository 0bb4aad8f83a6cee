"""Shared fixtures: tiny random models of each architecture, and the embedded model once per session."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# where the device-agnostic tests (tests/attention/test_decode.py) run their tensors: `cpu` here
# and in CI; `KVTUNER_TEST_DEVICE=cuda` on a GPU machine (scripts/gpu_check.sh)
DEVICE = torch.device(os.environ.get("KVTUNER_TEST_DEVICE", "cpu"))

TINY_ARCHS = ("llama", "qwen2", "mistral", "gemma3")

# under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores, and so
# do the command-line runs it starts: a decode step is bound by memory and Python, not by threads
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ["OMP_NUM_THREADS"] = str(max(1, (_CORES or 1) // _WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@contextlib.contextmanager
def host_sync_refused(monkeypatch, device: torch.device):
    """Within the block, the host must never wait for `device`: on a GPU, torch's sync debug mode
    turns any wait into an error; on the CPU, the Python ways to wait for a value (`.item()`,
    `float(t)`, `bool(t)`, `int(t)`, `.tolist()`, `.numpy()`) raise."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in a decode step")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
            patch.setattr(torch.Tensor, name, refuse)
        yield


def tiny_config(arch: str, num_layers: int = 4):
    """A small random-weight config of `arch` (no download); Gemma 3 and Mistral get sliding windows."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=24)
    if arch == "gemma3":
        layer_types = [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)
        ]
        return Gemma3TextConfig(
            **common, sliding_window=24, layer_types=layer_types, query_pre_attn_scalar=16
        )
    raise ValueError(arch)


def build_tiny_model(arch: str, num_layers: int = 4, seed: int = 0):
    """A tiny causal LM of `arch` in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, num_layers))
    return model.eval()


def word_tokenizer():
    """A word-level fast tokenizer over the tiny models' 128 ids ("w0" ... "w123"), no download."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(124)]
    backend = Tokenizer(
        tok_models.WordLevel({t: i for i, t in enumerate(words)}, unk_token="<unk>")
    )
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def save_tiny_folder(folder, arch: str = "llama"):
    """A tiny random model and the word tokenizer saved like a hub folder; returns both."""
    model, tokenizer = build_tiny_model(arch), word_tokenizer()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


@pytest.fixture(scope="session", params=TINY_ARCHS)
def tiny_model(request):
    """One tiny random model per architecture."""
    return build_tiny_model(request.param)


@pytest.fixture(scope="session")
def gemma():
    """The embedded Gemma 3 270M (model, tokenizer), loaded once per test session."""
    from kvtuner.models import load_model

    return load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen():
    """The embedded Qwen2.5-Coder-0.5B-Instruct (24 layers, 2 KV heads), loaded once per session."""
    from kvtuner.models import load_model

    return load_model("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (30 layers, 3 KV heads), loaded once per session."""
    from kvtuner.models import load_model

    return load_model("smollm2-135m")
