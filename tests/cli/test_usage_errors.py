"""Usage errors on every command: one line `kvtuner: error: <command>: ...` on stderr, exit 2.

Commands are discovered from the typer app, so a command added later is covered without editing
this file. Parsing fails before any command body runs: no model is loaded.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import typer

from kvtuner.cli import _register_commands, app, main

KNOWN_COMMANDS = {"calibrate", "prune", "search", "export", "eval", "bench", "generate", "show"}


def _commands() -> dict:
    _register_commands()
    return dict(typer.main.get_command(app).commands)


COMMANDS = _commands()


def _annotation(param):
    return getattr(getattr(param, "type_descriptor", None), "annotation", None)


def _required_args(command, leave_out=None) -> list[str]:
    """Placeholder values for the required arguments and options (but `leave_out`), so that only
    the deliberately broken one fails."""
    args = []
    for param in command.params:
        if param.required and param is not leave_out:
            value = "1" if _annotation(param) in (int, float) else "x"
            args += [value] if param.param_type_name == "argument" else [param.opts[0], value]
    return args


def _value_options(command) -> list:
    return [p for p in command.params if p.param_type_name == "option" and not p.is_flag]


def _numeric_options(command) -> list:
    return [p for p in _value_options(command) if _annotation(p) in (int, float)]


def _bounded_options(command) -> list:
    return [p for p in _numeric_options(command) if p.min is not None or p.max is not None]


def run(capsys, *args):
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_usage_error(rc, out, err, command: str, *fragments: str) -> None:
    assert rc == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kvtuner: error: {command}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_known_commands_are_registered():
    assert KNOWN_COMMANDS <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unknown_option(capsys, name):
    rc, out, err = run(capsys, name, *_required_args(COMMANDS[name]), "--no-such-option", "1")
    assert_usage_error(rc, out, err, name, "No such option: --no-such-option")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_extra_argument(capsys, name):
    command = COMMANDS[name]
    rc, out, err = run(capsys, name, *_required_args(command), "extra-argument")
    assert_usage_error(rc, out, err, name, "extra-argument")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_option_without_its_value(capsys, name):
    options = _value_options(COMMANDS[name])
    if not options:
        pytest.skip(f"{name} has no option taking a value")
    option = options[-1].opts[0]
    rc, out, err = run(capsys, name, *_required_args(COMMANDS[name]), option)
    assert_usage_error(rc, out, err, name, option, "requires an argument")


def _pairs(select) -> list:
    """(command name, parameter) for every parameter `select` picks, with readable test ids."""
    return [
        pytest.param(name, param, id=f"{name}{param.opts[0]}")
        for name, command in sorted(COMMANDS.items())
        for param in select(command)
    ]


@pytest.mark.parametrize(("name", "option"), _pairs(_numeric_options))
def test_badly_typed_number(capsys, name, option):
    flag = option.opts[0]
    rc, out, err = run(capsys, name, *_required_args(COMMANDS[name]), flag, "abc")
    assert_usage_error(rc, out, err, name, f"Invalid value for '{flag}'")


@pytest.mark.parametrize(("name", "option"), _pairs(_bounded_options))
def test_out_of_range_number(capsys, name, option):
    flag = option.opts[0]
    value = option.min - 1 if option.min is not None else option.max + 1
    rc, out, err = run(capsys, name, *_required_args(COMMANDS[name]), flag, str(value))
    assert_usage_error(rc, out, err, name, f"Invalid value for '{flag}'")


@pytest.mark.parametrize(
    ("name", "param"), _pairs(lambda command: [p for p in command.params if p.required])
)
def test_missing_required(capsys, name, param):
    rc, out, err = run(capsys, name, *_required_args(COMMANDS[name], leave_out=param))
    assert_usage_error(rc, out, err, name, "Missing", param.opts[0])


def test_every_kind_of_case_is_exercised():
    """The parametrizations above are not all empty: the known commands have such options."""
    assert _pairs(_numeric_options) and _pairs(_bounded_options)
    assert {"generate", "show"} <= {
        name for name, command in COMMANDS.items() if any(p.required for p in command.params)
    }


def test_bounds_the_issue_names(capsys):
    rc, out, err = run(capsys, "generate", "--prompt", "hi", "--max-new-tokens", "0")
    assert_usage_error(rc, out, err, "generate", "'--max-new-tokens'", "greater than or equal to 1")
    rc, out, err = run(capsys, "bench", "--context", "-5")
    assert_usage_error(rc, out, err, "bench", "'--context'", "greater than or equal to 1")


def test_unknown_command_and_top_level_option(capsys):
    for args, fragment in ((["no-such-command"], "No such command"), (["--bogus"], "--bogus")):
        rc, out, err = run(capsys, *args)
        assert rc == 2 and out == ""
        assert err.splitlines() == [err.strip()] and err.startswith("kvtuner: error: "), err
        assert fragment in err


@pytest.mark.parametrize("args", [[], ["--help"], *([name, "--help"] for name in sorted(COMMANDS))])
def test_help_still_works(capsys, args):
    rc, out, err = run(capsys, *args)
    assert rc == 0
    assert "Usage" in out and err == ""


def test_the_command_list_wraps_each_summary_as_one_paragraph(capsys, monkeypatch):
    """`kvtuner --help` on a wide terminal: a command's summary is not broken where its
    docstring's lines end."""
    monkeypatch.setenv("COLUMNS", "400")
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for name in ("show", "calibrate", "search"):
        (line,) = [row for row in out.splitlines() if row.startswith(f"│ {name} ")]
        assert "engine" in line and line.rstrip(" │").endswith(".")  # the whole summary


def test_console_script():
    script = Path(sys.executable).with_name("kvtuner")
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run(
        [str(script), "generate", "--prompt", "hi", "--max-new-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        "kvtuner: error: generate: Invalid value for '--max-new-tokens' / '-n': "
        "Input should be greater than or equal to 1"
    ]


def test_real_click_exceptions_are_caught_too(capsys, monkeypatch):
    """Older typer raises the click package's exceptions, not typer._click's: same one line."""
    click = pytest.importorskip("click")
    import kvtuner.cli

    throwaway = typer.Typer(add_completion=False)

    @throwaway.command()
    def usage() -> None:
        raise click.UsageError("--a and --b exclude each other")

    @throwaway.command()
    def failure() -> None:
        raise click.ClickException("disk full")

    monkeypatch.setattr(kvtuner.cli, "app", throwaway)
    rc, out, err = run(capsys, "usage")
    assert (rc, out, err) == (2, "", "kvtuner: error: usage: --a and --b exclude each other\n")
    rc, out, err = run(capsys, "failure")
    assert (rc, out, err) == (1, "", "kvtuner: error: failure: disk full\n")
