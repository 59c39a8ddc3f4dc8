"""Where a recipe's distillation data lives, and how a new data folder starts from data made before:
the data shipped in the package (`seed_from_package`) or an earlier folder whose prompt list this one
extends (`seed_from_earlier`). Folders are keyed by everything that makes their data (`default_data_dir`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from ..files import atomic_write, cache_dir
from .data import FORMAT_VERSION, GenerationConfig, conversations_sha256, read_manifest
from .recipe import Recipe


def shipped_data(name: str) -> Path:
    """The package's directory of distillation data `name` (it may not exist)."""
    return Path(str(resources.files("redraft_cli") / "data" / "distill" / name))


def settings_key(settings: Any) -> str:
    """A short stable name for a data set's settings (JSON-able)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def default_data_dir(recipe: Recipe, model_name: str, convs: list[list[str]], gen_cfg: GenerationConfig) -> Path:
    """Data is cached per (recipe, model, generation settings, prompts) and shared by all runs of them."""
    key = settings_key({"model": model_name, "gen": gen_cfg.fingerprint(), "convs": conversations_sha256(convs)})
    return cache_dir() / "distill-data" / f"{recipe.name}-{key}"


def _answered_prefix(theirs: dict | None, convs: list[list[str]], gen_cfg: GenerationConfig) -> int:
    """How many of `convs` (its first ones) the data folder of manifest `theirs` answers with gen_cfg's
    settings: its conversation count when they are `convs`' first ones, else 0."""
    if theirs is None or theirs.get("config") != json.loads(json.dumps(gen_cfg.fingerprint())):
        return 0  # other settings (--max-new-tokens, ...)
    count = int(theirs.get("num_conversations", -1))
    if not 0 < count <= len(convs) or theirs.get("conversations_sha256") != conversations_sha256(convs[:count]):
        return 0  # other prompts (--data)
    return count


def _copy_shards(source: Path, data_dir: Path, manifest: dict, shards: list[dict], link: bool = False) -> None:
    """Put `shards` of data folder `source` into data_dir with `manifest` (listing them) written last.
    link=True: hard links where the file system allows (shards are replaced whole, never written in place)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        dst = data_dir / shard["file"]
        dst.unlink(missing_ok=True)
        _place(source / shard["file"], dst, link)
    text = json.dumps(manifest, indent=2) + "\n"  # (as data.py writes manifests)
    atomic_write(data_dir / "manifest.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def seed_from_package(name: str, data_dir: Path, convs: list[list[str]], gen_cfg: GenerationConfig) -> None:
    """Copy the data shipped in the package for recipe `name` into data_dir when it holds more shards
    and answers the same conversations (`convs` start with its own) with the same generation settings."""
    shipped = shipped_data(name)
    ours, theirs = read_manifest(data_dir), read_manifest(shipped)
    if not _answered_prefix(theirs, convs, gen_cfg):
        return  # (the run generates its own)
    if ours is not None and (len(ours["shards"]) >= len(theirs["shards"]) or ours.get("config") != theirs.get("config")
                             or ours.get("conversations_sha256") != theirs.get("conversations_sha256")):
        return
    _copy_shards(shipped, data_dir, theirs, [sh for sh in theirs["shards"] if sh.get("file")])


def seed_from_earlier(name: str, data_dir: Path, convs: list[list[str]], gen_cfg: GenerationConfig,
                      model: str) -> tuple[str, int]:
    """A grown prompt list (prompts added at the end of a file): its data folder is new (the folder's
    key covers every prompt), so start it from the earlier folder of recipe `name` that answers most of
    this list's first conversations, with the same model and generation settings. Linked (copied where
    links fail), so that nothing is made twice:
    - its whole shards, with a manifest that lists them; `generate_dataset` then answers only the rest
      (`data._extend_prompts`; a last shard of fewer conversations is answered again, with the new ones);
    - its subfolders whole: the hidden-state caches (chunks are found by their examples, so those of the
      unchanged first conversations are used again), the sampled answers (extended as the greedy ones)
      and the prompts the target wrote with their answers (they depend on the settings, not on the list).
    Every file there is replaced whole when it changes, never written in place, so the earlier folder
    stays as it was. Returns the folder used ("" for none) and how many answers were kept."""
    if read_manifest(data_dir) is not None:
        return "", 0
    best: tuple[int, Path, dict] | None = None
    for folder in data_dir.parent.glob(f"{name}-*"):
        theirs = read_manifest(folder) if folder.is_dir() and folder != data_dir else None
        count = _answered_prefix(theirs, convs, gen_cfg)
        if not count or count == len(convs) or theirs.get("model") != model or theirs.get("version") != FORMAT_VERSION:
            continue
        if best is None or count > best[0]:
            best = (count, folder, theirs)
    if best is None:
        return "", 0
    count, folder, theirs = best
    whole = count // gen_cfg.shard_size  # (a last shard of fewer conversations changes in the grown list)
    shards = [sh for sh in theirs["shards"] if int(sh["index"]) < whole and sh.get("file") and (folder / sh["file"]).is_file()]
    subfolders = [sub for sub in folder.iterdir() if sub.is_dir() and not sub.is_symlink() and not sub.name.startswith(".")]
    if not shards and not subfolders:
        return "", 0
    for sub in subfolders:
        _link_tree(sub, data_dir / sub.name)
    _copy_shards(folder, data_dir, {**theirs, "shards": shards, "complete": False}, shards, link=True)
    return str(folder), sum(int(sh["conversations"]) + int(sh["skipped"]) for sh in shards)


def reused_note(folder: str, kept: int, shard_size: int) -> str:
    """What `seed_from_earlier` kept of `folder`: answers (in whole shards), and what its subfolders hold."""
    if kept:
        return (f"the prompts start with those of {folder}: its answers to the first {kept} prompts are kept, and only the "
                f"rest are answered")
    return (f"the prompts start with those of {folder}: what it made besides its answers (hidden states, sampled "
            f"answers, prompts the target wrote) is used where it still fits; its answers are made again, as they "
            f"fill no whole shard of {shard_size} conversations (data.shard_size)")


def _link_tree(source: Path, dest: Path) -> None:
    """Hard-link (copy where links fail) every file under `source` into `dest`, but the temporaries of a
    write in progress and the lock files of a run (`.NAME`)."""
    for path in source.rglob("*"):
        rel = path.relative_to(source)
        if any(part.startswith(".") for part in rel.parts) or path.is_symlink() or not path.is_file():
            continue
        if not (dest / rel).exists():  # (else linked by a run stopped before the manifest was written)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            _place(path, dest / rel, link=True)


def _place(src: Path, dst: Path, link: bool) -> None:
    """`dst` as a hard link to `src` (link=True, where the file system allows), else an atomic copy."""
    try:
        if not link:
            raise OSError
        os.link(src, dst)
    except OSError:
        atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
