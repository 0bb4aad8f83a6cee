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
