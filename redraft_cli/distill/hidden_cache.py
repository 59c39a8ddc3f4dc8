"""Cache the target's hidden states of the distillation data on disk (small targets).

Training needs h_t, the target's post-norm last hidden state, at every
position of every sequence. Computing it costs one target forward per
sequence per epoch, which dominates training for a small drafter; for a
small target it pays to compute it once and store it. For SmolLM2-135M
(H = 576) in bfloat16 that is 1.15 kB a token: ~0.7 GB for 600k tokens.

On disk (`cache_dir`): `hidden-00000-<fingerprint>.safetensors`, ... each
holding `hidden` (tokens, H) bfloat16 for a chunk of examples concatenated,
and `offsets` (n+1,) int64, plus `manifest.json` (model, and the file of
each chunk fingerprint done: `files`). A chunk's file is named by its
examples, so a short run's partial last chunk and a full run's whole one
live side by side and neither recomputes the other's. With `greedy=True` (sampled answers) a chunk also holds
`greedy` (tokens,) int32: at position j the target's argmax given tokens
< j, taken from the float hidden state before it is stored (position 0
keeps its own token), so training can label sampled text with the tokens
greedy decoding would accept. Chunks are written atomically; a rerun resumes, and a data
set that grew computes only its new chunks. A chunk interrupted by Ctrl-C (a chunk of
256 conversations takes ~100 s on a 2-core CPU) keeps its finished batches in
`hidden-<chunk>-<fingerprint>.partial.safetensors` (`done`: how many batches), and the
rerun starts at the next batch, with the same batches, so the chunk comes out the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from ..errors import BadInputError
from ..files import atomic_write, remove_temporaries
from ..target import Target
from .launch import Launch

MANIFEST = "manifest.json"


class DamagedChunk(BadInputError):
    """A recorded chunk file that does not load (a full disk, a bad copy); `forget` drops it so that
    build_hidden_cache computes it again."""

    def __init__(self, path: Path, exc: Exception) -> None:
        super().__init__(f"hidden-state chunk {path} is damaged ({' '.join(str(exc).split())[:200]}); delete it to "
                         f"compute it again")
        self.path = path

    def forget(self) -> None:
        manifest = _read(self.path.parent)
        self.path.unlink(missing_ok=True)
        if manifest is not None:
            manifest["files"] = {fp: n for fp, n in _files(manifest).items() if n != self.path.name}
            manifest["chunks"] = {c: fp for c, fp in manifest.get("chunks", {}).items() if fp in manifest["files"]}
            _write(self.path.parent, manifest)


def data_fingerprint(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(int(e["conv_index"]).to_bytes(8, "little"))
        h.update(e["input_ids"].to(torch.int32).numpy().tobytes())
    return h.hexdigest()


def _chunks(examples: list[dict], chunk_size: int) -> list[tuple[int, list[dict], str]]:
    """(index, examples, fingerprint) per chunk of `chunk_size` consecutive examples."""
    return [(c, examples[i : i + chunk_size], data_fingerprint(examples[i : i + chunk_size]))
            for c, i in enumerate(range(0, len(examples), chunk_size))]


@torch.no_grad()
def build_hidden_cache(target: Target, examples: list[dict], cache_dir: Path, batch_size: int = 8,
                       chunk_size: int = 256, dtype: torch.dtype = torch.bfloat16,
                       progress: Callable[[int, int], None] | None = None, greedy: bool = False,
                       launch: Launch | None = None) -> None:
    """Compute and store the hidden states of `examples` (in order), resuming finished chunks;
    with greedy=True also the target's greedy token at every position (see the module docstring).

    Each chunk is keyed by the fingerprint of its own examples, so a data set
    that grew (more shards generated) reuses every full chunk already stored
    and computes only the new ones. Under a launch of several processes
    (launch.py) chunk c is computed by process c % N, and the main process
    records them all in the manifest once every process is done.
    """
    launch = launch or Launch()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if launch.is_main:  # a run killed mid-save (the data folder's lock keeps other runs out)
        remove_temporaries(cache_dir)
    launch.barrier()  # (before any process writes new ones)
    manifest = _manifest(cache_dir, target.name, chunk_size, dtype, greedy)
    files = _files(manifest)
    chunks = _chunks(examples, chunk_size)
    for c, chunk, fp in launch.share(chunks):
        if fp in files and (cache_dir / files[fp]).is_file():
            continue
        name = _chunk_name(c, fp)
        if _made(cache_dir / name, greedy):  # by a launch that stopped before its main process recorded it
            if launch.world == 1:
                _record(cache_dir, manifest, files, c, fp, name)
            continue
        # Similar lengths together: less padding.
        order = sorted(range(len(chunk)), key=lambda i: int(chunk[i]["input_ids"].numel()))
        out: list[torch.Tensor | None] = [None] * len(chunk)
        labels: list[torch.Tensor | None] = [None] * len(chunk)
        partial = cache_dir / name.replace(".safetensors", ".partial.safetensors")
        start = _resume_partial(partial, order, batch_size, out, labels, greedy)
        try:
            for b in range(start, len(order), batch_size):
                idx = order[b : b + batch_size]
                lengths = [int(chunk[i]["input_ids"].numel()) for i in idx]
                ids = torch.zeros(len(idx), max(lengths), dtype=torch.long)
                attn = torch.zeros_like(ids)
                for r, i in enumerate(idx):
                    ids[r, : lengths[r]] = chunk[i]["input_ids"]
                    attn[r, : lengths[r]] = 1
                hidden = target.base(input_ids=ids.to(target.device), attention_mask=attn.to(target.device),
                                     use_cache=False).last_hidden_state
                for r, i in enumerate(idx):
                    out[i] = hidden[r, : lengths[r]].to(dtype).cpu()
                    if greedy:  # one row at a time: (T, V) float logits
                        nxt = target.logits(hidden[r, : lengths[r] - 1]).argmax(-1).cpu()
                        labels[i] = torch.cat([chunk[i]["input_ids"][:1], nxt]).to(torch.int32)
                if progress is not None:
                    progress(c * chunk_size + b + len(idx), len(examples))
        except KeyboardInterrupt:
            _save_partial(partial, order, batch_size, out, labels, greedy)
            raise
        _save(cache_dir / name, out, labels, greedy)
        partial.unlink(missing_ok=True)
        if launch.world == 1:
            _record(cache_dir, manifest, files, c, fp, name)
    if launch.world > 1:
        launch.barrier()
        if launch.is_main:  # every process's chunks, by their names
            for c, _, fp in chunks:
                name = _chunk_name(c, fp)
                if fp not in files and _made(cache_dir / name, greedy):
                    _record(cache_dir, manifest, files, c, fp, name)
        launch.barrier()


def _chunk_name(c: int, fp: str) -> str:
    return f"hidden-{c:05d}-{fp[:16]}.safetensors"


def _made(path: Path, greedy: bool) -> bool:
    """Whether `path` is a finished chunk file of this layout (with greedy labels or without)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # a damaged file: the chunk is computed again (and the file replaced)
        return False
    return {"hidden", "offsets"} <= keys and ("greedy" in keys) == greedy


