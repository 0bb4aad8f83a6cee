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


def test_cpu_flags_are_the_first_cores_whatever_the_architecture():
    assert machine.cpu_flags(INTEL) == "fpu sse4_2 avx2 fma avx512f avx512bw avx512vl"
    assert machine.cpu_flags(ARM) == "fp asimd evtstrm aes crc32"
    assert machine.cpu_flags("") == ""


def test_the_native_library_is_named_by_the_cpus_flags(monkeypatch):
    """One build per CPU kind: a different instruction set names another library file."""
    from kvtuner.attention import native

    monkeypatch.setattr(machine, "cpuinfo", lambda: INTEL)
    intel = native.library_path()
    assert native.library_path() == intel
    monkeypatch.setattr(machine, "cpuinfo", lambda: ZEN3)
    assert native.library_path() != intel


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
