"""Environment switches (REDRAFT_GENERIC, REDRAFT_CUDA_GRAPHS, REDRAFT_CUDA_EXACT), read one way."""

from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")
ON = ("1", "true", "yes", "on")


def env_flag(name: str, default: bool) -> bool:
    """A switch: unset or empty gives `default`; 0/false/no/off (any case) False; 1/true/yes/on
    True; any other value counts as set (True)."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in OFF
