"""The `redraft` command's entry point: light to import, so that Ctrl-C while the libraries load
(torch, transformers: a second or two) ends with one line and exit code 130, not a traceback.

Until the models have loaded (`startup_done`), a Ctrl-C is also remembered: libraries that import
lazily turn the KeyboardInterrupt into other errors ("cannot load module more than once", "partially
initialized module") or swallow it, and the command reports any of those as "interrupted"."""

from __future__ import annotations

import os
import signal
import sys

_interrupted_at_startup = False


def _startup_sigint(signum: int, frame: object) -> None:
    global _interrupted_at_startup
    _interrupted_at_startup = True
    raise KeyboardInterrupt


def interrupted_at_startup() -> bool:
    """Whether a Ctrl-C came while the libraries or the models loaded (whatever error it became)."""
    return _interrupted_at_startup


def startup_done() -> None:
    """The models have loaded: a Ctrl-C that a library swallowed meanwhile stops the command now, and
    later ones are plain KeyboardInterrupts (chat stops an answer, distill keeps its checkpoint)."""
    if hasattr(signal, "SIGINT"):
        try:
            if signal.getsignal(signal.SIGINT) is _startup_sigint:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:  # not the main thread
            pass
    if _interrupted_at_startup:
        raise KeyboardInterrupt


def main() -> None:
    _remember_startup_sigint()
    try:
        from .cli.app import main as run
    except BaseException as exc:  # a Ctrl-C in torch's imports may surface as an ImportError
        if isinstance(exc, KeyboardInterrupt) or _interrupted_at_startup:
            sys.stderr.write("error: interrupted\n")
            raise SystemExit(130) from None
        if isinstance(exc, SystemExit) or os.environ.get("REDRAFT_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        hint = ("out of memory while the libraries loaded (a memory limit, ulimit -v?)"
                if isinstance(exc, MemoryError) or "failed to map segment" in first
                else "the installation is broken: reinstall (make install); REDRAFT_DEBUG=1 shows the traceback")
        sys.stderr.write(f"error: cannot load redraft's libraries: {type(exc).__name__}: {first} ({hint})\n")
        raise SystemExit(1) from None
    try:
        run()
    except KeyboardInterrupt:  # one the command's own handlers did not see (while its options were read)
        sys.stderr.write("error: interrupted\n")
        _quiet_shutdown(130)
        raise SystemExit(130) from None
    except SystemExit as done:
        _quiet_shutdown(done.code)
        raise


def _remember_startup_sigint() -> None:
    if hasattr(signal, "SIGINT"):
        try:
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not when SIGINT is ignored)
                signal.signal(signal.SIGINT, _startup_sigint)
        except ValueError:  # not the main thread (an embedding caller): leave its handler alone
            pass


def _quiet_shutdown(code: object) -> None:
    """The command has finished: a Ctrl-C while Python shuts down (atexit callbacks of torch and the
    libraries, a second or so) leaves the command's own exit code, instead of a traceback ("Exception
    ignored in atexit callback") and exit code -2."""
    # Ignored, not handled: a Python handler cannot run once the interpreter's finalisation has begun,
    # and a Ctrl-C then killed the process (-2) after it had printed its whole result.
    if hasattr(signal, "SIGINT"):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread (an embedding caller): leave its handler alone
            pass
