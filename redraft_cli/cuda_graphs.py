"""CUDA graphs of the lean target pass and of the drafter's beam search: captured once per shape,
replayed at every step.

On a GPU a small target's pass is bound by the host, not by arithmetic: the
lean pass launches ~1,300 kernels, and on the H200 lent in session 14 a
9-node tree pass cost less than a one-token step (docs/performance.md, "On
a GPU"). A CUDA graph records the launches of one pass and replays them
with one call. A graph fixes every shape and address, so the graphed pass
(`LeanLlama.forward(..., lengths=...)`) differs from the eager one in three
ways:

- n new tokens per row are padded to a bucket (`BUCKETS`): padding nodes
  carry token 0 at the last real position and attend to themselves only,
  as `tree_attention.pack_tree`'s padding does; their keys go to slots past
  the real nodes, which the mask hides and later passes overwrite.
- Attention spans every slot of the cache, and the committed lengths come
  from a device buffer, so one graph serves every step of a generation.
- Padding cells of a batched tree (`valid` False) are computed, not
  skipped, and zeroed afterwards.

Worked example, one row, a tree of 9 nodes after 40 committed tokens:
bucket 12; the graph's inputs are ids (1, 12) = 9 tree tokens + 3 zeros,
positions (1, 12) = the tree's + 3 copies of its last, mask (1, 12, 12) =
the tree mask with 1s on the diagonal of rows 9-11, lengths (1,) = [40];
replay writes keys at slots 40-51 and returns hidden (1, 12, H), of which
the caller gets (1, 9, H).

A graph is keyed by the cache's buffers (their addresses and shapes), the
batch rows and the bucket. Caches come from `new_cache`, which hands a new
generation the buffers of a finished cache of the same shape, so its steps
replay the graphs captured for them (capacities are rounded up,
`graph_capacity`, so that generations of similar lengths share a shape).
The graphs hold no reference to a cache; per-pass tensors they read (row
ids, aranges) are made inside the capture.
What cannot be captured (a host read inside the model, such as dynamic
RoPE's) turns graphs off for the target and the pass runs eagerly, with the
reason in `GraphedForward.failed`.

The drafter's beam search (`beam_search.search_beams`: L-1 recurrent steps,
top-k, gathers, the node budget's sort) has shapes set by (B, W, L, nodes)
alone, so `GraphedDraft` captures it once per such shape with no padding:
its inputs are h (B, H) and g0 (B,), its outputs the beams before
`trim_to_depth` (a host read, done after the replay).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch

from .beam_search import DraftBeams, search_beams, trim_to_depth
from .env import env_flag

# Node counts a graph is captured for; a pass of more tokens (a prompt) runs eagerly.
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
MAX_POOLED = 3  # cache buffer pairs kept for reuse (least recently handed out dropped first)


def graphs_wanted(device: torch.device) -> bool:
    """CUDA graphs are used on CUDA devices unless REDRAFT_CUDA_GRAPHS=0 (env.env_flag)."""
    return device.type == "cuda" and env_flag("REDRAFT_CUDA_GRAPHS", True)


def capture(fn: Callable[[], Any], pool: Any, stream: Any) -> tuple[Any, Any]:
    """(graph, output) of `fn` recorded on the current CUDA device, on `stream`, after two warm-up
    calls there (lazy initialisations, such as cuBLAS handles or a drafter's cached head, must happen
    outside the capture), and replayed once so the output holds this call's result. The second
    warm-up runs with CUDA's sync debug mode set to error: a host sync inside `fn` (a value read on
    the host, as dynamic RoPE does) would invalidate the capture, so it is found before one starts.
    A capture that recorded nothing (work sent to another device) is an error too.

    pool: the memory pool that all graphs of one owner share. A replay's temporaries may then reuse
    another graph's, which is safe because replays never overlap and each caller copies the output
    out before the next replay; an output itself stays allocated while its graph lives, so no later
    capture reuses it."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*CUDA Graph is empty.*")
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = fn()
    graph.replay()
    return graph, out


