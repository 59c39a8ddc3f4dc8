"""The `redraft` Typer app: one file per command, registered here."""

from __future__ import annotations

import re

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
app.command(help="Train (distill) a drafter for a target model from a recipe. The recipe sets every default "
                 "(recipes/NAME.yaml documents its fields); an option overrides its field.")(distill)
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
    from .common import console, err, fit_width

    console.file = None  # standard output, until a report option's '-' claims it (common.report_to_stdout)
    for c in (console, err):
        fit_width(c)


def _switch_given_a_value(ctx, argv: list[str]) -> str:
    """'; --no-draft is a switch: it takes no value' when an unexpected argument follows one of the command's
    switches (`chat --no-draft true`); '' else. Chat's --json says where its JSON goes (bench's, sweep's and
    distill's --json take a path)."""
    switches = {opt for p in ctx.command.params if getattr(p, "is_flag", False) for opt in p.opts + p.secondary_opts}
    given = next((a for a, b in zip(argv, argv[1:]) if a in switches and not b.startswith("-")), None)
    if given is None:
        return ""
    if given == "--json" and ctx.command.name == "chat":
        return "; chat's --json is a switch: the answer's JSON goes to standard output, > FILE saves it"
    return f"; {given} is a switch: it takes no value"


def main() -> None:
    """The `redraft` command: a usage error (an unknown option, a value of the wrong type) is one line
    naming the command's --help, like every other error, instead of Click's boxed usage text."""
    import os
    import sys

    try:  # typer >= 0.26 vendors Click as typer._click
        from typer._click import exceptions as click
    except ImportError:
        from click import exceptions as click

    from rich.markup import escape

    from ..entry import interrupted_at_startup
    from ._errors import bug_line, err_console

    try:
        rc = app(standalone_mode=False, prog_name="redraft")  # (not 'python -m redraft_cli' in the hints below)
    except click.NoArgsIsHelpError as exc:  # `redraft` alone: the help (Typer's rich help prints it already)
        if exc.format_message().strip():
            exc.show()
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} --help')"
        else:  # (an option without its value is raised before its command's context exists)
            known = {c.name or c.callback.__name__ for c in app.registered_commands}
            command = next((a for a in sys.argv[1:] if a in known), None)
            hint = f" (see 'redraft{' ' + command if command else ''} --help')"
        if ctx is not None and "unexpected extra argument" in exc.format_message():
            hint = _switch_given_a_value(ctx, sys.argv[1:]) + hint
            exc.message = re.sub(r"argument\(s\) \((\s*)\)", lambda m: f"argument(s) ({m[1]!r}, "
                                 f"{'an empty one' if not m[1] else 'only spaces'})", exc.message)
        err_console.print(f"[bold red]error:[/] {escape(exc.format_message().rstrip('.') if hint else exc.format_message())}{hint}".replace("\n", " "), markup=True,
                          highlight=False)
        sys.exit(exc.exit_code)
    except getattr(click, "Abort", ()) as exc:  # (not in every vendored Click)
        if isinstance(exc.__context__, KeyboardInterrupt):  # Click's word for a Ctrl-C outside the commands
            err_console.print("[bold red]error:[/] interrupted", markup=True, highlight=False)
            sys.exit(130)
        sys.exit(1)
    except Exception as exc:  # a bug: one line, and the traceback on request
        if os.environ.get("REDRAFT_DEBUG"):
            raise
        if interrupted_at_startup():  # a Ctrl-C that a library's lazy import turned into another error
            err_console.print("[bold red]error:[/] interrupted", markup=True, highlight=False)
            sys.exit(130)
        if "No space left on device" in str(exc):  # a library's own error for a full disk (safetensors)
            err_console.print(f"[bold red]error:[/] no space left on device ({type(exc).__name__} while writing); free "
                              f"some space or write elsewhere", markup=True, highlight=False)
            sys.exit(2)
        err_console.print(f"[bold red]error:[/] {escape(bug_line(exc))}", markup=True, highlight=False)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)
