"""One place that turns exceptions into one-line messages and exit codes (no tracebacks)."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import torch
import typer
from rich.console import Console

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


def handle_errors(fn: F) -> F:
    """Decorator for commands: typed core errors, OOM and Ctrl-C become one line + exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RedraftError as exc:
            raise fail(str(exc).replace("[", "\\["), exc.exit_code) from None
        except OSError as exc:  # files the user named: missing folders, permissions, full disks
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            raise fail(f"{exc.strerror or exc}{where}", 2) from None
        except torch.OutOfMemoryError:
            raise fail(OUT_OF_MEMORY, 3) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper  # type: ignore[return-value]