class _Recorder:
    """What GraphedForward and GraphedDraft share. Each owner captures on a stream and into a memory
    pool of its own, on the device of its tensors (`torch.cuda.device`: the current device may be
    another one); `failed` keeps why graphs were turned off. Graphs are never dropped one by one:
    they live as long as their owner (dropping a graph can release the cuBLAS workspace that the
    other graphs captured on its stream use)."""

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.failed: str | None = None
        self.captures = 0
        self._stream: Any = None
        self._mempool: Any = None

    def _record(self, fn: Callable[[], Any], device: torch.device) -> tuple[Any, Any] | None:
        """capture(fn) on `device`, or None after setting `failed` (and dropping every graph)."""
        try:
            with torch.cuda.device(device):
                if self._stream is None:
                    self._stream = torch.cuda.Stream(device=device)
                    self._mempool = torch.cuda.graph_pool_handle()
                graph, out = capture(fn, self._mempool, self._stream)
        except Exception as e:  # noqa: BLE001 - anything the capture meets turns graphs off, not decoding
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.graphs.clear()
            return None
        self.captures += 1
        return graph, out

    @staticmethod
    def _replay(graph: Any, device: torch.device) -> None:
        with torch.cuda.device(device):
            graph.replay()


def graph_capacity(slots: int, step: int = 256) -> int:
    """Cache slots rounded up to a multiple of `step`: generations of similar lengths get caches of
    one shape, whose buffers `GraphedForward.new_cache` reuses, and with them their graphs."""
    return -(-slots // step) * step


def bucket(n: int) -> int | None:
    """The smallest bucket holding n tokens, or None when n is larger than every bucket."""
    return next((b for b in BUCKETS if b >= n), None)


class _Graph:
    """The fixed inputs and output of one captured pass: ids, positions (B, nb) int64; mask
    (B, nb, nb) bool; lengths (B,) int64; out (B, nb, H) once captured."""

    def __init__(self, B: int, nb: int, device: torch.device) -> None:
        self.ids = torch.zeros(B, nb, dtype=torch.long, device=device)
        self.positions = torch.zeros(B, nb, dtype=torch.long, device=device)
        self.eye = torch.eye(nb, dtype=torch.bool, device=device).expand(B, nb, nb).contiguous()
        self.mask = self.eye.clone()
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)
        self.graph: Any = None
        self.out: torch.Tensor | None = None

    def fill(self, ids: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor, lengths: torch.Tensor) -> None:
        """Copy one pass's inputs (B, n), (B, n), (B, n, n), (B,) into the fixed buffers, padded."""
        n = ids.shape[1]
        self.ids[:, :n].copy_(ids)
        self.ids[:, n:].zero_()
        self.positions[:, :n].copy_(positions)
        self.positions[:, n:].copy_(positions[:, -1:].expand(-1, self.positions.shape[1] - n))
        self.mask.copy_(self.eye)
        self.mask[:, :n, :n].copy_(tree_mask)
        self.lengths.copy_(lengths)


