"""kvtuner.bench's memory measurement: RSS that follows live memory where the C library allows."""

from __future__ import annotations

import platform
import time

import pytest
import torch

from kvtuner import bench

MIB = 2**20
glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)


@glibc
def test_live_threshold_gives_freed_tensors_back():
    """A block above the threshold leaves RSS when freed, so a phase's peak is what it held."""
    try:
        assert bench.set_mmap_threshold(bench.LIVE_MMAP_THRESHOLD)
        before = bench._rss_bytes()
        block = torch.ones(64 * MIB // 4)  # 64 MiB, every page touched
        held = bench._rss_bytes()
        del block
        after = bench._rss_bytes()
    finally:
        bench.set_mmap_threshold(bench.TIMED_MMAP_THRESHOLD)
    assert held - before > 60 * MIB
    assert after - before < 4 * MIB


@glibc
def test_peak_memory_sees_a_block_held_inside_the_phase():
    bench.set_mmap_threshold(bench.LIVE_MMAP_THRESHOLD)
    try:
        with bench.peak_memory(torch.device("cpu")) as peak:
            block = torch.ones(48 * MIB // 4)
            time.sleep(0.05)  # the sampler reads RSS every 2 ms
            del block
    finally:
        bench.set_mmap_threshold(bench.TIMED_MMAP_THRESHOLD)
    assert 44 * MIB < peak["peak"] < 60 * MIB


def test_every_contexts_memory_runs_come_before_any_timed_round(monkeypatch):
    """Several contexts in one process: each memory run sees the heap the live threshold keeps,
    not the one another context's timed rounds left (it read tens of MiB high there)."""
    from conftest import build_tiny_model, word_tokenizer

    from kvtuner.config import load_config

    log = []
    real_decode, real_threshold = bench._decode, bench.set_mmap_threshold
    monkeypatch.setattr(
        bench,
        "_decode",
        lambda m, ids, c, n: log.append((ids.shape[1], n)) or real_decode(m, ids, c, n),
    )
    monkeypatch.setattr(
        bench, "set_mmap_threshold", lambda b: log.append(("threshold", b)) or real_threshold(b)
    )
    model = build_tiny_model("llama", num_layers=2)
    config = load_config("KV4", num_layers=2)
    results = bench.run_benches(
        model, word_tokenizer(), config, contexts=[40, 70], new_tokens=3, rounds=2, peer_bits=None
    )
    assert [r["context"] for r in results] == [40, 70]
    live = ("threshold", bench.TIMED_MMAP_THRESHOLD) in log  # set after the live runs, if at all
    timed = log.index(("threshold", bench.TIMED_MMAP_THRESHOLD)) if live else 0
    runs = [entry for entry in log[timed:] if entry[0] != "threshold"]
    assert runs == [(40, 3)] * 4 + [(70, 3)] * 4  # 2 rounds x 2 kinds, then the next context
    if live:
        before = [entry for entry in log[:timed] if entry[0] != "threshold"]
        # warm-ups (the first kind's over the whole context), then 2 memory runs, per context
        assert before == [(40, 2), (40, 2), (40, 3), (40, 3), (70, 2), (70, 2), (70, 3), (70, 3)]
        assert all(r["memory_source"].startswith("RSS, an untimed run") for r in results)
    for r in results:
        assert r["rounds"] == 2 and r["batch"] == 1 and r["new_tokens"] == 3
        assert 0 < r["kv_bytes"] < r["dense_kv_bytes"]
