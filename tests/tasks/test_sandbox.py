"""The sandbox that checks HumanEval completions: what it runs, what it contains, what it fails."""

from __future__ import annotations

import time

import pytest

from kvtuner.tasks.sandbox import run_program


def test_a_program_that_runs_to_its_end_passes():
    result = run_program("def f(x):\n    return x + 1\n\nassert f(1) == 2\nprint('noise')\n")
    assert result.passed and result.status == "passed"


@pytest.mark.parametrize(
    ("program", "detail"),
    [
        ("assert 1 == 2\n", "AssertionError"),
        ("def f(:\n", "SyntaxError"),
        ("import sys\nsys.exit(0)\n", "SystemExit"),
        ("import os\nos._exit(0)\n", "exit code 0"),  # exit status 0, but it never finished
        ("x = bytearray(8 << 30)\n", "MemoryError"),
    ],
)
def test_errors_and_early_exits_fail(program, detail):
    result = run_program(program)
    assert not result.passed and result.status == "failed" and detail in result.detail


@pytest.mark.parametrize(
    "write",
    [
        "open({path!r}, 'w').write('x')",
        "import pathlib; pathlib.Path({path!r}).write_text('x')",
        "import os; os.close(os.open({path!r}, os.O_CREAT | os.O_WRONLY))",
        "import shutil; shutil.copyfile(__import__('os').devnull, {path!r})",
        "import subprocess; subprocess.run(['touch', {path!r}])",
        "import os; os.system('touch ' + {path!r})",
        # a directory opened outside, then a file created relative to it
        "import os; d = os.open({folder!r}, os.O_RDONLY); "
        "os.open('escaped.txt', os.O_CREAT | os.O_WRONLY, dir_fd=d)",
    ],
)
def test_writes_outside_the_temp_folder_are_contained(tmp_path, write):
    target = tmp_path / "escaped.txt"
    result = run_program(write.format(path=str(target), folder=str(tmp_path)) + "\n")
    assert not result.passed
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_files_inside_its_own_folder_are_allowed():
    program = "open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n"
    assert run_program(program).passed


def test_deleting_outside_files_is_refused(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("x")
    result = run_program(f"import os\nos.remove({str(keep)!r})\n")
    assert not result.passed and keep.read_text() == "x"


def test_network_is_refused():
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n"
    result = run_program(program)
    assert not result.passed and "socket" in result.detail


def test_an_endless_loop_is_killed_at_the_timeout():
    started = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=2)
    elapsed = time.monotonic() - started
    assert not result.passed and result.status == "timed out"
    assert elapsed < 2 + 3  # the timeout plus start-up, not the loop's forever
