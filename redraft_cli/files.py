"""Files: atomic writes (a temporary file beside the target, then `os.replace`, so readers never see
half a file) and the cache directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Call `write(tmp_path)`, then move the result onto `path` (chmod `mode` first when given).
    On any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def cache_dir() -> Path:
    """Where converted models and measurements are cached: $REDRAFT_CACHE or ~/.cache/redraft."""
    root = os.environ.get("REDRAFT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "redraft"
    )
    return Path(root)
