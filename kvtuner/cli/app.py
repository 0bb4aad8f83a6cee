"""The typer application object; command modules import it and add their command."""

import typer

app = typer.Typer(
    name="kvtuner",
    help="Layer-wise mixed-precision KV-cache quantization: calibrate, prune, search, apply.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
