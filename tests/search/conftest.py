"""Fixtures for search tests: the tiny model folder and a working folder with its calibration."""

from __future__ import annotations

import uuid
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


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the test session (skipped, with the reason, when there are no binaries)."""
    from .postgres import find_binaries, start_server

    bin_dir, reason = find_binaries()
    if bin_dir is None:
        pytest.skip(reason)
    server = start_server()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture
def postgres_url(postgres_server, request) -> str:
    """A fresh database on the session's server; its URL carries the password."""
    stem = "".join(c if c.isalnum() else "_" for c in request.node.name).lower()[:40]
    name = f"t_{stem}_{uuid.uuid4().hex[:8]}"
    return postgres_server.create_database(name)
