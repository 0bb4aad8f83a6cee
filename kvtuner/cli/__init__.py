"""kvtuner command line: `kvtuner calibrate | prune | search | export | eval | bench | generate | show`.

Each command lives in its own module under kvtuner/cli/ and registers itself on `app`.
User errors (KVTunerError) and usage errors (unknown option, missing or bad value, extra
argument) become one line on stderr, `kvtuner: error: <command>: <what is wrong>`, and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

import typer

from kvtuner.cli.app import app
from kvtuner.errors import KVTunerError

COMMAND_MODULES = (
    "show",
    "generate",
    "bench",
    "eval",
    "calibrate",
    "prune",
    "allocate",
    "search",
    "export",
)


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(f"kvtuner.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"kvtuner.cli.{name}":
                raise
    for info in app.registered_commands:
        # `kvtuner --help` lists each command by its docstring's first paragraph, line breaks
        # and all: one line, for the listing to wrap it
        doc = info.callback.__doc__ if info.callback else None
        if info.short_help is None and doc:
            info.short_help = " ".join(doc.split("\n\n")[0].split())


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The exception class `name` from typer's vendored click and from click, where each exists.

    typer >= 0.2x raises `typer._click` exceptions, older typer the real click's; typer's public
    API re-exports only BadParameter, Exit and Abort, not UsageError or NoArgsIsHelpError.
    """
    classes = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if cls is not None:
            classes.append(cls)
    return tuple(classes)


_NO_ARGS_IS_HELP = _click_exceptions("NoArgsIsHelpError")
_USAGE_ERROR = _click_exceptions("UsageError")
_CLICK_EXCEPTION = _click_exceptions("ClickException")
_EXIT = (typer.Exit, *_click_exceptions("Exit"))
_ABORT = (typer.Abort, *_click_exceptions("Abort"))


def _command_name(ctx: Any, args: Sequence[str]) -> str:
    """`generate` for `kvtuner generate ...`; "" for errors of `kvtuner` itself.

    Read from the error's context, or from the leading words of `args` when the parser raised it
    without one (an option missing its value, an extra argument).
    """
    names: list[str] = []
    if ctx is not None:
        while ctx.parent is not None:
            names.insert(0, ctx.info_name)
            ctx = ctx.parent
        return " ".join(names)
    command = typer.main.get_command(app)
    for arg in args:
        command = getattr(command, "commands", {}).get(arg)
        if command is None:
            break
        names.append(arg)
    return " ".join(names)


def _error_line(message: str, command: str) -> str:
    # click's messages can span lines (choice lists); the CLI promises one line
    message = " ".join(message.split())
    return f"kvtuner: error: {command}: {message}" if command else f"kvtuner: error: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]) and return the exit code."""
    _register_commands()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="kvtuner", standalone_mode=False)
    except KVTunerError as exc:
        print(f"kvtuner: error: {exc}", file=sys.stderr)
        return 2
    except _NO_ARGS_IS_HELP as exc:
        # `kvtuner` alone asks for help; with rich, typer has already printed it while raising
        help_text = exc.format_message()
        if help_text:
            print(help_text)
        return 0
    except _USAGE_ERROR as exc:
        print(_error_line(exc.format_message(), _command_name(exc.ctx, args)), file=sys.stderr)
        return 2
    except _CLICK_EXCEPTION as exc:
        print(_error_line(exc.format_message(), _command_name(None, args)), file=sys.stderr)
        return exc.exit_code
    except _EXIT as exc:
        return exc.exit_code
    except _ABORT:
        print("kvtuner: aborted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