class GraphedForward(_Recorder):
    """Runs `lean.forward` through CUDA graphs: __call__(ids, positions, cache, tree_mask, valid)
    -> hidden (B, n, H), or None where the pass must run eagerly (too many tokens, too little room
    in the cache, or graphs failed). capture=False runs the same padded, full-span pass without a
    graph (for tests on the CPU, and to tell a graph's effect from the padding's)."""

    def __init__(self, lean: Any, capture: bool = True) -> None:
        super().__init__(capture)
        self.lean = lean
        self.graphs: dict[tuple, _Graph] = {}
        self.passes = 0  # passes run through this object (`prepare`'s placeholders included)
        self._prepared: tuple | None = None  # what `prepare` last covered: (key of its top bucket, all fitted)
        # [keys, values, weakref to the cache that holds them] per buffer pair, most recently handed out last
        self._pool: list[list[Any]] = []

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> Any:
        """A StaticKVCache (lean_llama) on the buffers of a finished cache of the same shape when there
        is one, so that graphs captured on them replay; else on new buffers, kept for later caches.
        Up to MAX_POOLED buffer pairs stay allocated after their caches finish (for a 7B model with
        an 8k context, about 1 GB each)."""
        if self.failed is not None:  # no graphs to replay: nothing to keep buffers for
            return self.lean.new_cache(batch, capacity, dtype, device)
        shape = (len(self.lean.layers), batch, self.lean.kv_heads, capacity, self.lean.head_dim)
        for i, (keys, values, owner) in enumerate(self._pool):
            if owner() is None and tuple(keys.shape) == shape and keys.dtype == dtype and keys.device == device:
                cache = self.lean.new_cache(batch, capacity, dtype, device, buffers=(keys, values))
                del self._pool[i]
                self._pool.append([keys, values, weakref.ref(cache)])
                return cache
        cache = self.lean.new_cache(batch, capacity, dtype, device)
        self._pool.append([cache._keys, cache._values, weakref.ref(cache)])
        free = [i for i, entry in enumerate(self._pool) if entry[2]() is None]
        drop = set(free[: max(0, len(self._pool) - MAX_POOLED)])  # the least recently handed out free pairs
        self._pool = [entry for i, entry in enumerate(self._pool) if i not in drop]
        return cache

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, tree_mask: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.failed is not None:
            return None
        B, n = ids.shape
        nb = bucket(n)
        if nb is None or cache.get_seq_length() + nb > cache.capacity:
            return None
        key = self._key(cache, B, nb)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = _Graph(B, nb, ids.device)
        g.fill(ids, positions, tree_mask, cache.lengths)
        self.passes += 1
        if not self.capture:
            g.out = self.lean.forward(g.ids, g.positions, cache, g.mask, lengths=g.lengths)
        elif g.graph is None:
            recorded = self._record(lambda: self.lean.forward(g.ids, g.positions, cache, g.mask, lengths=g.lengths),
                                    ids.device)
            if recorded is None:
                return None
            g.graph, g.out = recorded  # its warm-up passes wrote the slots the replay writes: past the lengths
        else:
            self._replay(g.graph, ids.device)
        out = g.out[:, :n].clone()
        if valid is not None:
            out.masked_fill_(~valid.unsqueeze(-1), 0)
        return out

    def prepare(self, cache: Any, nodes: int) -> None:
        """Capture, for this cache and its rows, every bucket up to the one holding `nodes` tokens
        that is not captured yet (and fits the cache), so that no capture falls inside a generation's
        timed steps. The inputs are placeholders: a chain of token 0 after each row's committed tokens,
        whose keys land in slots that the mask hides and the first real pass overwrites."""
        top = bucket(min(nodes, BUCKETS[-1]))
        B, dev = cache.lengths.numel(), cache.lengths.device
        done = (self._key(cache, B, top), cache.get_seq_length() + top <= cache.capacity)
        if done == self._prepared:  # the same rows as at the last step: nothing new to capture
            return
        self._prepared = done
        for nb in BUCKETS:
            if nb > top or self.failed is not None or cache.get_seq_length() + nb > cache.capacity:
                break
            if self._key(cache, B, nb) in self.graphs:
                continue
            positions = cache.lengths.unsqueeze(1) + torch.arange(nb, device=dev)
            chain = torch.ones(B, nb, nb, dtype=torch.bool, device=dev).tril()
            self(torch.zeros(B, nb, dtype=torch.long, device=dev), positions, cache, chain)

    @staticmethod
    def _key(cache: Any, B: int, nb: int) -> tuple:
        return (cache._keys.data_ptr(), cache._values.data_ptr(), tuple(cache._keys.shape), B, nb)



class GraphedDraft(_Recorder):
    """Runs `search_beams` for one drafter through CUDA graphs, one per (B, W, L, nodes, h's dtype):
    __call__(h (B, H), g0 (B,), W, L, nodes) -> DraftBeams, or None where the search must run eagerly
    (L = 1, or graphs failed: `failed` says why). capture=False runs the same fixed-shape path
    without a graph (tests on the CPU)."""

    def __init__(self, drafter: Any, capture: bool = True) -> None:
        super().__init__(capture)
        self.drafter = drafter
        self.graphs: dict[tuple, tuple[Any, torch.Tensor, torch.Tensor, DraftBeams]] = {}

    def __call__(self, h: torch.Tensor, g0: torch.Tensor, W: int, L: int, nodes: int = 0) -> DraftBeams | None:
        if self.failed is not None or L < 2:
            return None
        if not self.capture:
            beams = search_beams(self.drafter, h.clone(), g0.clone(), W, L, nodes)
            return trim_to_depth(beams) if nodes else beams
        d = self.drafter
        # A graph reads these tensors' memory: the target's embedding and head, the draft vocabulary and
        # the drafter's own weights (moved or cast after a capture, they live elsewhere).
        wiring = tuple((t.data_ptr(), t._version) if t is not None else None
                       for t in (d._embed, d._head, d.draft_vocab, *d.parameters()))
        key = (tuple(h.shape), h.dtype, W, L, nodes, wiring)
        entry = self.graphs.get(key)
        if entry is None:
            h_in, g0_in = h.clone(), g0.clone()
            recorded = self._record(lambda: search_beams(self.drafter, h_in, g0_in, W, L, nodes), h.device)
            if recorded is None:
                return None
            entry = self.graphs[key] = (recorded[0], h_in, g0_in, recorded[1])
        else:
            entry[1].copy_(h)
            entry[2].copy_(g0)
            self._replay(entry[0], h.device)
        beams = DraftBeams(entry[3].tokens.clone(), entry[3].logprobs.clone())
        return trim_to_depth(beams) if nodes else beams
