"""Beam drafting (DESIGN section 3): draft_beams and check_beam_shape.

A seeded random drafter on the tiny Llama is checked against direct
computations with drafter.rnn_step / drafter.logits and against a naive
Python beam search; a stub drafter with a hand-written log-probability table
gives a fully hand-worked example.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from redraft_cli.beam_search import DraftBeams, check_beam_shape, draft_beams
from redraft_cli.drafter import Drafter
from redraft_cli.errors import BeamShapeError


@pytest.fixture(autouse=True)
def _no_grad():
    """The drafter's parameters require grad; direct computations in these tests need none."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def drafter(tiny_target) -> Drafter:
    return Drafter.for_target(tiny_target, seed=11)


def _inputs(target, B: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, target.hidden_size, generator=gen)
    g0 = torch.randint(0, target.vocab_size, (B,), generator=gen)
    return h, g0


def _step_logp(drafter: Drafter, h: torch.Tensor, history: list[int]) -> torch.Tensor:
    """Drafter log-probabilities (V_d,) after feeding `history` (g0 first) one token at a time."""
    state = torch.zeros(drafter.config.hidden_size)
    for tok in history:
        state = drafter.rnn_step(state, drafter.embed(torch.tensor(tok)))
    return torch.log_softmax(drafter.logits(h, state).float(), dim=-1)


def _naive_beam_search(drafter: Drafter, h: torch.Tensor, g0: int, W: int, L: int):
    """Plain Python beam search: start from the single hypothesis [g0], expand every
    hypothesis by every draft token, keep the W best by total log-probability."""
    vocab = drafter.draft_vocab.tolist() if drafter.draft_vocab is not None else list(range(drafter.draft_vocab_size))
    hyps = [(torch.zeros((), dtype=torch.float32), [g0], [])]  # (score, tokens, per-step logprobs)
    for _ in range(L - 1):
        cands = []
        for p, (score, toks, lps) in enumerate(hyps):
            logp = _step_logp(drafter, h, toks)
            totals = (score + logp).tolist()  # float32 sums, same arithmetic as the library
            for v in range(len(vocab)):
                cands.append((totals[v], p, v, float(logp[v])))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        hyps = [
            (torch.tensor(total, dtype=torch.float32), hyps[p][1] + [vocab[v]], hyps[p][2] + [lp])
            for total, p, v, lp in cands[:W]
        ]
    return [toks for _, toks, _ in hyps], [lps for _, _, lps in hyps]


# --------------------------------------------------------------------------- shapes and basic invariants


@pytest.mark.parametrize("B,W,L", [(1, 1, 2), (1, 4, 5), (2, 3, 4), (3, 2, 1), (2, 5, 3)])
def test_shapes_g0_and_distinct(drafter, tiny_target, B, W, L):
    h, g0 = _inputs(tiny_target, B, seed=B * 100 + W * 10 + L)
    out = draft_beams(drafter, h, g0, W, L)
    assert isinstance(out, DraftBeams)
    assert out.tokens.shape == (B, W, L), f"tokens shape {tuple(out.tokens.shape)}, expected {(B, W, L)}"
    assert out.shape == (B, W, L)
    assert out.tokens.dtype == torch.int64, f"tokens dtype {out.tokens.dtype}"
    assert out.logprobs.shape == (B, W, L - 1), f"logprobs shape {tuple(out.logprobs.shape)}, expected {(B, W, L - 1)}"
    assert out.logprobs.dtype == torch.float32, f"logprobs dtype {out.logprobs.dtype}"
    assert torch.equal(out.tokens[:, :, 0], g0.view(B, 1).expand(B, W)), f"tokens[:, :, 0] {out.tokens[:, :, 0]} != g0 {g0}"
    assert bool(((out.tokens >= 0) & (out.tokens < tiny_target.vocab_size)).all()), "token ids out of range"
    assert bool((out.logprobs <= 0).all()) and bool(torch.isfinite(out.logprobs).all()), f"bad logprobs {out.logprobs}"
    for b in range(B):
        rows = [tuple(r) for r in out.tokens[b].tolist()]
        if L > 1:
            assert len(set(rows)) == W, f"row {b}: beams are not distinct: {rows}"


