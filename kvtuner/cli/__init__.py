"""kvtuner command line: `kvtuner calibrate | prune | search | export | eval | bench | generate | show`.

Each command lives in its own module under kvtuner/cli/ and registers itself on `app`.
User errors (KVTunerError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import click

from kvtuner.cli.app import app
from kvtuner.errors import KVTunerError

COMMAND_MODULES = ("show", "generate", "bench", "eval", "calibrate", "prune", "search", "export")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"kvtuner.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kvtuner.cli.{name}":
                raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]) and return the exit code."""
    _register_commands()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="kvtuner", standalone_mode=False)
    except KVTunerError as exc:
        print(f"kvtuner: error: {exc}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        print("kvtuner: aborted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