def _record(cache_dir: Path, manifest: dict, files: dict[str, str], c: int, fp: str, name: str) -> None:
    """Add chunk c (fingerprint fp, file name) to the manifest and write it."""
    manifest["chunks"][str(c)] = fp
    files[fp] = name
    manifest["files"] = files
    _write(cache_dir, manifest)


def _save(path: Path, out: list, labels: list, greedy: bool, extra: dict | None = None) -> None:
    """Write the examples' states that are not None, in order, atomically."""
    from safetensors.torch import save_file

    states = [t for t in out if t is not None]
    tensors = {"hidden": torch.cat(states).contiguous(), "offsets": torch.tensor([0] + [t.shape[0] for t in states]).cumsum(0)}
    if greedy:
        tensors["greedy"] = torch.cat([t for t in labels if t is not None]).contiguous()
    atomic_write(path, lambda tmp: save_file({**tensors, **(extra or {})}, tmp))


def _save_partial(path: Path, order: list[int], batch_size: int, out: list, labels: list, greedy: bool) -> None:
    """The finished batches of an interrupted chunk: states in `order`, and how many examples."""
    done = 0
    while done < len(order) and out[order[done]] is not None and (not greedy or labels[order[done]] is not None):
        done += 1
    if done < len(order):
        done -= done % batch_size  # whole batches only (Ctrl-C may land between a batch's rows)
    if done:
        _save(path, [out[i] for i in order[:done]], [labels[i] for i in order[:done]], greedy,
              {"done": torch.tensor([done])})