def test_length_one_returns_only_g0(drafter, tiny_target):
    h, g0 = _inputs(tiny_target, 2, seed=5)
    out = draft_beams(drafter, h, g0, 4, 1)
    assert out.tokens.shape == (2, 4, 1) and out.logprobs.shape == (2, 4, 0)
    assert torch.equal(out.tokens[:, :, 0], g0.view(2, 1).expand(2, 4)), f"L=1 tokens {out.tokens.tolist()}"


def test_step_one_expands_only_beam_zero(drafter, tiny_target):
    """After step 1 the W beams are the drafter's top-W tokens given (h, g0)."""
    B, W = 2, 5
    h, g0 = _inputs(tiny_target, B, seed=21)
    out = draft_beams(drafter, h, g0, W, 2)
    state = drafter.rnn_step(torch.zeros(B, drafter.config.hidden_size), drafter.embed(g0))
    logp = torch.log_softmax(drafter.logits(h, state).float(), dim=-1)  # (B, V)
    top = torch.topk(logp, W, dim=-1)
    assert torch.equal(out.tokens[:, :, 1], top.indices), (
        f"step-1 tokens {out.tokens[:, :, 1].tolist()} != top-{W} of the drafter {top.indices.tolist()}"
    )
    torch.testing.assert_close(out.logprobs[:, :, 0], top.values, rtol=0, atol=1e-6)


