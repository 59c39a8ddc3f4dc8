"""File helpers: the cache directory and result files (files.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from redraft_cli.files import cache_dir, safetensors_bytes, write_text


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


def test_safetensors_bytes_are_the_same_on_every_save(tmp_path):
    """safetensors writes a header's metadata in hash-map order, which changes from one save to the next
    (4 of 5 saves differed here); the bytes redraft writes do not, and safetensors still reads them."""
    import torch
    from safetensors import safe_open

    tensors = {"b": torch.arange(6, dtype=torch.int16), "a": torch.ones(3, 2)}
    meta = {f"key{i}": str(i) for i in range(8)}
    saves = {safetensors_bytes(tensors, meta) for _ in range(8)}
    assert len(saves) == 1
    path = tmp_path / "t.safetensors"
    path.write_bytes(saves.pop())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta
        assert torch.equal(f.get_tensor("b"), tensors["b"]) and torch.equal(f.get_tensor("a"), tensors["a"])
