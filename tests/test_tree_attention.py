"""Dynamic tree attention (DESIGN section 4): pack_tree, prefix_owner, unpack_nodes, attention_bias.

Hand-worked examples spell the expected tensors out literally; a seeded
property test checks the packing against a naive Python reference; and a tiny
random Llama checks that one packed tree pass equals running each beam alone.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from redraft_cli.tree_attention import PackedTree, attention_bias, pack_tree, prefix_owner, unpack_nodes

T, F = True, False


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int64)


def _b(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _eq(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert torch.equal(actual.to(expected.dtype), expected), f"{what}:\n got      {actual.tolist()}\n expected {expected.tolist()}"


def _check_tree(tree: PackedTree, *, tokens, depth, positions, mask, unpack, num_nodes, valid) -> None:
    _eq(tree.tokens, _t(tokens), "tokens")
    _eq(tree.depth, _t(depth), "depth")
    _eq(tree.positions, _t(positions), "positions")
    _eq(tree.mask, _b(mask), "mask")
    _eq(tree.unpack, _t(unpack), "unpack")
    _eq(tree.num_nodes, _t(num_nodes), "num_nodes")
    _eq(tree.valid, _b(valid), "valid")
    assert tree.n == len(tokens[0]), f"tree.n = {tree.n}, expected {len(tokens[0])}"
    assert tree.mask.dtype == torch.bool and tree.valid.dtype == torch.bool


# --------------------------------------------------------------------------- hand-worked examples


def test_all_beams_identical():
    beams = _t([[[5, 8, 2], [5, 8, 2], [5, 8, 2]]])  # W=3, L=3
    _eq(prefix_owner(beams), _t([[[0, 0, 0], [0, 0, 0], [0, 0, 0]]]), "owner")
    tree = pack_tree(beams, 4)
    _check_tree(
        tree,
        tokens=[[5, 8, 2]],
        depth=[[0, 1, 2]],
        positions=[[4, 5, 6]],
        mask=[[[T, F, F],
               [T, T, F],
               [T, T, T]]],
        unpack=[[[0, 1, 2], [0, 1, 2], [0, 1, 2]]],
        num_nodes=[3],  # n == L
        valid=[[T, T, T]],
    )


def test_all_beams_distinct_after_g0():
    beams = _t([[[5, 1, 2], [5, 3, 4], [5, 6, 7]]])  # W=3, L=3
    _eq(prefix_owner(beams), _t([[[0, 0, 0], [0, 1, 1], [0, 2, 2]]]), "owner")
    tree = pack_tree(beams, 10)
    _check_tree(
        tree,
        tokens=[[5, 1, 2, 3, 4, 6, 7]],
        depth=[[0, 1, 2, 1, 2, 1, 2]],
        positions=[[10, 11, 12, 11, 12, 11, 12]],
        mask=[[[T, F, F, F, F, F, F],
               [T, T, F, F, F, F, F],
               [T, T, T, F, F, F, F],
               [T, F, F, T, F, F, F],
               [T, F, F, T, T, F, F],
               [T, F, F, F, F, T, F],
               [T, F, F, F, F, T, T]]],
        unpack=[[[0, 1, 2], [0, 3, 4], [0, 5, 6]]],
        num_nodes=[7],  # n == 1 + W*(L-1)
        valid=[[T] * 7],
    )


def test_same_token_under_different_parents_is_not_shared():
    """Sharing is prefix-wise: equal tokens at depth 2 under different depth-1 tokens are distinct nodes."""
    beams = _t([[[5, 1, 2], [5, 3, 2], [5, 6, 2]]])
    _eq(prefix_owner(beams), _t([[[0, 0, 0], [0, 1, 1], [0, 2, 2]]]), "owner")
    tree = pack_tree(beams, 0)
    _check_tree(
        tree,
        tokens=[[5, 1, 2, 3, 2, 6, 2]],
        depth=[[0, 1, 2, 1, 2, 1, 2]],
        positions=[[0, 1, 2, 1, 2, 1, 2]],
        mask=[[[T, F, F, F, F, F, F],
               [T, T, F, F, F, F, F],
               [T, T, T, F, F, F, F],
               [T, F, F, T, F, F, F],
               [T, F, F, T, T, F, F],
               [T, F, F, F, F, T, F],
               [T, F, F, F, F, T, T]]],
        unpack=[[[0, 1, 2], [0, 3, 4], [0, 5, 6]]],
        num_nodes=[7],
        valid=[[T] * 7],
    )


def test_partial_sharing_docstring_example():
    beams = _t([[[5, 8, 2], [5, 8, 4], [5, 9, 2]]])
    _eq(prefix_owner(beams), _t([[[0, 0, 0], [0, 0, 1], [0, 2, 2]]]), "owner")
    tree = pack_tree(beams, 7)
    _check_tree(
        tree,
        tokens=[[5, 8, 2, 4, 9, 2]],
        depth=[[0, 1, 2, 2, 1, 2]],
        positions=[[7, 8, 9, 9, 8, 9]],
        mask=[[[T, F, F, F, F, F],   # 0: g0
               [T, T, F, F, F, F],   # 1: 8
               [T, T, T, F, F, F],   # 2: 2 (beam 0)
               [T, T, F, T, F, F],   # 3: 4 (beam 1) -> {0, 1, 3}
               [T, F, F, F, T, F],   # 4: 9 (beam 2)
               [T, F, F, F, T, T]]],  # 5: 2 (beam 2) -> {0, 4, 5}
        unpack=[[[0, 1, 2], [0, 1, 3], [0, 4, 5]]],
        num_nodes=[6],
        valid=[[T] * 6],
    )


def test_partial_sharing_deeper_w4_l4():
    """Beam 3 repeats beam 1 entirely; beam 2 branches off beam 0 at depth 3."""
    beams = _t([[[1, 2, 3, 4],
                 [1, 5, 6, 7],
                 [1, 2, 3, 8],
                 [1, 5, 6, 7]]])
    _eq(prefix_owner(beams), _t([[[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 2], [0, 1, 1, 1]]]), "owner")
    tree = pack_tree(beams, 2)
    _check_tree(
        tree,
        tokens=[[1, 2, 3, 4, 5, 6, 7, 8]],
        depth=[[0, 1, 2, 3, 1, 2, 3, 3]],
        positions=[[2, 3, 4, 5, 3, 4, 5, 5]],
        mask=[[[T, F, F, F, F, F, F, F],
               [T, T, F, F, F, F, F, F],
               [T, T, T, F, F, F, F, F],
               [T, T, T, T, F, F, F, F],
               [T, F, F, F, T, F, F, F],
               [T, F, F, F, T, T, F, F],
               [T, F, F, F, T, T, T, F],
               [T, T, T, F, F, F, F, T]]],
        unpack=[[[0, 1, 2, 3], [0, 4, 5, 6], [0, 1, 2, 7], [0, 4, 5, 6]]],
        num_nodes=[8],
        valid=[[T] * 8],
    )


def test_single_beam_w1():
    beams = _t([[[7, 3, 3, 9]]])  # W=1, L=4 (repeated token 3 at consecutive depths)
    _eq(prefix_owner(beams), _t([[[0, 0, 0, 0]]]), "owner")
    tree = pack_tree(beams, 5)
    _check_tree(
        tree,
        tokens=[[7, 3, 3, 9]],
        depth=[[0, 1, 2, 3]],
        positions=[[5, 6, 7, 8]],
        mask=[[[T, F, F, F],
               [T, T, F, F],
               [T, T, T, F],
               [T, T, T, T]]],
        unpack=[[[0, 1, 2, 3]]],
        num_nodes=[4],
        valid=[[T, T, T, T]],
    )


def test_length_one_l1():
    beams = _t([[[7], [7], [7], [7]]])  # W=4, L=1: only g0
    _eq(prefix_owner(beams), _t([[[0], [0], [0], [0]]]), "owner")
    tree = pack_tree(beams, 3)
    _check_tree(
        tree,
        tokens=[[7]],
        depth=[[0]],
        positions=[[3]],
        mask=[[[T]]],
        unpack=[[[0], [0], [0], [0]]],
        num_nodes=[1],
        valid=[[T]],
    )


def test_batch_of_two_rows_with_different_node_counts():
    beams = _t([[[5, 8, 2], [5, 8, 4], [5, 9, 2]],    # docstring example: 6 nodes
                [[3, 1, 4], [3, 1, 4], [3, 1, 4]]])   # identical beams: 3 nodes
    _eq(prefix_owner(beams), _t([[[0, 0, 0], [0, 0, 1], [0, 2, 2]],
                                 [[0, 0, 0], [0, 0, 0], [0, 0, 0]]]), "owner")
    tree = pack_tree(beams, torch.tensor([10, 20]))
    assert tree.n == 6, f"rows are padded to the largest node count 6, got n={tree.n}"
    _eq(tree.num_nodes, _t([6, 3]), "num_nodes")
    _eq(tree.valid, _b([[T, T, T, T, T, T], [T, T, T, F, F, F]]), "valid")
    _eq(tree.unpack, _t([[[0, 1, 2], [0, 1, 3], [0, 4, 5]],
                         [[0, 1, 2], [0, 1, 2], [0, 1, 2]]]), "unpack")
    assert bool((tree.unpack < tree.num_nodes.view(2, 1, 1)).all()), "unpack must never point at a padding node"
    # Real nodes: literal values (padding values of tokens/depth/positions are unspecified).
    _eq(tree.tokens[0], _t([5, 8, 2, 4, 9, 2]), "row 0 tokens")
    _eq(tree.tokens[1, :3], _t([3, 1, 4]), "row 1 tokens")
    _eq(tree.depth[0], _t([0, 1, 2, 2, 1, 2]), "row 0 depth")
    _eq(tree.depth[1, :3], _t([0, 1, 2]), "row 1 depth")
    _eq(tree.positions[0], _t([10, 11, 12, 12, 11, 12]), "row 0 positions (cache_len 10)")
    _eq(tree.positions[1, :3], _t([20, 21, 22]), "row 1 positions (cache_len 20)")
    assert bool(((tree.tokens[1, 3:] >= 0) & (tree.tokens[1, 3:] <= 9)).all()), "padding tokens must be valid ids"
    _eq(tree.mask, _b([[[T, F, F, F, F, F],
                        [T, T, F, F, F, F],
                        [T, T, T, F, F, F],
                        [T, T, F, T, F, F],
                        [T, F, F, F, T, F],
                        [T, F, F, F, T, T]],
                       [[T, F, F, F, F, F],
                        [T, T, F, F, F, F],
                        [T, T, T, F, F, F],
                        [F, F, F, T, F, F],    # padding: itself only
                        [F, F, F, F, T, F],
                        [F, F, F, F, F, T]]]), "mask")


def test_cache_len_int_and_tensor_agree():
    beams = _t([[[5, 8, 2], [5, 8, 4], [5, 9, 2]], [[1, 2, 3], [1, 4, 3], [1, 2, 6]]])
    a = pack_tree(beams, 9)
    b = pack_tree(beams, torch.tensor([9, 9]))
    for name in ("tokens", "positions", "depth", "valid", "mask", "unpack", "num_nodes"):
        _eq(getattr(a, name), getattr(b, name), f"{name} (int vs tensor cache_len)")


def test_prefix_owner_dtype_and_batch():
    beams = _t([[[1, 2], [1, 2], [1, 3], [4, 2]],
                [[0, 0], [1, 1], [0, 1], [1, 1]]])
    owner = prefix_owner(beams)
    assert owner.dtype == torch.int64, f"owner dtype {owner.dtype}, expected int64"
    _eq(owner, _t([[[0, 0], [0, 0], [0, 2], [3, 3]],
                   [[0, 0], [1, 1], [0, 2], [1, 1]]]), "owner")


# --------------------------------------------------------------------------- unpack_nodes / attention_bias


def test_unpack_nodes_scalar_and_vector_values():
    unpack = _t([[[0, 1, 2], [0, 1, 3], [0, 4, 5]],
                 [[0, 1, 2], [0, 1, 2], [0, 1, 2]]])
    values = torch.tensor([[100, 101, 102, 103, 104, 105],
                           [200, 201, 202, -1, -1, -1]])
    _eq(unpack_nodes(values, unpack), torch.tensor([[[100, 101, 102], [100, 101, 103], [100, 104, 105]],
                                                    [[200, 201, 202], [200, 201, 202], [200, 201, 202]]]),
        "unpack_nodes (B, n)")
    vec = torch.stack([values, -values], dim=-1).float()  # (B, n, 2)
    out = unpack_nodes(vec, unpack)
    assert out.shape == (2, 3, 3, 2), f"unpack_nodes (B, n, 2) shape {tuple(out.shape)}"
    _eq(out[0, 1, 2], torch.tensor([103.0, -103.0]), "unpack_nodes vector at beam 1 depth 2")
    _eq(out[0, 2, 1], torch.tensor([104.0, -104.0]), "unpack_nodes vector at beam 2 depth 1")
    _eq(out[1, 2, 2], torch.tensor([202.0, -202.0]), "unpack_nodes vector row 1 beam 2 depth 2")
    # Extra trailing dims too: (B, n, 2, 3).
    big = torch.arange(2 * 6 * 6, dtype=torch.float32).view(2, 6, 2, 3)
    out4 = unpack_nodes(big, unpack)
    assert out4.shape == (2, 3, 3, 2, 3)
    _eq(out4[0, 2, 2], big[0, 5], "unpack_nodes (B, n, 2, 3) at beam 2 depth 2")
    _eq(out4[1, 1, 0], big[1, 0], "unpack_nodes (B, n, 2, 3) row 1 beam 1 depth 0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_bias_values_and_shape(dtype):
    mask = _b([[[T, F, F], [T, T, F], [T, F, T]],
               [[T, F, F], [T, T, F], [F, F, T]]])
    bias = attention_bias(mask, 2, dtype)
    assert bias.shape == (2, 1, 3, 5), f"bias shape {tuple(bias.shape)}, expected (B, 1, n, cache + n) = (2, 1, 3, 5)"
    assert bias.dtype == dtype
    m = torch.finfo(dtype).min
    expected = torch.tensor([[[[0, 0, 0, m, m], [0, 0, 0, 0, m], [0, 0, 0, m, 0]]],
                             [[[0, 0, 0, m, m], [0, 0, 0, 0, m], [0, 0, m, m, 0]]]], dtype=dtype)
    _eq(bias, expected, "attention_bias")


def test_attention_bias_with_valid_cache_and_no_cache():
    mask = _b([[[T, F], [T, T]]])
    m = torch.finfo(torch.float32).min
    bias = attention_bias(mask, 3, torch.float32, valid_cache=_b([[F, T, T]]))
    _eq(bias, torch.tensor([[[[m, 0, 0, 0, m], [m, 0, 0, 0, 0]]]]), "attention_bias with valid_cache")
    bias0 = attention_bias(mask, 0, torch.float32)
    _eq(bias0, torch.tensor([[[[0, m], [0, 0]]]]), "attention_bias with empty cache")


# --------------------------------------------------------------------------- property test


def _naive_pack(row: list[list[int]]):
    """Reference for one row: nodes in row-major first-appearance order of each distinct prefix."""
    W, L = len(row), len(row[0])
    index: dict[tuple[int, ...], int] = {}
    tokens, depth = [], []
    for i in range(W):
        for k in range(L):
            p = tuple(row[i][: k + 1])
            if p not in index:
                index[p] = len(tokens)
                tokens.append(row[i][k])
                depth.append(k)
    prefixes = sorted(index, key=index.get)
    ancestors = [{index[p[: m + 1]] for m in range(len(p))} for p in prefixes]
    unpack = [[index[tuple(row[i][: k + 1])] for k in range(L)] for i in range(W)]
    owner = [[min(j for j in range(W) if row[j][: k + 1] == row[i][: k + 1]) for k in range(L)] for i in range(W)]
    return tokens, depth, ancestors, unpack, owner


def test_pack_tree_matches_naive_reference_on_random_beams():
    rng = random.Random(1234)
    cases = 0
    for trial in range(300):
        B, W, L = rng.randint(1, 3), rng.randint(1, 6), rng.randint(1, 5)
        vocab = rng.randint(2, 4)  # tiny vocabulary: prefixes collide often
        beams_list = [[[rng.randrange(vocab) for _ in range(L)] for _ in range(W)] for _ in range(B)]
        for b in range(B):  # every beam of a row starts with the same g0
            g0 = beams_list[b][0][0]
            for i in range(W):
                beams_list[b][i][0] = g0
        beams = torch.tensor(beams_list)
        cache_len = torch.tensor([rng.randint(0, 50) for _ in range(B)])
        tree = pack_tree(beams, cache_len)
        owner = prefix_owner(beams)
        refs = [_naive_pack(beams_list[b]) for b in range(B)]
        n_max = max(len(r[0]) for r in refs)
        ctx = f"trial {trial}: beams={beams_list}"
        assert tree.n == n_max, f"{ctx}: n={tree.n}, expected {n_max}"
        assert tree.unpack.shape == (B, W, L) and tree.mask.shape == (B, n_max, n_max), ctx
        for b, (tokens, depth, ancestors, unpack, owner_ref) in enumerate(refs):
            n = len(tokens)
            assert owner[b].tolist() == owner_ref, f"{ctx} row {b}: owner {owner[b].tolist()} != {owner_ref}"
            assert int(tree.num_nodes[b]) == n, f"{ctx} row {b}: num_nodes {int(tree.num_nodes[b])} != {n}"
            assert n <= W * L and n >= L, f"{ctx} row {b}: node count {n} outside [L, W*L]"
            assert tree.valid[b].tolist() == [True] * n + [False] * (n_max - n), f"{ctx} row {b}: valid"
            assert tree.tokens[b, :n].tolist() == tokens, f"{ctx} row {b}: tokens {tree.tokens[b, :n].tolist()} != {tokens}"
            assert tree.depth[b, :n].tolist() == depth, f"{ctx} row {b}: depth"
            assert tree.positions[b, :n].tolist() == [int(cache_len[b]) + d for d in depth], f"{ctx} row {b}: positions"
            assert tree.unpack[b].tolist() == unpack, f"{ctx} row {b}: unpack {tree.unpack[b].tolist()} != {unpack}"
            for a in range(n_max):
                row = {c for c in range(n_max) if bool(tree.mask[b, a, c])}
                want = ancestors[a] if a < n else {a}
                assert row == want, f"{ctx} row {b}: mask row of node {a} is {sorted(row)}, expected {sorted(want)}"
            for a in range(n):
                # Parent: the ancestor at depth - 1; it comes earlier in the packed order.
                d = depth[a]
                assert len(ancestors[a]) == d + 1, f"{ctx} row {b}: node {a} at depth {d} has ancestors {ancestors[a]}"
                if d > 0:
                    parents = [c for c in ancestors[a] if tree.depth[b, c] == d - 1]
                    assert len(parents) == 1 and parents[0] < a, f"{ctx} row {b}: parent of node {a} is {parents}"
                    assert int(tree.depth[b, a]) == int(tree.depth[b, parents[0]]) + 1
                    assert int(tree.positions[b, a]) == int(tree.positions[b, parents[0]]) + 1
            # unpack[i, k] carries beam i's token at depth k.
            for i in range(W):
                for k in range(L):
                    node = int(tree.unpack[b, i, k])
                    assert node < n, f"{ctx} row {b}: unpack[{i},{k}]={node} points at padding"
                    assert int(tree.tokens[b, node]) == beams_list[b][i][k], f"{ctx} row {b}: token at unpack[{i},{k}]"
                    assert int(tree.depth[b, node]) == k, f"{ctx} row {b}: depth at unpack[{i},{k}]"
            cases += 1
    assert cases > 300


# --------------------------------------------------------------------------- tree pass == per-beam causal passes


def _prefill(target, context: torch.Tensor):
    """context (B, P) -> cache holding it."""
    cache = target.new_cache()
    B, P = context.shape
    target.forward(context, torch.arange(P).expand(B, P), cache)
    return cache


def _per_beam_logits(target, cache, beams: torch.Tensor, P: int) -> torch.Tensor:
    """Each beam alone, normal causal forward on a copy of the context cache -> (B, W, L, V)."""
    B, W, L = beams.shape
    out = torch.empty(B, W, L, target.vocab_size)
    for i in range(W):
        c = copy.deepcopy(cache)
        hidden = target.forward(beams[:, i], torch.arange(P, P + L).expand(B, L), c)
        out[:, i] = target.logits(hidden)
    return out


def _tree_logits(target, cache, beams: torch.Tensor, P: int):
    tree = pack_tree(beams, P)
    bias = attention_bias(tree.mask, P, target.compute_dtype)
    hidden = target.forward(tree.tokens, tree.positions, copy.deepcopy(cache), bias)
    assert hidden.shape[:2] == (beams.shape[0], tree.n)
    return unpack_nodes(target.logits(hidden), tree.unpack), tree


BEAM_CASES = {
    "identical": [[5, 8, 2, 7], [5, 8, 2, 7], [5, 8, 2, 7]],
    "distinct": [[5, 1, 2, 3], [5, 3, 4, 1], [5, 6, 7, 9]],
    "partial": [[5, 8, 2, 1], [5, 8, 4, 1], [5, 9, 2, 1], [5, 8, 2, 3]],
    "w1": [[4, 9, 9, 2, 11]],
    "l1": [[6], [6]],
    "l2": [[6, 1], [6, 2], [6, 1]],
}


@pytest.mark.parametrize("name", list(BEAM_CASES))
def test_tree_pass_equals_per_beam_passes(tiny_target, name):
    torch.manual_seed(7)
    P = 9
    context = torch.randint(0, tiny_target.vocab_size, (1, P))
    cache = _prefill(tiny_target, context)
    beams = torch.tensor([BEAM_CASES[name]])
    tree_logits, tree = _tree_logits(tiny_target, cache, beams, P)
    ref = _per_beam_logits(tiny_target, cache, beams, P)
    err = (tree_logits - ref).abs().max().item()
    assert err <= 1e-4, f"{name}: tree pass ({tree.n} nodes) differs from per-beam passes by {err:.3g}"


def test_tree_pass_equals_per_beam_passes_random_shapes(tiny_target):
    gen = torch.Generator().manual_seed(99)
    for W, L, vocab in [(2, 3, 3), (4, 4, 3), (5, 5, 2), (3, 2, 64), (6, 3, 4)]:
        P = int(torch.randint(1, 12, (1,), generator=gen))
        context = torch.randint(0, tiny_target.vocab_size, (1, P), generator=gen)
        cache = _prefill(tiny_target, context)
        beams = torch.randint(0, vocab, (1, W, L), generator=gen)
        beams[:, :, 0] = beams[:, :1, 0]
        tree_logits, tree = _tree_logits(tiny_target, cache, beams, P)
        ref = _per_beam_logits(tiny_target, cache, beams, P)
        err = (tree_logits - ref).abs().max().item()
        assert err <= 1e-4, f"W={W} L={L} P={P} n={tree.n} beams={beams.tolist()}: max |diff| {err:.3g}"


def test_tree_pass_batch_of_two_with_padding(tiny_target):
    """Two rows with different node counts (padded) give the same logits as each beam alone."""
    torch.manual_seed(3)
    P = 6
    context = torch.randint(0, tiny_target.vocab_size, (2, P))
    cache = _prefill(tiny_target, context)
    beams = torch.tensor([[[5, 8, 2], [5, 8, 4], [5, 9, 2]],
                          [[3, 1, 4], [3, 1, 4], [3, 1, 5]]])
    tree_logits, tree = _tree_logits(tiny_target, cache, beams, P)
    assert tree.num_nodes.tolist() == [6, 4] and tree.n == 6, f"node counts {tree.num_nodes.tolist()}"
    ref = _per_beam_logits(tiny_target, cache, beams, P)
    err = (tree_logits - ref).abs().max().item()
    assert err <= 1e-4, f"batched tree pass differs from per-beam passes by {err:.3g}"
    assert torch.isfinite(tree_logits).all()