def test_scores_sorted_and_equal_to_teacher_forced_logprobs(drafter, tiny_target):
    B, W, L = 2, 4, 5
    h, g0 = _inputs(tiny_target, B, seed=33)
    out = draft_beams(drafter, h, g0, W, L)
    totals = out.logprobs.sum(-1)  # (B, W): the running scores
    diffs = totals[:, 1:] - totals[:, :-1]
    assert bool((diffs <= 1e-5).all()), f"running scores are not sorted descending: {totals.tolist()}"
    # Teacher-forced drafter pass over each beam gives the stored per-step log-probabilities.
    logits = drafter(h.view(B, 1, 1, -1).expand(B, W, 1, -1).reshape(B * W, 1, -1),
                     out.tokens[:, :, : L - 1].reshape(B * W, 1, L - 1))  # (B*W, 1, L-1, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    ref = logp.gather(-1, out.tokens[:, :, 1:].reshape(B * W, 1, L - 1, 1)).view(B, W, L - 1)
    torch.testing.assert_close(out.logprobs, ref, rtol=0, atol=1e-5,
                               msg=lambda m: f"stored logprobs differ from a teacher-forced drafter pass: {m}")
    torch.testing.assert_close(totals, ref.sum(-1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("W,L,seed", [(1, 4, 0), (2, 3, 1), (3, 4, 2), (4, 3, 3), (2, 5, 4)])
def test_matches_naive_beam_search(drafter, tiny_target, W, L, seed):
    h, g0 = _inputs(tiny_target, 1, seed=1000 + seed)
    out = draft_beams(drafter, h, g0, W, L)
    ref_tokens, ref_logprobs = _naive_beam_search(drafter, h[0], int(g0[0]), W, L)
    assert out.tokens[0].tolist() == ref_tokens, (
        f"W={W} L={L}: beams {out.tokens[0].tolist()} differ from the naive beam search {ref_tokens}"
    )
    torch.testing.assert_close(out.logprobs[0], torch.tensor(ref_logprobs, dtype=torch.float32).view(W, L - 1),
                               rtol=0, atol=1e-5)


def test_width_one_is_greedy(drafter, tiny_target):
    h, g0 = _inputs(tiny_target, 1, seed=77)
    out = draft_beams(drafter, h, g0, 1, 5)
    history = [int(g0[0])]
    for _ in range(4):
        history.append(int(_step_logp(drafter, h[0], history).argmax()))
    assert out.tokens[0, 0].tolist() == history, f"W=1 draft {out.tokens[0, 0].tolist()} != greedy {history}"


def test_batch_rows_are_independent(drafter, tiny_target):
    W, L = 3, 4
    h, g0 = _inputs(tiny_target, 2, seed=404)
    assert int(g0[0]) != int(g0[1]) or not torch.equal(h[0], h[1])
    both = draft_beams(drafter, h, g0, W, L)
    for b in range(2):
        alone = draft_beams(drafter, h[b : b + 1], g0[b : b + 1], W, L)
        assert torch.equal(both.tokens[b], alone.tokens[0]), (
            f"row {b}: batched beams {both.tokens[b].tolist()} != B=1 beams {alone.tokens[0].tolist()}"
        )
        torch.testing.assert_close(both.logprobs[b], alone.logprobs[0], rtol=0, atol=1e-5)
    # Same g0 but different h, and same h but different g0, still give per-row results.
    h2 = torch.stack([h[0], h[0]])
    g2 = torch.stack([g0[0], (g0[0] + 1) % tiny_target.vocab_size])
    mixed = draft_beams(drafter, h2, g2, W, L)
    for b in range(2):
        alone = draft_beams(drafter, h2[b : b + 1], g2[b : b + 1], W, L)
        assert torch.equal(mixed.tokens[b], alone.tokens[0]), f"row {b} (shared h) differs from its B=1 run"


# --------------------------------------------------------------------------- hand-worked example (stub drafter)


def _stub_drafter(table: list[list[float]]):
    """A drafter whose state is the last token and whose log-probs come from `table[last]`."""
    tab = torch.tensor(table, dtype=torch.float32).log()
    V = tab.shape[0]
    return SimpleNamespace(
        config=SimpleNamespace(hidden_size=1),
        rnn_w=SimpleNamespace(weight=torch.zeros(1, 1)),
        draft_vocab=None,
        draft_vocab_size=V,
        embed=lambda t: t.float().unsqueeze(-1),
        rnn_step=lambda state, emb: emb,
        logits=lambda h, state: tab[state[..., 0].long()],
    )


def test_hand_worked_example_with_stub_drafter():
    # p(next | last) rows; g0 = 0, W = 2, L = 3, V = 4.
    stub = _stub_drafter([
        [0.10, 0.60, 0.25, 0.05],  # after 0: top-2 = 1 (log .6), 2 (log .25)
        [0.30, 0.25, 0.25, 0.20],  # after 1: best child 0 -> log .6 + log .3 = -1.715
        [0.02, 0.02, 0.02, 0.94],  # after 2: best child 3 -> log .25 + log .94 = -1.448 (wins)
        [0.25, 0.25, 0.25, 0.25],
    ])
    out = draft_beams(stub, torch.zeros(1, 1), torch.tensor([0]), 2, 3)
    # step 1: beams [[0, 1], [0, 2]]; step 2: flat index 7 -> parent 1, token 3; index 0 -> parent 0, token 0.
    assert out.tokens.tolist() == [[[0, 2, 3], [0, 1, 0]]], f"hand-worked beams: got {out.tokens.tolist()}"
    expected = torch.tensor([[[math.log(0.25), math.log(0.94)], [math.log(0.60), math.log(0.30)]]])
    torch.testing.assert_close(out.logprobs, expected, rtol=0, atol=1e-6)
    step1 = draft_beams(stub, torch.zeros(1, 1), torch.tensor([0]), 2, 2)
    assert step1.tokens.tolist() == [[[0, 1], [0, 2]]], f"step 1 must expand beam 0 only: {step1.tokens.tolist()}"


# --------------------------------------------------------------------------- check_beam_shape


@pytest.mark.parametrize("W,L,V", [(0, 4, None), (4, 0, None), (-1, 4, 64), (2, -3, 64), (65, 4, 64), (5, 3, 4),
                                   (257, 2, None), (2, 65, None)])
def test_check_beam_shape_rejects(W, L, V):
    with pytest.raises(BeamShapeError):
        check_beam_shape(W, L, V)


@pytest.mark.parametrize("W,L,V", [(1, 1, None), (1, 1, 1), (64, 5, 64), (4, 5, 64), (4, 4, 4), (256, 64, None)])
def test_check_beam_shape_accepts(W, L, V):
    check_beam_shape(W, L, V)


def test_beam_shape_error_is_bad_input():
    from redraft_cli.errors import BadInputError

    with pytest.raises(BadInputError, match="width"):
        check_beam_shape(0, 3)
    with pytest.raises(BadInputError, match="draft vocabulary"):
        check_beam_shape(9, 3, 8)


# --------------------------------------------------------------------------- reduced draft vocabulary


def _custom_vocab(target, K: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(target.vocab_size, generator=gen)[:K].clone()


@pytest.mark.parametrize("head", ["tied", "own"])
def test_reduced_draft_vocab_tokens_stay_in_set(tiny_target, head):
    K = 10
    d = Drafter.for_target(tiny_target, seed=5, head=head, draft_vocab_size=K)
    assert d.draft_vocab_size == K
    vocab = _custom_vocab(tiny_target, K, seed=8)
    assert not torch.equal(torch.sort(vocab).values, torch.arange(K)), "the custom vocabulary should not be 0..K-1"
    d.draft_vocab = vocab
    allowed = set(vocab.tolist())
    h, g0 = _inputs(tiny_target, 3, seed=9)
    for W, L in [(1, 5), (4, 4), (K, 3)]:
        out = draft_beams(d, h, g0, W, L)
        drafted = set(out.tokens[:, :, 1:].flatten().tolist())
        assert drafted <= allowed, f"{head} W={W} L={L}: drafted {sorted(drafted - allowed)} outside the draft vocabulary"
        assert torch.equal(out.tokens[:, :, 0], g0.view(3, 1).expand(3, W))
        for b in range(3):
            assert len({tuple(r) for r in out.tokens[b].tolist()}) == W, f"{head} W={W}: beams not distinct"
    # W == K: step 1 takes every draft token once.
    out = draft_beams(d, h, g0, K, 2)
    for b in range(3):
        assert sorted(out.tokens[b, :, 1].tolist()) == sorted(allowed), f"row {b}: W=K step-1 tokens"
    # The naive reference (which maps indices through draft_vocab) agrees too.
    ref_tokens, _ = _naive_beam_search(d, h[0], int(g0[0]), 3, 4)
    got = draft_beams(d, h[:1], g0[:1], 3, 4).tokens[0].tolist()
    assert got == ref_tokens, f"{head}: reduced-vocabulary beams {got} != naive {ref_tokens}"


def test_reduced_tied_vocab_scores_are_the_full_drafters_restricted(tiny_target):
    """A tied head with a draft vocabulary scores exactly those rows of the target's LM head:
    step-1 tokens = vocab[top-W of the full drafter's logits restricted to vocab]."""
    K, W = 12, 4
    full = Drafter.for_target(tiny_target, seed=6)
    d = Drafter.for_target(tiny_target, seed=6, draft_vocab_size=K)
    vocab = _custom_vocab(tiny_target, K, seed=13)
    d.draft_vocab = vocab
    h, g0 = _inputs(tiny_target, 2, seed=14)
    out = draft_beams(d, h, g0, W, 2)
    state = full.rnn_step(torch.zeros(2, full.config.hidden_size), full.embed(g0))
    restricted = full.logits(h, state)[:, vocab]  # (2, K)
    expected = vocab[torch.topk(restricted, W, dim=-1).indices]
    assert torch.equal(out.tokens[:, :, 1], expected), f"step-1 tokens {out.tokens[:, :, 1].tolist()} != {expected.tolist()}"
    torch.testing.assert_close(out.logprobs[:, :, 0], torch.topk(torch.log_softmax(restricted, -1), W).values,
                               rtol=0, atol=1e-5)