def _resume_partial(path: Path, order: list[int], batch_size: int, out: list, labels: list, greedy: bool) -> int:
    """Fill `out` / `labels` from an interrupted chunk's partial file; returns the position in `order`
    to go on from (0 when there is none, or it does not fit: it is then recomputed)."""
    from safetensors.torch import load_file

    if not path.is_file():
        return 0
    try:
        t = load_file(str(path))
        done = int(t["done"][0])
        offs = t["offsets"].tolist()
        whole = done == len(order) or done % batch_size == 0
        if not whole or not 0 < done <= len(order) or len(offs) != done + 1 or ("greedy" in t) != greedy:
            return 0
        for j, i in enumerate(order[:done]):
            out[i] = t["hidden"][offs[j] : offs[j + 1]]
            if greedy:
                labels[i] = t["greedy"][offs[j] : offs[j + 1]]
        return done
    except Exception:  # a damaged partial file (e.g. a full disk): compute the chunk again
        for i in order:
            out[i] = labels[i] = None
        return 0


def attach_hidden(examples: list[dict], cache_dir: Path, model_name: str) -> None:
    """Add `hidden` (T, H) (and `greedy` (T,) int64 when cached) to every example from the cache;
    BadInputError if any chunk does not match."""
    from safetensors.torch import load_file

    manifest = _read(Path(cache_dir))
    if manifest is None or manifest.get("version") != 2 or manifest.get("model") != model_name:
        raise BadInputError(f"hidden-state cache {cache_dir} does not match this data; delete it to rebuild")
    files = _files(manifest)
    for c, chunk, fp in _chunks(examples, manifest["chunk_size"]):
        if fp not in files or not (Path(cache_dir) / files[fp]).is_file():
            raise BadInputError(f"hidden-state cache {cache_dir} does not match this data; delete it to rebuild")
        path = Path(cache_dir) / files[fp]
        try:
            t = load_file(str(path))
            offs = t["offsets"].tolist()
            if (len(offs) != len(chunk) + 1 or offs[0] != 0 or offs[-1] != t["hidden"].shape[0]
                    or any(offs[j + 1] - offs[j] != int(e["input_ids"].numel()) for j, e in enumerate(chunk))):
                raise ValueError("its offsets do not fit its examples")
        except Exception as exc:  # truncated, garbled, keys missing: computed again by the caller
            raise DamagedChunk(path, exc) from exc
        for j, e in enumerate(chunk):
            e["hidden"] = t["hidden"][offs[j] : offs[j + 1]]
            if "greedy" in t:
                e["greedy"] = t["greedy"][offs[j] : offs[j + 1]].long()


def is_cached(examples: list[dict], cache_dir: Path, model_name: str, chunk_size: int = 256,
              dtype: torch.dtype = torch.bfloat16, greedy: bool = False) -> bool:
    """Whether build_hidden_cache with these arguments would compute nothing."""
    cache_dir = Path(cache_dir)
    files = _files(_manifest(cache_dir, model_name, chunk_size, dtype, greedy))
    return all(fp in files and (cache_dir / files[fp]).is_file() for _, _, fp in _chunks(examples, chunk_size))


def _manifest(cache_dir: Path, model_name: str, chunk_size: int, dtype: torch.dtype, greedy: bool) -> dict:
    """The cache's manifest, or a fresh one where it holds states of another model, layout or dtype."""
    fresh = {"version": 2, "model": model_name, "chunk_size": chunk_size,
             "dtype": str(dtype).replace("torch.", ""), "greedy": greedy, "chunks": {}}
    manifest = _read(cache_dir)
    if manifest is None or any(manifest.get(k, False) != fresh[k] for k in ("version", "model", "chunk_size", "dtype", "greedy")):
        return fresh
    return manifest


def _files(manifest: dict) -> dict[str, str]:
    """Chunk fingerprint -> file name. Caches written before `files` existed named their one
    file per chunk index (`hidden-00000.safetensors`), recorded in `chunks`."""
    if "files" in manifest:
        return dict(manifest["files"])
    return {fp: f"hidden-{int(c):05d}.safetensors" for c, fp in manifest.get("chunks", {}).items()}


def _read(cache_dir: Path) -> dict | None:
    """The manifest, or None when there is none or it is unreadable (the chunks' files are found by
    their names and recorded again)."""
    p = cache_dir / MANIFEST
    try:
        manifest = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
    except (OSError, ValueError):
        return None
    ok = isinstance(manifest, dict) and isinstance(manifest.get("chunks", {}), dict) and isinstance(manifest.get("files", {}), dict)
    return manifest if ok else None


def _write(cache_dir: Path, manifest: dict) -> None:
    atomic_write(cache_dir / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest)))
