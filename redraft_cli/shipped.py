"""Drafters that ship inside the package, found by target alias."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .drafter import CONFIG_NAME
from .errors import BadInputError


def shipped_drafter_dir(model: str) -> Path | None:
    """The packaged drafter for `model` (an alias such as smollm2-135m), if there is one; a path or a
    hub id (which holds a separator) never names one."""
    if model is not None and not isinstance(model, str):
        raise BadInputError(f"shipped_drafter_dir takes a model name (a str such as target.name), got "
                            f"{type(model).__name__}")
    if not model or Path(model).name != model or model in (".", ".."):
        return None
    ref = resources.files("redraft_cli") / "data" / "drafters" / model
    path = Path(str(ref))
    return path if (path / CONFIG_NAME).is_file() else None
