"""The `redraft` Typer app: one file per command, registered here."""

from __future__ import annotations

import typer

from ..errors import NotBuiltError
from ._errors import handle_errors
from .bench import bench
from .distill import distill

app = typer.Typer(
    name="redraft",
    help="Fast, lossless LLM inference with ReDrafter speculative decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command(help="Measure ReDrafter against plain decoding on the same prompts.")(bench)


def _not_built(name: str, issue: str):
    @handle_errors
    def command(ctx: typer.Context) -> None:
        raise NotBuiltError(f"`redraft {name}` is not built yet ({issue})")

    command.__doc__ = f"(not built yet) {issue}"
    return command


_extra = {"allow_extra_args": True, "ignore_unknown_options": True}
app.command(help="Train (distill) a drafter for a target model from a recipe.")(distill)
app.command("chat", context_settings=_extra, help="Talk to a model with ReDrafter decoding. (not built yet)")(
    _not_built("chat", "interactive chat lands with the chat/sweep issue"))
app.command("sweep", context_settings=_extra, help="Grid-search the beam shape. (not built yet)")(
    _not_built("sweep", "beam-shape sweeps land with the chat/sweep issue"))


@app.callback()
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        from .. import __version__

        typer.echo(f"redraft {__version__}")
        raise typer.Exit()


def main() -> None:
    app()
