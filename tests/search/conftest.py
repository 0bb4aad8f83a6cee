"""Fixtures for search tests: the tiny model folder and a working folder with its calibration."""

from __future__ import annotations

from pathlib import Path

import pytest

from .tiny import TINY_NAME, write_calibration, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 4-layer random Llama saved as `<tmp>/tiny-llama` (config, weights, tokenizer)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / TINY_NAME)


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_checkpoint) -> Path:
    """A fresh working folder holding the tiny model's calibration; the cwd for relative defaults."""
    write_calibration(tmp_path / "calibration")
    monkeypatch.chdir(tmp_path)
    return tmp_path
