"""The `redraft` command's entry point: light to import, so that Ctrl-C while the libraries load
(torch, transformers: a second or two) ends with one line and exit code 130, not a traceback."""

from __future__ import annotations

import os
import signal
import sys


def main() -> None:
    try:
        from .cli.app import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    try:
        run()
    except SystemExit as done:
        _quiet_shutdown(done.code)
        raise


def _quiet_shutdown(code: object) -> None:
    """The command has finished: a Ctrl-C while Python shuts down (atexit callbacks of torch and the
    libraries, a second or so) ends the process with the command's own exit code, instead of a
    traceback ("Exception ignored in atexit callback") and exit code -2."""
    status = code if isinstance(code, int) else 0 if code is None else 1

    def leave(signum: int, frame: object) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)

    if hasattr(signal, "SIGINT"):
        try:
            signal.signal(signal.SIGINT, leave)
        except ValueError:  # not the main thread (an embedding caller): leave its handler alone
            pass
