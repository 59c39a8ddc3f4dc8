"""The `redraft` command's entry point: light to import, so that Ctrl-C while the libraries load
(torch, transformers: a second or two) ends with one line and exit code 130, not a traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli.app import main as run
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    run()
