"""One place that turns exceptions into one-line messages and exit codes (no tracebacks)."""

from __future__ import annotations

import errno
import functools
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch
import typer
from rich.console import Console

from ..entry import interrupted_at_startup
from ..errors import RedraftError

F = TypeVar("F", bound=Callable[..., Any])


class Stderr:
    """sys.stderr (looked up at each call, so that a test's capture still sees it) whose write errors are
    dropped: progress and notes that cannot be shown (`2>&-`, a reader that went away, a read-only
    descriptor) must not end a run and lose its results, which go to standard output or files."""

    def write(self, text: str) -> int:
        try:
            return sys.stderr.write(text)
        except (OSError, ValueError, AttributeError):  # (AttributeError: sys.stderr is None, `2>&-`)
            return len(text)

    def flush(self) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass

    def isatty(self) -> bool:
        try:
            return sys.stderr.isatty()
        except (OSError, ValueError, AttributeError):
            return False

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stderr, name)


STDERR = Stderr()
err_console = Console(file=STDERR, highlight=False, soft_wrap=True)


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
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return OUT_OF_MEMORY, 3
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not exc.filename:  # (`> /dev/full`, a full disk)
        return "no space left on device while writing the output (standard output or a result file); free some " \
               "space or write elsewhere", 2
    where = f": {exc.filename}" if getattr(exc, "filename", None) else ""  # files the user named: missing
    return f"{exc.strerror or exc}{where}", 2  # folders, permissions, full disks


_stopped_by: list[int] = []  # the signals stop_signals turned into KeyboardInterrupt


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP (`kill`, `timeout`, a job scheduler, a closed terminal) end a run as Ctrl-C
    does: its finished work is kept (bench's prompts, sweep's cells, distill's checkpoint) instead of
    the process dying with it. `interrupt_code` then gives the signal's exit code (143, 129)."""
    _stopped_by.clear()  # (a new run: what stopped an earlier one in this process does not count)
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        _stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            previous[getattr(signal, name)] = signal.signal(getattr(signal, name), stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def stopped_word() -> str:
    """How the run was stopped, for its message: "interrupted" (Ctrl-C) or "terminated (SIGTERM)"."""
    return f"terminated ({signal.Signals(_stopped_by[0]).name})" if _stopped_by else "interrupted"


def interrupt_code() -> int:
    """The exit code of a stopped run: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    return 128 + (_stopped_by[0] if _stopped_by else signal.SIGINT)


def handle_errors(fn: F) -> F:
    """Decorator for commands: typed core errors, OOM and Ctrl-C become one line + exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _stopped_by.clear()
        try:
            return fn(*args, **kwargs)
        except (RedraftError, OSError, torch.OutOfMemoryError, MemoryError) as exc:
            if interrupted_at_startup():  # what a Ctrl-C in a library's lazy import became
                raise fail("interrupted", 130) from None
            raise fail(*_message(exc)) from None
        except KeyboardInterrupt:
            raise fail(stopped_word(), interrupt_code()) from None

    return wrapper  # type: ignore[return-value]
