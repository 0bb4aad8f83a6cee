"""What a benchmark ran on: the processor and its vector extensions, threads, library versions and
the path kvtuner's decode attention takes there, so that a table of speeds says where it came from.

`describe(device)` is the record `kvtuner bench --json` keeps under "machine"; `summary` is its
one-line form. The parsing of /proc/cpuinfo is a pure function of the text (`cpu_from_cpuinfo`).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

# widest first: the first extension a CPU has is the one its name reports
VECTOR_EXTENSIONS = [
    ("avx512f", "AVX-512"),
    ("avx2", "AVX2"),
    ("asimd", "NEON"),
    ("sse4_2", "SSE4.2"),
]


def cpu_from_cpuinfo(text: str) -> tuple[str, str]:
    """(processor name, widest vector extension) from the text of /proc/cpuinfo; "" where unknown."""
    name = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        named = key in ("model name", "cpu model", "processor") and not value.strip().isdigit()
        if named:  # x86 "model name"; some ARM kernels "Processor: AArch64 ..."
            name = " ".join(value.split())
            break
    flags = set(cpu_flags(text).split())
    isa = next((label for flag, label in VECTOR_EXTENSIONS if flag in flags), "")
    return name, isa


def cpu_flags(text: str) -> str:
    """The first core's instruction-set flags (x86 "flags", ARM "Features") from the text of
    /proc/cpuinfo, space-separated as there; "" if it has none."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return " ".join(value.split())
    return ""


def cpuinfo() -> str:
    """The text of /proc/cpuinfo ("" where there is none)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def decode_path(device: torch.device) -> str:
    """The code that runs a long history's decode attention on `device` (see attention.decode)."""
    from kvtuner import compiling
    from kvtuner.attention import native

    if device.type == "cpu" and native.enabled() and native.available():
        return "C++ kernel"
    if compiling.compile_mode() != "0" and not compiling.failed():
        return "torch.compile (Triton)" if device.type == "cuda" else "torch.compile"
    return "eager torch"


def describe(device: torch.device | str) -> dict[str, Any]:
    """The machine record of a benchmark on `device`."""
    import transformers

    device = torch.device(device)
    name, isa = cpu_from_cpuinfo(cpuinfo())
    record: dict[str, Any] = {
        "cpu": name or platform.processor() or platform.machine(),
        "vector_extension": isa or None,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "decode_path": decode_path(device),
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def summary(record: dict[str, Any]) -> str:
    """One line: "Intel Xeon ... (AVX-512), 2 threads, decode: C++ kernel, torch 2.13.0"."""
    where = record.get("gpu") or record["cpu"]
    if not record.get("gpu") and record.get("vector_extension"):
        where += f" ({record['vector_extension']})"
    return (
        f"{where}, {record['threads']} threads, decode: {record['decode_path']}, "
        f"torch {record['torch']}, transformers {record['transformers']}"
    )
