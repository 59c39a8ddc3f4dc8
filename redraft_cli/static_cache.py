"""A preallocated KV cache with one length per row, for tree decoding in batches.

Layout: `keys`, `values` of shape (layers, B, kv_heads, capacity, head_dim),
allocated once per generation; `lengths` (B,) int64 counts the committed
tokens of each row. Row b's committed tokens sit in slots 0..lengths[b]-1,
so rows of different lengths need no padding inside the prefix.

A forward over n new tokens per row writes them at slots lengths[b] + i
(`slots`), attends with `attention_mask`, and leaves `lengths` alone: the
nodes are only tentative. `commit` then moves each row's accepted path to
consecutive slots and advances its length. Worked example, one row,
lengths = [4], n = 6 tree nodes, accepted path = nodes [0, 4, 5]:

    after the forward: [c0 c1 c2 c3 | n0 n1 n2 n3 n4 n5 ...]   lengths = [4]
    after commit:      [c0 c1 c2 c3 | n0 n4 n5 n3 n4 n5 ...]   lengths = [7]

Slots past a row's length hold stale values that the mask hides and the
next forward overwrites; nothing is reallocated or concatenated while the
rows stay the same.

Continuous batching changes the rows: finished rows leave (`keep`) and
prefilled ones join (`append`). The buffers keep their rows once allocated
(`reserved` >= B; the batch is the first B), so a row that leaves frees its
place and a row that joins is copied into a free place: only the rows that
move or join are copied, never the whole cache, and no second buffer is
allocated beside it. Worked example, reserved 4, rows [a b c d]:

    keep([0, 2, 3])   -> [a c d | d]   c and d move up; place 3 is free (stale)
    append([e])       -> [a c d e]     e is copied into place 3
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """keys, values: (layers, B, kv_heads, capacity, head_dim) views of buffers with
    `reserved` >= B rows; lengths: (B,) int64."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device,
                 buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """buffers: keys and values of that shape to reuse (a finished cache's: their stale slots
        are never read, since every row starts at length 0); default: new zeros."""
        shape = (num_layers, batch, kv_heads, capacity, head_dim)
        if buffers is not None and any(b.shape != shape or b.dtype != dtype for b in buffers):
            raise ValueError(f"cache buffers of shape {tuple(buffers[0].shape)} do not fit {shape}")
        self._keys, self._values = buffers or (torch.zeros(shape, dtype=dtype, device=device),
                                               torch.zeros(shape, dtype=dtype, device=device))
        self._lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._longest: int | None = 0  # max(lengths) on the host; None until asked again (one device sync)
        self.capacity = capacity
        self._rows: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    @lengths.setter
    def lengths(self, value: torch.Tensor) -> None:
        self._lengths = value
        self._longest = None

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, : self.lengths.numel()]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, : self.lengths.numel()]

    @property
    def reserved(self) -> int:
        """Rows the buffers hold: the batch plus the places finished rows freed."""
        return self._keys.shape[1]

    def get_seq_length(self) -> int:
        """The longest row (for callers that expect a Hugging Face cache). Known on the host after
        `advance`, so plain decoding reads no device value per token but its tokens."""
        if self._longest is None:
            self._longest = int(self.lengths.max()) if self.lengths.numel() else 0
        return self._longest

    def slots(self, n: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) slots where the next n tokens of each row go: lengths[b] + i (`lengths` in
        place of the cache's own: a CUDA graph's copy of them, cuda_graphs.py)."""
        lengths = self.lengths if lengths is None else lengths
        return lengths.unsqueeze(1) + torch.arange(n, device=lengths.device)

    def check_room(self, n: int) -> None:
        if self.get_seq_length() + n > self.capacity:
            raise RuntimeError(f"KV cache full: {self.get_seq_length()} + {n} > capacity {self.capacity}")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
              rows: torch.Tensor | None = None) -> None:
        """Store k, v (B, kv_heads, n, head_dim) of `layer` at `slots` (B, n). rows: (B, 1) row
        numbers 0..B-1 (default: this cache's own tensor; a CUDA graph passes one of its own, since
        it may outlive this cache object)."""
        # Advanced indexing writes only the B * n slots; scatter_ with an expanded index copied the
        # whole (B, kv_heads, capacity, head_dim) buffer on CPU: 0.2 ms a layer at 8k slots.
        rows = self._row_ids(k.shape[0]) if rows is None else rows  # (B, 1)
        self.keys[layer][rows, :, slots] = k.transpose(1, 2)  # (B, n, kv_heads, head_dim) blocks
        self.values[layer][rows, :, slots] = v.transpose(1, 2)

    def _row_ids(self, B: int) -> torch.Tensor:
        """(B, 1) row numbers 0..B-1, made once per batch size (one tensor, not one per layer)."""
        if self._rows is None or self._rows.shape[0] != B:
            self._rows = torch.arange(B, device=self.lengths.device).unsqueeze(1)
        return self._rows

    def view(self, layer: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values of `layer` over slots 0..span-1: (B, kv_heads, span, head_dim) views."""
        return self.keys[layer, :, :, :span], self.values[layer, :, :, :span]

    def attention_mask(self, tree_mask: torch.Tensor, lengths: torch.Tensor | None = None,
                       span: int | None = None) -> tuple[torch.Tensor, int]:
        """Boolean mask for a forward of n tokens per row written at `slots(n)`.

        tree_mask: (B, n, n) bool, node a may see node c (ancestor-or-self).
        Returns (mask (B, 1, n, span) bool, span) with span = max(lengths) + n:
        query a of row b sees every committed slot j < lengths[b] and the slots
        lengths[b] + c of its tree ancestors c; nothing else. A CUDA graph
        passes its copy of `lengths` and span = capacity (no host read).
        """
        B, n, _ = tree_mask.shape
        lengths = self.lengths if lengths is None else lengths
        span = self.get_seq_length() + n if span is None else span
        rel = torch.arange(span, device=tree_mask.device).unsqueeze(0) - lengths.unsqueeze(1)  # (B, span)
        committed = (rel < 0).unsqueeze(1)  # (B, 1, span)
        in_tree = ((rel >= 0) & (rel < n)).unsqueeze(1)
        tree_cols = tree_mask.gather(2, rel.clamp(0, n - 1).unsqueeze(1).expand(B, n, span))  # (B, n, span)
        mask = committed | (in_tree & tree_cols)
        return mask.unsqueeze(1), span

    def key_positions(self, positions: torch.Tensor, span: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, span) the position of the key in each slot during a forward of n tokens at `positions`
        (B, n) written at `slots(n)`: a committed slot j holds position j (rows fill from slot 0 and
        commits keep the accepted path consecutive), slot lengths[b] + c node c's position; later
        slots (stale, masked) get the last node's. For sliding-window masks."""
        lengths = self.lengths if lengths is None else lengths
        n = positions.shape[1]
        slot = torch.arange(span, device=positions.device).unsqueeze(0)  # (1, span)
        rel = slot - lengths.unsqueeze(1)  # (B, span)
        return torch.where(rel < 0, slot, positions.gather(1, rel.clamp(0, n - 1)))

    def commit(self, path: torch.Tensor, accepted: torch.Tensor) -> None:
        """Keep each row's accepted path and advance its length.

        path: (B, m) packed node indices, the first accepted[b] of row b are
        kept (g0 first); accepted: (B,) int64 in 1..m. Moves slot
        lengths[b] + path[b, i] to lengths[b] + i for all i < max(accepted)
        in one gather and one scatter over all layers (entries past
        accepted[b] are stale and harmless), then lengths += accepted.
        """
        top = int(accepted.max()) if accepted.numel() else 0
        m = min(path.shape[1], top)
        path = path[:, :m]  # entries past every row's accepted count would only move stale values
        B = path.shape[0]
        src = self.lengths.unsqueeze(1) + path.to(self.lengths.device)  # (B, m)
        if not torch.equal(path, torch.arange(m, device=path.device).expand(B, m)):
            rows = torch.arange(B, device=src.device).unsqueeze(1)  # (B, 1)
            dst = self.slots(m)
            for buf in (self.keys, self.values):  # advanced indexing: (B, m, layers, kv_heads, head_dim) blocks
                buf[:, rows, :, dst] = buf[:, rows, :, src]  # (scatter_ here copied the whole buffer on CPU)
        longest = self._longest
        self.lengths += accepted.to(self.lengths)  # (the setter forgets the longest row)
        if B == 1 and longest is not None:  # one row: its new length is known without another sync
            self._longest = longest + top

    def advance(self, n: int) -> None:
        """Keep every row's n new tokens where the forward wrote them (plain decoding: `commit` of
        the path 0..n-1 with accepted = n for all rows, with no gather and no device sync)."""
        self._lengths += n
        if self._longest is not None:
            self._longest += n

    def truncate(self, n: int) -> None:
        """Keep only the first n committed tokens of a one-row cache (a new prompt that starts
        with them: `Generator`'s reuse_cache). The slots after them become stale."""
        if self.lengths.numel() != 1 or not 0 <= n <= int(self.lengths[0]):
            raise ValueError(f"cannot truncate a cache of lengths {self.lengths.tolist()} to {n}")
        self.lengths = torch.full_like(self.lengths, n)

    def load_prefix(self, other: "StaticKVCache", n: int) -> None:
        """Copy the first n committed slots of one-row `other` (any capacity, same layers and heads)
        into this empty one-row cache: a cache too small for the next prompt, grown."""
        if self.lengths.numel() != 1 or other.lengths.numel() != 1 or n > min(self.capacity, int(other.lengths[0])):
            raise ValueError(f"cannot copy {n} slots of a cache of lengths {other.lengths.tolist()} into one of "
                             f"capacity {self.capacity}")
        self.keys[:, :, :, :n] = other.keys[:, :, :, :n]
        self.values[:, :, :, :n] = other.values[:, :, :, :n]
        self.lengths = torch.full_like(self.lengths, n)

    def put_row(self, row: int, other: "StaticKVCache") -> None:
        """Copy one-row `other`'s committed slots (same layers, heads and capacity) into row `row`,
        whose length becomes other's: a prompt prefilled alone joins a batch's cache."""
        n = int(other.lengths[0])
        self.keys[:, row, :, :n] = other.keys[:, 0, :, :n]
        self.values[:, row, :, :n] = other.values[:, 0, :, :n]
        lengths = self.lengths.clone()
        lengths[row] = n
        self.lengths = lengths

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished rows: keep `rows` (R,) int64, in that order, as rows 0..R-1. Only the
        rows whose place changes are copied; the places after R are free for `append`."""
        rows = rows.to(self.lengths.device)
        place = torch.arange(rows.numel(), device=rows.device)
        moved = rows != place
        if bool(moved.any()):
            src, dst = rows[moved], place[moved]
            for buf in (self._keys, self._values):
                buf[:, dst] = buf[:, src]  # the right side is gathered first: overlapping moves are safe
        self.lengths = self.lengths.index_select(0, rows)

    def append(self, other: "StaticKVCache") -> None:
        """Add the rows of `other` (same layers, heads and capacity) after this cache's rows,
        into free places; the buffers grow only when there are not enough."""
        if other.keys.shape[0] != self.keys.shape[0] or other.keys.shape[2:] != self.keys.shape[2:]:
            raise ValueError(f"cannot append a cache of shape {tuple(other.keys.shape)} to {tuple(self.keys.shape)}")
        B, n = self.lengths.numel(), other.lengths.numel()
        if B + n > self.reserved:
            grow = list(self._keys.shape)
            grow[1] = B + n - self.reserved
            self._keys = torch.cat([self._keys, self._keys.new_zeros(grow)], dim=1)
            self._values = torch.cat([self._values, self._values.new_zeros(grow)], dim=1)
        self._keys[:, B : B + n] = other.keys
        self._values[:, B : B + n] = other.values
        self.lengths = torch.cat([self.lengths, other.lengths.to(self.lengths.device)])
