"""kvtuner.machine: the processor, vector extension and decode path a benchmark reports."""

from __future__ import annotations

import pytest
import torch

from kvtuner import machine

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor @ 2.60GHz
flags\t\t: fpu sse4_2 avx2 fma avx512f avx512bw avx512vl
processor\t: 1
model name\t: Intel(R) Xeon(R) Processor @ 2.60GHz
flags\t\t: fpu sse4_2 avx2 fma avx512f avx512bw avx512vl
"""
ZEN3 = """processor\t: 0
model name\t: AMD EPYC 7B13 64-Core Processor
flags\t\t: fpu sse4_2 avx2 fma
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes crc32
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize(
    ("text", "name", "isa"),
    [
        (INTEL, "Intel(R) Xeon(R) Processor @ 2.60GHz", "AVX-512"),
        (ZEN3, "AMD EPYC 7B13 64-Core Processor", "AVX2"),
        (ARM, "", "NEON"),
        ("", "", ""),
    ],
)
def test_cpu_from_cpuinfo(text, name, isa):
    assert machine.cpu_from_cpuinfo(text) == (name, isa)


def test_describe_cpu_names_the_threads_and_versions():
    record = machine.describe("cpu")
    assert record["threads"] == torch.get_num_threads()
    assert record["torch"] == torch.__version__
    assert record["cpu"] and "gpu" not in record
    assert record["decode_path"] in ("C++ kernel", "torch.compile", "eager torch")


def test_decode_path_follows_the_switches(monkeypatch):
    monkeypatch.setenv("KVTUNER_NATIVE", "0")
    monkeypatch.setenv("KVTUNER_COMPILE", "auto")
    assert machine.decode_path(torch.device("cpu")) == "torch.compile"
    monkeypatch.setenv("KVTUNER_COMPILE", "0")
    assert machine.decode_path(torch.device("cpu")) == "eager torch"


def test_summary_line():
    record = {
        "cpu": "AMD EPYC 7B13",
        "vector_extension": "AVX2",
        "threads": 2,
        "decode_path": "C++ kernel",
        "torch": "2.13.0",
        "transformers": "5.3.0",
    }
    assert machine.summary(record) == (
        "AMD EPYC 7B13 (AVX2), 2 threads, decode: C++ kernel, torch 2.13.0, transformers 5.3.0"
    )
    gpu = {**record, "gpu": "NVIDIA H100", "decode_path": "torch.compile (Triton)"}
    assert machine.summary(gpu).startswith("NVIDIA H100, 2 threads, decode: torch.compile (Triton)")
