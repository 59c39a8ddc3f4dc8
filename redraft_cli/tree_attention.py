"""Dynamic tree attention (DESIGN section 4): deduplicate beams into one packed row.

Beams share prefixes (always g0, often more). Each distinct prefix becomes one
tree node; the target runs once over the n <= W*L packed nodes with a mask
that lets a node see only its ancestors (and the cached context).

Worked example, W=3, L=3 (one row):

    beams = [[5, 8, 2],          owner = [[0, 0, 0],      is_node = [[T, T, T],
             [5, 8, 4],                   [0, 0, 1],                 [F, F, T],
             [5, 9, 2]]                   [0, 2, 2]]                 [F, T, T]]

    packed (row-major over is_node):   tokens    = [5, 8, 2, 4, 9, 2]
                                       depth     = [0, 1, 2, 2, 1, 2]
                                       positions = cache_len + depth
    unpack[i, k] = packed index of node owner[i, k] at depth k:
                                       unpack    = [[0, 1, 2],
                                                    [0, 1, 3],
                                                    [0, 4, 5]]
    tree mask (row a attends column b):  node 3 (token 4) -> {0, 1, 3}
                                         node 5 (token 2 of beam 2) -> {0, 4, 5}

Rows of a batch can have different node counts; they are padded to the
largest n with `valid = False` nodes that attend only to themselves.

Beams may differ in length: a cell holding a negative token (lookup.PAD) is
no node, and every cell after it in that beam must be padding too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedTree:
    """tokens, positions, depth: (B, n); valid: (B, n) bool; mask: (B, n, n) bool,
    mask[b, a, c] = node c is an ancestor-or-self of node a;
    unpack: (B, W, L) packed index of the node at beam i, depth k;
    num_nodes: (B,) real node count per row."""

    tokens: torch.Tensor
    positions: torch.Tensor
    depth: torch.Tensor
    valid: torch.Tensor
    mask: torch.Tensor
    unpack: torch.Tensor
    num_nodes: torch.Tensor

    @property
    def n(self) -> int:
        return self.tokens.shape[1]


def prefix_owner(beams: torch.Tensor) -> torch.Tensor:
    """owner[b, i, k] = smallest beam j whose prefix up to depth k equals beam i's.

    beams: (B, W, L) -> owner (B, W, L) int64.
    """
    match = beams.unsqueeze(2) == beams.unsqueeze(1)  # (B, W_i, W_j, L)
    prefix_match = torch.cumprod(match.to(torch.int32), dim=-1).bool()  # equal up to and including k
    # argmax of a bool along j returns the first True (j = i always matches).
    return prefix_match.to(torch.int8).argmax(dim=2)  # (B, W, L)


def pack_tree(beams: torch.Tensor, cache_len: torch.Tensor | int) -> PackedTree:
    """Pack the distinct prefixes of `beams` (B, W, L) into one row per batch entry.

    cache_len: int or (B,) tensor, the number of tokens already in the KV cache
    (the position of g0). Returns a PackedTree (see the module docstring).
    """
    B, W, L = beams.shape
    device = beams.device
    owner = prefix_owner(beams)  # (B, W, L)
    beam_ids = torch.arange(W, device=device).view(1, W, 1)
    is_node = (owner == beam_ids) & (beams >= 0)  # (B, W, L); negative cells are padding (shorter beams)
    flat_is_node = is_node.view(B, W * L)
    num_nodes = flat_is_node.sum(-1)  # (B,)
    n = int(num_nodes.max())
    # Packed index of every grid cell that is a node (row-major order).
    node_index = torch.cumsum(flat_is_node.to(torch.int64), dim=-1) - 1  # (B, W*L)
    node_index_grid = node_index.view(B, W, L)
    # unpack[b, i, k] = node_index_grid[b, owner[b, i, k], k]
    unpack = node_index_grid.gather(1, owner)  # (B, W, L)

    # Scatter node cells into the packed row; padding slots point at dummy cell W*L.
    dest = torch.where(flat_is_node, node_index, torch.full_like(node_index, n))  # (B, W*L)
    cell_of_node = torch.full((B, n + 1), W * L, dtype=torch.int64, device=device)
    cell_of_node.scatter_(1, dest, torch.arange(W * L, device=device).expand(B, W * L))
    cell_of_node = cell_of_node[:, :n]  # (B, n), W*L marks padding
    valid = cell_of_node < W * L
    safe_cell = torch.where(valid, cell_of_node, torch.zeros_like(cell_of_node))

    depth_grid = torch.arange(L, device=device).expand(B, W, L).reshape(B, W * L)
    tokens = beams.reshape(B, W * L).gather(1, safe_cell)
    depth = depth_grid.gather(1, safe_cell)
    if not torch.is_tensor(cache_len):
        cache_len = torch.full((B,), int(cache_len), dtype=torch.int64, device=device)
    positions = cache_len.view(B, 1) + depth

    # Ancestors of grid cell (i, k): the nodes unpack[i, 0..k].
    one_hot = torch.nn.functional.one_hot(unpack, n).to(torch.int32)  # (B, W, L, n)
    ancestors = torch.cumsum(one_hot, dim=2).bool().view(B, W * L, n)
    mask = ancestors.gather(1, safe_cell.unsqueeze(-1).expand(B, n, n))  # (B, n, n)
    eye = torch.eye(n, dtype=torch.bool, device=device).unsqueeze(0)
    mask = torch.where(valid.unsqueeze(-1), mask, eye)  # padding nodes attend to themselves only
    tokens = torch.where(valid, tokens, torch.zeros_like(tokens))
    return PackedTree(tokens, positions, depth, valid, mask, unpack, num_nodes)


def unpack_nodes(values: torch.Tensor, unpack: torch.Tensor) -> torch.Tensor:
    """Map per-node values back to beam layout.

    values: (B, n, ...) ; unpack: (B, W, L) -> (B, W, L, ...).
    """
    B, W, L = unpack.shape
    flat = unpack.reshape(B, W * L)
    idx = flat.view(B, W * L, *([1] * (values.dim() - 2))).expand(B, W * L, *values.shape[2:])
    return values.gather(1, idx).view(B, W, L, *values.shape[2:])


def attention_bias(tree_mask: torch.Tensor, cache_len: int, dtype: torch.dtype, valid_cache: torch.Tensor | None = None) -> torch.Tensor:
    """Additive 4D mask for a forward over the packed nodes after `cache_len` cached tokens.

    tree_mask: (B, n, n) bool. valid_cache: optional (B, cache_len) bool for
    padded caches. Returns (B, 1, n, cache_len + n) with 0 where attention is
    allowed and the dtype's minimum elsewhere (works for eager and SDPA).
    """
    B, n, _ = tree_mask.shape
    if valid_cache is None:
        ctx = torch.ones(B, n, cache_len, dtype=torch.bool, device=tree_mask.device)
    else:
        ctx = valid_cache.unsqueeze(1).expand(B, n, cache_len)
    allowed = torch.cat([ctx, tree_mask], dim=-1)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=tree_mask.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias.unsqueeze(1)
