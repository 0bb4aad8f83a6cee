"""Calibration and evaluation text, tokenized into fixed-length samples.

- Calibration text: Python's own `pydoc_data.topics` (about 110k tokens of English documentation),
  or a user file (`--text`): plain text, or JSONL with a "text" field per line.
- Held-out text for evaluation: `kvtuner/texts/heldout.txt`, licence texts from
  /usr/share/common-licenses (see scripts/make_heldout_text.py): offline, and not the calibration text.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from kvtuner.errors import ConfigError

CALIBRATION_SOURCE = "pydoc_data.topics"
HELDOUT_SOURCE = "kvtuner/texts/heldout.txt"


def calibration_text(path: str | Path | None = None) -> str:
    """The text of `path` (plain or JSONL), or `pydoc_data.topics` joined when `path` is None."""
    if path is not None:
        return read_text(path)
    import pydoc_data.topics

    return "\n\n".join(pydoc_data.topics.topics.values())


def heldout_text(path: str | Path | None = None, *, long: bool = False) -> str:
    """The text of `path` (plain or JSONL), or the shipped held-out text when `path` is None;
    `long` adds the long held-out text (the Vim user manual, about 160k tokens) after it, enough
    for 8 samples of 16k tokens (`kvtuner eval --context` above `defaults.LONG_CONTEXT`)."""
    if path is not None:
        return read_text(path)
    texts = resources.files("kvtuner").joinpath("texts")
    text = texts.joinpath("heldout.txt").read_text(encoding="utf-8")
    if long:
        text += "\n\n" + texts.joinpath("heldout_long.txt").read_text(encoding="utf-8")
    return text


def text_source(path: str | Path | None, default: str = CALIBRATION_SOURCE) -> str:
    """How metadata names the text: the file path, or `default` for the built-in text."""
    return str(path) if path is not None else default


def read_text(path: str | Path) -> str:
    """Read a plain-text file, or a JSONL file (`.jsonl`, or JSON objects on every line) of {"text": ...}."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: text file not found")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    lines = [line for line in raw.splitlines() if line.strip()]
    if path.suffix.lower() == ".jsonl" or (lines and all(_is_json_object(x) for x in lines[:3])):
        return _jsonl_text(path, lines)
    return raw


def _is_json_object(line: str) -> bool:
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _jsonl_text(path: Path, lines: list[str]) -> str:
    texts = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"{path}: line {number} has no string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


def special_prefix(tokenizer: Any) -> list[int]:
    """Token ids the tokenizer puts before any text (Gemma: [bos]; SmolLM2: none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    if len(full) > len(plain) and full[len(full) - len(plain) :] == plain:
        return list(full[: len(full) - len(plain)])
    return []


def token_samples(
    tokenizer: Any, text: str, num_samples: int, seq_len: int, seed: int = 0, skip: int = 0
) -> torch.LongTensor:
    """`num_samples` non-overlapping windows of `text`, each `seq_len` tokens: LongTensor `[n, seq_len]`.

    The text is tokenized once and cut into consecutive windows; `seed` picks which windows, in a
    reproducible order, and `skip` leaves out the first ones of that order: calls with the same
    seed and length and disjoint `[skip, skip + num_samples)` ranges get disjoint windows (the
    calibration's single-layer KL, the search and its re-scoring each have their own). Each sample
    starts with the tokenizer's own prefix (e.g. `<bos>`), as a model's input would, so a window
    holds `seq_len - len(prefix)` text tokens.
    """
    if num_samples < 1:
        raise ConfigError(f"--samples must be at least 1; got {num_samples}")
    prefix = special_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise ConfigError(f"--seq-len must be at least {len(prefix) + 1}; got {seq_len}")
    if not text.strip():
        raise ConfigError("the text is empty: nothing to cut samples from")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    available = len(ids) // body
    if available < skip + num_samples:
        raise ConfigError(
            f"the text has {len(ids)} tokens: too short for {skip + num_samples} samples of "
            f"{seq_len} tokens (needs {(skip + num_samples) * body}); pass a longer --text or "
            "lower --samples/--seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=generator)[skip : skip + num_samples] * body
    tokens = torch.tensor(ids, dtype=torch.long)
    windows = torch.stack([tokens[s : s + body] for s in starts.tolist()])
    if prefix:
        head = torch.tensor(prefix, dtype=torch.long).expand(num_samples, -1)
        windows = torch.cat([head, windows], dim=1)
    return windows


def calibration_windows(
    tokenizer: Any,
    text: str,
    context: int,
    *,
    skip: int,
    count: int,
    seed: int = 0,
    extra: int | None = None,
) -> torch.LongTensor:
    """Calibration-side evaluation samples `[count, context + extra]` (extra defaults to
    `defaults.SEARCH_CONTINUATION`).

    One window length and one order for every calibration-side use, so that their windows never
    overlap: the single-layer KL takes windows 0..15, the search's trials the next ones, and its
    re-scoring the ones after (each truncates the windows to its own continuation).
    """
    from kvtuner import defaults

    seq_len = context + (extra or defaults.SEARCH_CONTINUATION)
    return token_samples(tokenizer, text, count, seq_len, seed, skip=skip)
