"""The `redraft` Typer app: one file per command, registered here."""

from __future__ import annotations

import typer

from .bench import bench
from .chat import chat
from .distill import distill
from .sweep import sweep

app = typer.Typer(
    name="redraft",
    help="Fast, lossless LLM inference with ReDrafter speculative decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command(help="Measure ReDrafter against plain decoding on the same prompts.")(bench)
app.command(help="Talk to a model with ReDrafter decoding, streamed.")(chat)
app.command(help="Train (distill) a drafter for a target model from a recipe.")(distill)
app.command(help="Grid-search the beam shape: speed and tokens per step per beam width x length.")(sweep)


def _print_version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"redraft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Runs before every command; `--version` is handled while parsing, so it needs no command."""


def main() -> None:
    app()
