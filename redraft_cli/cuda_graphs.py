"""CUDA graphs of the lean target pass: captured once per shape, replayed at every step.

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
batch rows and the bucket: a new generation whose cache lands on the same
memory replays the old graphs. The graphs hold no reference to a cache;
per-pass tensors they read (row ids, aranges) are made inside the capture.
What cannot be captured (a host read inside the model, such as dynamic
RoPE's) turns graphs off for the target and the pass runs eagerly, with the
reason in `GraphedForward.failed`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

# Node counts a graph is captured for; a pass of more tokens (a prompt) runs eagerly.
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128)
MAX_GRAPHS = 48  # least recently used graphs past this are dropped (each holds its own activation memory)


def graph_capacity(slots: int, step: int = 256) -> int:
    """Cache slots rounded up to a multiple of `step`: generations of similar lengths get caches of
    one shape, which the allocator tends to place at the same address, so their graphs are reused."""
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


class GraphedForward:
    """Runs `lean.forward` through CUDA graphs: __call__(ids, positions, cache, tree_mask, valid)
    -> hidden (B, n, H), or None where the pass must run eagerly (too many tokens, too little room
    in the cache, or graphs failed). capture=False runs the same padded, full-span pass without a
    graph (for tests on the CPU, and to tell a graph's effect from the padding's)."""

    def __init__(self, lean: Any, capture: bool = True) -> None:
        self.lean = lean
        self.capture = capture
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.failed: str | None = None
        self.passes = 0  # passes run through this object (`prepare`'s placeholders included)
        self.captures = 0

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, cache: Any, tree_mask: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.failed is not None:
            return None
        B, n = ids.shape
        nb = bucket(n)
        if nb is None or cache.get_seq_length() + nb > cache.capacity:
            return None
        key = self._key(cache, B, nb)
        g = self.graphs.pop(key, None) or _Graph(B, nb, ids.device)
        self.graphs[key] = g  # most recently used last
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        g.fill(ids, positions, tree_mask, cache.lengths)
        self.passes += 1
        if not self.capture:
            g.out = self.lean.forward(g.ids, g.positions, cache, g.mask, lengths=g.lengths)
        elif g.graph is None:
            try:
                self._capture(g, cache)
            except Exception as e:  # noqa: BLE001 - anything the capture meets turns graphs off, not decoding
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                self.graphs.clear()
                return None
        else:
            g.graph.replay()
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

    def _capture(self, g: _Graph, cache: Any) -> None:
        """Warm up on a side stream (lazy initialisations must not be captured), capture, replay once.
        The warm-up passes write the same cache slots as the replay: those beyond the committed lengths."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.lean.forward(g.ids, g.positions, cache, g.mask, lengths=g.lengths)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.lean.forward(g.ids, g.positions, cache, g.mask, lengths=g.lengths)
        g.graph, g.out = graph, out
        self.captures += 1
        graph.replay()
