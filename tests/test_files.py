"""File helpers: the cache directory and result files (files.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from redraft_cli.files import cache_dir, write_text


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("REDRAFT_CACHE", "~/somewhere")
    assert cache_dir() == Path(os.path.expanduser("~/somewhere"))  # ~ expanded, not a folder named "~"
    monkeypatch.delenv("REDRAFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "redraft"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG rule: relative paths are ignored
    assert cache_dir() == Path(os.path.expanduser("~/.cache")) / "redraft"


def test_write_text_errors_name_the_file(tmp_path):
    assert write_text(tmp_path / "r.json", "{}").read_text() == "{}"
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    with pytest.raises(OSError) as exc:
        write_text("/dev/full", "x" * 10)
    assert exc.value.filename == "/dev/full"
