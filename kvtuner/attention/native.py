"""kvtuner's CPU decode kernel (`native.cpp`): built once per machine with the system's g++, loaded
as the torch operator `torch.ops.kvtuner.decode_layer`.

It computes what `kvtuner.attention.kernels.decode_layer` computes (the pure-torch reference,
which stays the path on CUDA and wherever the kernel is not available), as one call per layer:
no compile step, no graph guards, and an online softmax over chunks of tokens.

The library is built into `$KVTUNER_CACHE_DIR` (default `~/.cache/kvtuner`)`/native/`, named by
a hash of the source, torch's version and the compiler flags, so a new kvtuner or torch builds
anew. `make install` builds it (`python -m kvtuner.attention.native`); otherwise the first decode
step that needs it does (about 40 s, once). KVTUNER_NATIVE=0 turns it off. A failed build (no
g++, no torch headers) warns once and leaves the pure-torch path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from kvtuner import defaults

SOURCE = Path(__file__).with_name("native.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w"]
_STATE: dict[str, object] = {}
_LOCK = threading.Lock()


def enabled() -> bool:
    return os.environ.get("KVTUNER_NATIVE", "1").lower() not in ("0", "off", "false")


def cache_dir() -> Path:
    return defaults.cache_home() / "native"


def library_path() -> Path:
    """Where the library for this source, torch and machine is (or will be) built."""
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(FLAGS).encode()):
        digest.update(part)
    from kvtuner.machine import cpu_flags, cpuinfo

    digest.update((platform.machine() + (cpu_flags(cpuinfo()) or platform.processor())).encode())
    return cache_dir() / f"kvtuner_native_{digest.hexdigest()[:16]}.so"


def _command(target: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    libs = library_paths()[0]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        os.environ.get("CXX", "g++"),
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in include_paths()),
        str(SOURCE),
        "-o",
        str(target),
        f"-L{libs}",
        f"-Wl,-rpath,{libs}",
        "-lc10",
        "-ltorch_cpu",
        "-lgomp",
    ]


def build(verbose: bool = False) -> Path:
    """Compile the library if it is not built yet (atomically: a temporary file, then renamed)."""
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        if verbose:
            print(f"kvtuner: building the CPU decode kernel into {target} ...", file=sys.stderr)
        done = subprocess.run(_command(partial), capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            errors = [line for line in lines if "error" in line] or lines or [str(done.returncode)]
            raise RuntimeError(f"{_command(partial)[0]} failed: {errors[0].strip()}")
        os.replace(partial, target)
    return target


def available() -> bool:
    """Whether `torch.ops.kvtuner.decode_layer` can run (building and loading it on first call)."""
    if "ok" in _STATE:
        return bool(_STATE["ok"])
    with _LOCK:
        if "ok" not in _STATE:
            _STATE["ok"] = _load()
    return bool(_STATE["ok"])


def _load() -> bool:
    if not enabled() or platform.system() != "Linux":
        return False
    try:
        if not library_path().exists():
            warnings.warn(
                "kvtuner: building the CPU decode kernel (once per machine, about 40 s)",
                stacklevel=4,
            )
        torch.ops.load_library(str(build()))
        _register_fakes()
        return True
    except Exception as error:  # no compiler, no headers: the pure-torch path instead
        warnings.warn(
            f"kvtuner: the CPU decode kernel is not available ({error}); "
            "decoding uses the torch.compile path",
            stacklevel=4,
        )
        return False


def _register_fakes() -> None:
    """Shapes for tracing (torch.compile, export): the ops run only on real CPU tensors."""

    @torch.library.register_fake("kvtuner::decode_layer")
    def _decode_layer(q, *args):
        return torch.empty_like(q)

    @torch.library.register_fake("kvtuner::quantize_rows")
    def _quantize_rows(*args):
        return None


def decode_layer(*args):
    """`torch.ops.kvtuner.decode_layer` (same arguments as `kernels.decode_layer`)."""
    return torch.ops.kvtuner.decode_layer(*args)


def quantize_rows(x, channel_scale, packed, scale, zero, bits: int, group: int) -> None:
    """Quantize tokens `x` `[..., n, head_dim]` per token into the given rows (in place), what
    `quantizer.quantize_per_token(x / channel_scale, bits, group)` gives, bit for bit."""
    torch.ops.kvtuner.quantize_rows(x, channel_scale, packed, scale, zero, bits, group)


if __name__ == "__main__":  # `make install`: build now, not at the first decode step
    print(build(verbose=True))
