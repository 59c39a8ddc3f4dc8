"""Files: atomic writes (a temporary file beside the target, then `os.replace`, so readers never see
half a file), result files whose write errors name them, and the cache directory."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


PACKAGE_DIR = Path(__file__).resolve().parent  # the installed redraft_cli: its data/ is read, never written


def inside_package(path: str | os.PathLike) -> bool:
    """Whether `path` (resolved) is the redraft package folder or lies inside it (its shipped drafters,
    recipes and prompts are data that every run reads, not a workspace)."""
    where = Path(path).expanduser().resolve()
    return where == PACKAGE_DIR or where.is_relative_to(PACKAGE_DIR)


def file_mode() -> int:
    """The mode a new file gets from open() here (0o666 less the umask). safetensors' save_file makes
    its files 0o600, unreadable to the other users of a shared drafter or cache: chmod them to this."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Call `write(tmp_path)`, then move the result onto `path` with `mode` (default: `file_mode()`).
    On any error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """A .safetensors file's bytes, the same on every run: safetensors orders the header's metadata as a
    hash map does (differently from one process to the next), so the header is written again with sorted
    keys (padded with spaces to 8 bytes, as safetensors pads it); the tensor data is unchanged."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + size:]


def remove_temporaries(folder: str | os.PathLike) -> None:
    """Remove the temporaries (`.NAME.tmpPID`, files or folders) that `atomic_write` and the other atomic
    saves leave when their process is killed mid-write. Only while no other process writes in `folder`
    (a lock or the main process of a launch)."""
    for stale in Path(folder).glob(".*.tmp*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def writable_dir(path: str | os.PathLike) -> Path:
    """Create the folder `path` (and its parents) and make and remove an entry in it, so that a later
    write fails here, before the work (read-only, /proc, a file in the way); OSError otherwise."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    os.rmdir(tempfile.mkdtemp(dir=path))
    return path


def cache_dir() -> Path:
    """Where converted models and measurements are cached: $REDRAFT_CACHE (`~` expanded), else
    $XDG_CACHE_HOME/redraft when that is an absolute path (the XDG rule), else ~/.cache/redraft."""
    if os.environ.get("REDRAFT_CACHE"):
        try:
            return Path(os.environ["REDRAFT_CACHE"]).expanduser()
        except RuntimeError as exc:  # ~nouser/...
            from .errors import BadInputError

            raise BadInputError(f"REDRAFT_CACHE={os.environ['REDRAFT_CACHE']}: {str(exc).rstrip('.')}; set it to a "
                                f"folder path") from exc
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return Path(xdg if os.path.isabs(xdg) else os.path.expanduser("~/.cache")) / "redraft"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a result file; an OSError always names it (a full disk, by itself, does not)."""
    path = Path(path)
    try:
        path.write_text(text)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    return path
