"""KV cache operations for tree decoding on a Hugging Face `DynamicCache` (the generic path).

Llama-family targets use `static_cache.StaticKVCache` instead (batched,
preallocated); `TreeCache` gives the generic path the same interface.

After a verify pass the cache holds `prefix_len` committed tokens followed by
the n packed tree nodes. `commit_path` keeps only the accepted path (g0 and
the accepted drafts), moved to consecutive positions, and drops the rest.

Worked example, prefix_len = 4, n = 6 nodes, accepted path = nodes [0, 4, 5]:

    before: [c0 c1 c2 c3 | n0 n1 n2 n3 n4 n5]      length 10
    after:  [c0 c1 c2 c3 | n0 n4 n5]               length 7

Only the tail is touched: one gather of (path length) entries per layer.
"""

from __future__ import annotations

from typing import Any

import torch


def commit_path(cache: Any, prefix_len: int, path: torch.Tensor) -> None:
    """Keep cache[:prefix_len] + the tree nodes `path` (m,) (packed indices), in that order.

    Works for caches whose layers expose `keys`/`values` of shape
    (B, kv_heads, S, head_dim) with batch 1 (the DynamicCache layers).
    """
    m = int(path.numel())
    src = path.to(torch.long) + prefix_len  # (m,)
    contiguous = bool(torch.equal(path.cpu(), torch.arange(m)))
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        if keys is None or keys.numel() == 0:
            continue
        if not contiguous:
            at = src.to(keys.device)  # with a device map, each layer's cache lives on its layer's device
            keys[:, :, prefix_len : prefix_len + m] = keys.index_select(2, at)
            values[:, :, prefix_len : prefix_len + m] = values.index_select(2, at)
        layer.keys = keys[:, :, : prefix_len + m]
        layer.values = values[:, :, : prefix_len + m]
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = prefix_len + m


class TreeCache:
    """A Hugging Face cache for one row with StaticKVCache's decoding interface.

    hf: the wrapped cache (passed to the model); lengths: (1,) committed tokens.
    """

    def __init__(self, hf_cache: Any, device: torch.device) -> None:
        self.hf = hf_cache
        self.lengths = torch.zeros(1, dtype=torch.long, device=device)

    def get_seq_length(self) -> int:
        return int(self.lengths[0])

    def commit(self, path: torch.Tensor, accepted: torch.Tensor) -> None:
        """path (1, m) packed node indices, accepted (1,): keep path[0, :accepted] after the committed prefix."""
        prefix = int(self.lengths[0])
        commit_path(self.hf, prefix, path[0, : int(accepted[0])])
        self.lengths += accepted.to(self.lengths)

    def advance(self, n: int) -> None:
        """Keep the n new tokens of the last forward (they are already at the end of the cache)."""
        self.lengths += n

    def truncate(self, n: int) -> None:
        """Keep only the first n committed tokens (and drop any tentative ones after them)."""
        if not 0 <= n <= int(self.lengths[0]):
            raise ValueError(f"cannot truncate a cache of {int(self.lengths[0])} tokens to {n}")
        commit_path(self.hf, n, torch.zeros(0, dtype=torch.long))
        self.lengths.fill_(n)

    def keep(self, rows: torch.Tensor) -> None:
        if rows.numel() != 1 or int(rows[0]) != 0:
            raise ValueError("a generic-path cache holds one row")

    def append(self, other: "TreeCache") -> None:
        raise ValueError("a generic-path cache holds one row")
