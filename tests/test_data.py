"""Calibration / held-out text and fixed-length token samples."""

from __future__ import annotations

import json

import pytest
import torch

from kvtuner.data import calibration_text, heldout_text, read_text, special_prefix, token_samples
from kvtuner.errors import ConfigError


class NumberTokenizer:
    """Whitespace tokenizer: a number n is token n + 10, any other word 5; optional <bos> = 1."""

    def __init__(self, bos: bool = False) -> None:
        self.bos = bos

    def __call__(self, text: str, add_special_tokens: bool = True, **kwargs):
        ids = [int(word) + 10 if word.isdigit() else 5 for word in text.split()]
        return {"input_ids": ([1] if self.bos and add_special_tokens else []) + ids}


def numbers(n: int) -> str:
    return " ".join(str(i) for i in range(n))


def test_calibration_text_is_pydoc_topics():
    import pydoc_data.topics

    text = calibration_text()
    assert len(text) > 400_000
    assert pydoc_data.topics.topics["assert"] in text


def test_heldout_text_is_shipped_and_not_calibration_text():
    held = heldout_text()
    assert len(held) > 100_000
    assert "GNU GENERAL PUBLIC LICENSE" in held
    calibration = calibration_text()
    chunks = [held[i : i + 200] for i in range(0, len(held) - 200, len(held) // 20)]
    assert not any(chunk in calibration for chunk in chunks)


def test_read_text_plain_and_jsonl(tmp_path):
    plain = tmp_path / "a.txt"
    plain.write_text("hello\nworld\n")
    assert read_text(plain) == "hello\nworld\n"
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["one", "two"])) + "\n"
    )
    assert read_text(jsonl) == "one\n\ntwo"
    # JSON lines are recognised without the .jsonl extension too
    renamed = tmp_path / "c.txt"
    renamed.write_text(jsonl.read_text())
    assert calibration_text(renamed) == "one\n\ntwo"


def test_read_text_errors_name_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_text(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl: line 2 has no string field 'text'"):
        read_text(bad)


def test_token_samples_shape_windows_and_seed():
    tok = NumberTokenizer()
    samples = token_samples(tok, numbers(1000), num_samples=5, seq_len=50, seed=3)
    assert samples.shape == (5, 50) and samples.dtype == torch.long
    numbers_seen = samples - 10
    # each sample is a window of consecutive tokens starting on a window boundary
    assert torch.equal(
        numbers_seen[:, 1:] - numbers_seen[:, :-1], torch.ones(5, 49, dtype=torch.long)
    )
    assert set((numbers_seen[:, 0] % 50).tolist()) == {0}
    # non-overlapping
    assert len(set(numbers_seen[:, 0].tolist())) == 5
    assert torch.equal(samples, token_samples(tok, numbers(1000), 5, 50, seed=3))
    assert not torch.equal(samples, token_samples(tok, numbers(1000), 5, 50, seed=4))


def test_token_samples_start_with_the_tokenizers_prefix():
    tok = NumberTokenizer(bos=True)
    assert special_prefix(tok) == [1]
    samples = token_samples(tok, numbers(300), num_samples=3, seq_len=20)
    assert samples.shape == (3, 20)
    assert samples[:, 0].tolist() == [1, 1, 1]
    body = samples[:, 1:] - 10
    assert set((body[:, 0] % 19).tolist()) == {0}


def test_token_samples_too_short_or_empty_text():
    tok = NumberTokenizer()
    with pytest.raises(
        ConfigError, match=r"the text has 99 tokens: too short for 2 samples of 50 tokens"
    ):
        token_samples(tok, numbers(99), num_samples=2, seq_len=50)
    token_samples(tok, numbers(100), num_samples=2, seq_len=50)  # exactly enough
    with pytest.raises(ConfigError, match="empty"):
        token_samples(tok, "  \n", num_samples=1, seq_len=8)
    with pytest.raises(ConfigError, match="--samples"):
        token_samples(tok, numbers(100), num_samples=0, seq_len=8)


def test_the_long_heldout_text_holds_eight_16k_samples_and_is_not_calibration_text():
    from kvtuner.data import calibration_text, heldout_text

    short, long = heldout_text(), heldout_text(long=True)
    assert long.startswith(short) and len(long) > 4 * len(short)
    assert "VIM USER MANUAL" in long
    calibration = calibration_text()
    probe = long[len(short) + 5000 : len(short) + 5200]
    assert probe not in calibration
