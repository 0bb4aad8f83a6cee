"""`kvtuner search` workers as separate processes on one shared study, as on several machines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

STUDY = "shared"
# heartbeat every second, stale after 3: a killed worker's trial is retried within seconds
FAST_FAULTS = {
    "KVTUNER_HEARTBEAT_SECONDS": "1",
    "KVTUNER_GRACE_SECONDS": "3",
    "OMP_NUM_THREADS": "1",
}

# argv: seconds each proxy evaluation sleeps, a host name to pretend (""), then the CLI arguments
WORKER_CODE = """
import sys, time
slow, host = float(sys.argv[1]), sys.argv[2]
from kvtuner.search import faults, objectives
if slow:
    evaluate = objectives.ProxyObjective.__call__
    def slowed(self, config):
        time.sleep(slow)
        return evaluate(self, config)
    objectives.ProxyObjective.__call__ = slowed
if host:  # as if on another machine: only the heartbeat can tell that this worker died
    mine = faults.this_worker
    faults.this_worker = lambda: {**mine(), "host": host}
from kvtuner.cli import main
sys.exit(main(sys.argv[3:]))
"""


def search_argv(checkpoint: Path, storage: str, trials: int, *extra: str) -> list[str]:
    return [
        "search",
        "--model",
        str(checkpoint),
        "--objective",
        "proxy",
        "--population",
        "4",
        "--trials",
        str(trials),
        "--storage",
        storage,
        "--study-name",
        STUDY,
        "--space",
        "groups",
        "--budget",
        "equivalent",
        "--max-bits",
        "3,3.5,4,6",
        "--json",
        *extra,
    ]


def start_worker(
    workdir: Path, argv: list[str], *, slow: float = 0.0, host: str = ""
) -> subprocess.Popen:
    """A worker process in `workdir` (its stdout and stderr are pipes)."""
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_CODE, str(slow), host, *argv],
        cwd=workdir,
        env={**os.environ, **FAST_FAULTS},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen, timeout: float = 90) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) once the worker exits; killed if it runs past `timeout`."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"worker still running after {timeout} s; stderr: {err}") from None
    return process.returncode, out, err
