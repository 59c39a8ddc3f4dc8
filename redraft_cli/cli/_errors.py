"""One place that turns exceptions into one-line messages and exit codes (no tracebacks)."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
import typer
from rich.console import Console

from ..entry import interrupted_at_startup
from ..errors import RedraftError

F = TypeVar("F", bound=Callable[..., Any])
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


OUT_OF_MEMORY = "out of memory: try a smaller beam shape, --quantize 8bit/4bit or a smaller dtype"


def bug_line(exc: BaseException) -> str:
    """One line for an error no check foresaw: its type, its first line, and how to see the traceback."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first} (a bug in redraft; REDRAFT_DEBUG=1 shows the traceback)"


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", markup=True)
    return typer.Exit(code)


def _message(exc: BaseException) -> tuple[str, int]:
    """The one line and exit code of an error a command expects: typed core errors, files, memory."""
    if isinstance(exc, RedraftError):
        return str(exc).replace("[", "\\["), exc.exit_code
    if isinstance(exc, torch.OutOfMemoryError):
        return OUT_OF_MEMORY, 3
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""  # files the user named: missing
    return f"{exc.strerror or exc}{where}", 2  # folders, permissions, full disks


def handle_errors(fn: F) -> F:
    """Decorator for commands: typed core errors, OOM and Ctrl-C become one line + exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (RedraftError, OSError, torch.OutOfMemoryError) as exc:
            if interrupted_at_startup():  # what a Ctrl-C in a library's lazy import became
                raise fail("interrupted", 130) from None
            raise fail(*_message(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]
