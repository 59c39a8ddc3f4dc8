"""Unit tests of the acceptance rules (DESIGN section 5) and the sampling transform.

Beams are built by hand, packed with `pack_tree`, and the target's per-node
logits are written by hand, so the accepted beam, length, bonus token and path
are known in advance.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from redraft_cli.errors import BadInputError
from redraft_cli.sampling import SamplingConfig, choose_tokens, logits_to_probs
from redraft_cli.tree_attention import pack_tree
from redraft_cli.verify import accept_greedy, accept_rejection, accept_typical, walk_choices

V = 10
NEG = -1e4  # exp(NEG) underflows to exactly 0 in float32: one-hot probabilities

# The worked example of tree_attention.py: packed nodes in row-major order
#   node:   0    1      2      3      4      5
#   token:  5    8      2      4      9      2
#   cell: (0,0) (0,1) (0,2)  (1,2)  (2,1)  (2,2)
DOC_BEAMS = [[5, 8, 2], [5, 8, 4], [5, 9, 2]]
DOC_UNPACK = [[0, 1, 2], [0, 1, 3], [0, 4, 5]]
OTHER = 0  # a token no drafted child of DOC_BEAMS equals


def doc_tree():
    beams = torch.tensor([DOC_BEAMS])
    tree = pack_tree(beams, 7)
    assert tree.unpack[0].tolist() == DOC_UNPACK
    assert tree.tokens[0].tolist() == [5, 8, 2, 4, 9, 2]
    return beams, tree


def onehot_logits(choices: list[list[int]], vocab: int = V) -> torch.Tensor:
    """(B, n) target choices -> (B, n, V) logits whose argmax / only support is the choice."""
    c = torch.tensor(choices)
    logits = torch.full((*c.shape, vocab), NEG)
    return logits.scatter(-1, c.unsqueeze(-1), 0.0)


T1 = SamplingConfig(temperature=1.0, seed=0)


def run_rule(rule: str, beams, tree, choices):
    """Apply one rule to per-node target choices made deterministic (one-hot logits)."""
    if rule == "walk":
        return walk_choices(beams, torch.tensor(choices), tree.unpack)
    logits = onehot_logits(choices)
    if rule == "greedy":
        return accept_greedy(beams, logits, tree.unpack)
    if rule == "rejection":
        return accept_rejection(beams, logits, tree.unpack, T1, torch.Generator().manual_seed(0))
    raise AssertionError(rule)


RULES = ["walk", "greedy", "rejection"]

# (scenario, node choices for nodes 0..5, beam, length, bonus, committed path)
SCENARIOS = [
    # Beam 0 fully accepted: 8 then 2, bonus from node 2.
    ("full beam 0", [8, 2, 7, OTHER, OTHER, OTHER], 0, 2, 7, [0, 1, 2]),
    # Beam 2 fully accepted (not beam 0): 9 then 2, bonus from node 5.
    ("full beam 2", [9, OTHER, OTHER, OTHER, 2, 6], 2, 2, 6, [0, 4, 5]),
    # Beam 0 runs one token (8), beam 1 two (8, 4): the longest wins though it is not beam 0.
    ("longest is beam 1", [8, 4, OTHER, 3, OTHER, OTHER], 1, 2, 3, [0, 1, 3]),
    # Nothing accepted: the bonus is the target's choice at g0.
    ("none", [7, OTHER, OTHER, OTHER, OTHER, OTHER], 0, 0, 7, [0]),
    # Beam 2 accepts 9, then the target wants 1 instead of 2.
    ("partial beam 2", [9, OTHER, OTHER, OTHER, 1, OTHER], 2, 1, 1, [0, 4]),
    # Beams 0 and 1 share the accepted prefix [5, 8]: both run one token, the first wins,
    # and the emitted tokens and committed path do not depend on which one.
    ("tie", [8, 6, OTHER, OTHER, OTHER, OTHER], 0, 1, 6, [0, 1]),
]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("name,choices,beam,length,bonus,path", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_hand_built_tree(rule, name, choices, beam, length, bonus, path):
    beams, tree = doc_tree()
    acc = run_rule(rule, beams, tree, [choices])
    assert acc.beam.tolist() == [beam]
    assert acc.length.tolist() == [length]
    assert acc.bonus.tolist() == [bonus]
    assert acc.path.shape == (1, 3)
    assert acc.path[0].tolist() == DOC_UNPACK[beam]
    assert acc.path[0, : length + 1].tolist() == path
    expected = DOC_BEAMS[beam][1 : length + 1] + [bonus]
    assert acc.emitted(beams) == expected


@pytest.mark.parametrize("rule", RULES)
def test_tie_emits_the_same_whichever_beam(rule):
    """Beams 0 and 1 tie; had beam 1 been picked the output would be identical."""
    beams, tree = doc_tree()
    acc = run_rule(rule, beams, tree, [[8, 6, OTHER, OTHER, OTHER, OTHER]])
    for b in (0, 1):
        assert beams[0, b, 1 : int(acc.length[0]) + 1].tolist() + [int(acc.bonus[0])] == [8, 6]
        assert tree.unpack[0, b, : int(acc.length[0]) + 1].tolist() == [0, 1]


@pytest.mark.parametrize("rule", RULES)
def test_batch_of_two_rows_with_padding(rule):
    # Row 1 has 5 distinct nodes (padded to row 0's 6): [1], [1,2], [1,2,3], [1,2,4], [1,2,5].
    beams = torch.tensor([DOC_BEAMS, [[1, 2, 3], [1, 2, 4], [1, 2, 5]]])
    tree = pack_tree(beams, torch.tensor([7, 4]))
    assert tree.unpack[1].tolist() == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    assert tree.num_nodes.tolist() == [6, 5] and tree.n == 6
    choices = [
        [7, OTHER, OTHER, OTHER, OTHER, OTHER],  # row 0: nothing accepted, bonus 7
        [2, 5, OTHER, OTHER, 9, OTHER],  # row 1: beam 2 = [1, 2, 5] fully accepted, bonus 9 (node 5 is padding)
    ]
    acc = run_rule(rule, beams, tree, choices)
    assert acc.beam.tolist() == [0, 2]
    assert acc.length.tolist() == [0, 2]
    assert acc.bonus.tolist() == [7, 9]
    assert acc.path.tolist() == [[0, 1, 2], [0, 1, 4]]
    assert acc.emitted(beams, 0) == [7]
    assert acc.emitted(beams, 1) == [2, 5, 9]


def test_single_token_beams_accept_nothing():
    """L = 1 (all beams are [g0]): nothing to accept, the bonus is the choice at g0."""
    beams = torch.tensor([[[4], [4], [4]]])
    tree = pack_tree(beams, 3)
    assert tree.n == 1
    for rule in RULES:
        acc = run_rule(rule, beams, tree, [[6]])
        assert acc.length.tolist() == [0] and acc.bonus.tolist() == [6] and acc.path.tolist() == [[0]]


# -- rejection: the law of what is emitted ---------------------------------------------------

def chi2_sf(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def test_rejection_emits_the_target_law_on_a_tree():
    """One row repeated many times: the emitted sequence (accepted drafts + bonus) must be
    distributed as sampling token by token from the target at the nodes it passes through.

    Tree (V = 4): beams [0,1,2], [0,1,3], [0,2,1]; nodes 0:g0 1:(0,1)=1 2:(0,2)=2 3:(1,2)=3
    4:(2,1)=2 5:(2,2)=1. The root has two children (1 and 2), node 1 has two (2 and 3),
    node 4 one (1); nodes 2, 3, 5 are leaves that only give the bonus.
    """
    vocab, rows = 4, 40_000
    beams = torch.tensor([[[0, 1, 2], [0, 1, 3], [0, 2, 1]]])
    tree = pack_tree(beams, 5)
    assert tree.unpack[0].tolist() == [[0, 1, 2], [0, 1, 3], [0, 4, 5]]
    node_p = torch.tensor([
        [0.10, 0.40, 0.30, 0.20],  # g0: children 1 -> node 1, 2 -> node 4
        [0.25, 0.25, 0.30, 0.20],  # node 1: children 2 -> node 2, 3 -> node 3
        [0.70, 0.10, 0.10, 0.10],  # node 2 (leaf)
        [0.10, 0.70, 0.10, 0.10],  # node 3 (leaf)
        [0.50, 0.30, 0.10, 0.10],  # node 4: child 1 -> node 5
        [0.25, 0.25, 0.25, 0.25],  # node 5 (leaf)
    ], dtype=torch.float64)
    children = {0: {1: 1, 2: 4}, 1: {2: 2, 3: 3}, 4: {1: 5}}
    expected: dict[tuple[int, ...], float] = {}

    def walk(node, prefix, prob):
        for tok in range(vocab):
            p = prob * float(node_p[node, tok])
            nxt = children.get(node, {}).get(tok)
            if nxt is None:
                expected[prefix + (tok,)] = expected.get(prefix + (tok,), 0.0) + p
            else:
                walk(nxt, prefix + (tok,), p)

    walk(0, (), 1.0)
    assert math.isclose(sum(expected.values()), 1.0, rel_tol=1e-6)

    logits = node_p.log().float().expand(rows, -1, -1)
    big_beams = beams.expand(rows, -1, -1)
    acc = accept_rejection(big_beams, logits, tree.unpack.expand(rows, -1, -1), T1, torch.Generator().manual_seed(1))
    counts: dict[tuple[int, ...], int] = {}
    for r in range(rows):
        seq = tuple(acc.emitted(big_beams, r))
        counts[seq] = counts.get(seq, 0) + 1
    assert set(counts) <= set(expected), f"impossible emissions: {set(counts) - set(expected)}"
    stat = sum((counts.get(k, 0) - rows * p) ** 2 / (rows * p) for k, p in expected.items())
    df = len(expected) - 1
    assert min(expected.values()) * rows > 5
    assert chi2_sf(stat, df) > 1e-3, f"chi2={stat:.1f} df={df}"
    # The drafts are accepted with the target's own probability: P(first token 1 or 2) = 0.7.
    accepted_first = (acc.length > 0).double().mean().item()
    assert abs(accepted_first - 0.7) < 4 * math.sqrt(0.7 * 0.3 / rows)


def test_rejection_uses_the_sampling_filters():
    """With top_k = 1 the target law is a point mass: rejection acceptance == greedy."""
    beams, tree = doc_tree()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, V, generator=gen)
    cfg = SamplingConfig(temperature=1.3, top_k=1, seed=0)
    greedy = accept_greedy(beams, logits, tree.unpack)
    for seed in range(20):
        acc = accept_rejection(beams, logits, tree.unpack, cfg, torch.Generator().manual_seed(seed))
        assert acc.emitted(beams) == greedy.emitted(beams)


# -- typical acceptance --------------------------------------------------------------------------

def entropy(p: torch.Tensor) -> float:
    p = p.double()
    return float(-(p * p.clamp_min(1e-300).log()).sum())


def typical_setup(root_p: list[float], child_hi: int, child_lo: int, lp_hi: float = -1.0, lp_lo: float = -1.0):
    """Beams [[g0, child_hi], [g0, child_lo]] (L = 2); leaves give deterministic bonuses 5 / 4.
    Returns beams, logprobs, logits, unpack and the root's probabilities as the rule sees them."""
    vocab = len(root_p)
    g0 = 0
    beams = torch.tensor([[[g0, child_hi], [g0, child_lo]]])
    tree = pack_tree(beams, 3)
    assert tree.unpack[0].tolist() == [[0, 1], [0, 2]]
    root = torch.tensor(root_p).log()
    leaf_hi = torch.full((vocab,), NEG).index_fill(0, torch.tensor([5]), 0.0)
    leaf_lo = torch.full((vocab,), NEG).index_fill(0, torch.tensor([4]), 0.0)
    logits = torch.stack([root, leaf_hi, leaf_lo]).unsqueeze(0)  # (1, 3, V)
    logprobs = torch.tensor([[[lp_hi], [lp_lo]]])
    probs = logits_to_probs(logits[0, 0], T1)
    return beams, logprobs, logits, tree.unpack, probs


ROOT_P = [0.05, 0.10, 0.15, 0.20, 0.22, 0.28]  # children: 3 (p=0.20, beam 0) and 2 (p=0.15, beam 1)


def run_typical(beams, logprobs, logits, unpack, epsilon, delta, seed=0):
    return accept_typical(beams, logprobs, logits, unpack, T1, torch.Generator().manual_seed(seed), epsilon, delta)


@pytest.mark.parametrize("binding", ["epsilon", "delta"])
@pytest.mark.parametrize("offset,accepted", [(-1e-4, "hi"), (+1e-4, "none")])
def test_typical_threshold_just_above_and_below(binding, offset, accepted):
    """Threshold min(eps, delta * exp(-H)) set 1e-4 below / above p(child): accepted / rejected.
    Each branch of the min is made the binding one in turn."""
    beams, logprobs, logits, unpack, probs = typical_setup(ROOT_P, 3, 2)
    p_hi, p_lo, H = float(probs[3]), float(probs[2]), entropy(probs)
    tau = p_hi + offset
    if binding == "epsilon":
        epsilon, delta = tau, 100.0  # delta * exp(-H) >> 1
        assert delta * math.exp(-H) > 1.0
    else:
        epsilon, delta = 1.0, tau * math.exp(H)  # delta * exp(-H) == tau < 1
    assert p_lo < tau - 1e-2  # the other child is well below either way
    acc = run_typical(beams, logprobs, logits, unpack, epsilon, delta)
    if accepted == "hi":
        assert acc.beam.tolist() == [0] and acc.length.tolist() == [1] and acc.bonus.tolist() == [5]
    else:
        assert acc.length.tolist() == [0]


@pytest.mark.parametrize("binding", ["epsilon", "delta"])
def test_typical_between_children_accepts_only_the_likelier(binding):
    beams, logprobs, logits, unpack, probs = typical_setup(ROOT_P, 3, 2, lp_hi=-3.0, lp_lo=-0.1)
    H = entropy(probs)
    tau = (float(probs[3]) + float(probs[2])) / 2
    epsilon, delta = (tau, 100.0) if binding == "epsilon" else (1.0, tau * math.exp(H))
    acc = run_typical(beams, logprobs, logits, unpack, epsilon, delta)
    # Beam 1 has the higher drafter log-probability but its child is below the threshold.
    assert acc.beam.tolist() == [0] and acc.length.tolist() == [1] and acc.bonus.tolist() == [5]


@pytest.mark.parametrize("lp_hi,lp_lo,beam,bonus", [(-1.0, -0.5, 1, 4), (-0.5, -1.0, 0, 5)])
def test_typical_tie_broken_by_drafter_logprob(lp_hi, lp_lo, beam, bonus):
    """Both children accepted (same length 1): the beam with the higher drafter log-probability wins."""
    beams, logprobs, logits, unpack, probs = typical_setup(ROOT_P, 3, 2, lp_hi, lp_lo)
    tau = float(probs[2]) - 1e-2  # below both children
    acc = run_typical(beams, logprobs, logits, unpack, tau, 100.0)
    assert acc.beam.tolist() == [beam] and acc.length.tolist() == [1] and acc.bonus.tolist() == [bonus]


def test_typical_tie_broken_by_drafter_logprob_when_logprobs_are_low():
    beams, logprobs, logits, unpack, probs = typical_setup(ROOT_P, 3, 2, lp_hi=-40.0, lp_lo=-38.0)
    tau = float(probs[2]) - 1e-2  # below both children
    acc = run_typical(beams, logprobs, logits, unpack, tau, 100.0)
    assert acc.beam.tolist() == [1] and acc.length.tolist() == [1] and acc.bonus.tolist() == [4]


def test_typical_default_threshold_is_the_min_of_both_terms():
    """Defaults eps = 0.09, delta = 0.3. A flat distribution (delta * exp(-H) < eps) accepts a
    child eps alone would reject; a peaked one (eps < delta * exp(-H)) accepts a child the
    delta term alone would reject. The other child falls below the threshold each time."""
    eps, delta = 0.09, 0.3
    for root_p, hi, lo in (
        ([0.06, 0.03] + [0.91 / 6] * 6, 0, 1),  # flat: threshold = delta * exp(-H) ~ 0.041
        ([0.7, 0.1, 0.08, 0.05, 0.04, 0.03], 1, 2),  # peaked: threshold = eps (delta * exp(-H) ~ 0.103)
    ):
        beams, logprobs, logits, unpack, probs = typical_setup(root_p, hi, lo)
        H = entropy(probs)
        tau = min(eps, delta * math.exp(-H))
        p_hi, p_lo = float(probs[hi]), float(probs[lo])
        assert p_lo < tau < p_hi
        assert p_hi < max(eps, delta * math.exp(-H)), "the child must be rejected by the other term alone"
        acc = accept_typical(beams, logprobs, logits, unpack, T1, torch.Generator().manual_seed(0))
        assert acc.beam.tolist() == [0] and acc.length.tolist() == [1]
        swapped = beams[:, [1, 0]]
        acc = accept_typical(swapped, logprobs, logits[:, [0, 2, 1]], unpack, T1, torch.Generator().manual_seed(0))
        assert acc.beam.tolist() == [1] and acc.length.tolist() == [1]


def test_typical_longest_beats_drafter_logprob():
    """Beam 0 accepts two tokens with a poor drafter log-probability; beam 1 only one with a
    good one: the longer beam wins."""
    vocab = 8
    root_p = [0.05, 0.10, 0.15, 0.20, 0.22, 0.28, 0.0, 0.0]
    root_p = [p if p > 0 else 1e-6 for p in root_p]
    beams = torch.tensor([[[0, 3, 6], [0, 2, 7]]])
    tree = pack_tree(beams, 3)  # nodes 0:g0 1:(0,1)=3 2:(0,2)=6 3:(1,1)=2 4:(1,2)=7
    assert tree.unpack[0].tolist() == [[0, 1, 2], [0, 3, 4]]
    onehot = lambda t: torch.full((vocab,), NEG).index_fill(0, torch.tensor([t]), 0.0)  # noqa: E731
    logits = torch.stack([
        torch.tensor(root_p).log(),
        onehot(6),  # node 1 wants 6: beam 0's second draft accepted
        onehot(1),  # node 2 (leaf): bonus 1
        onehot(5),  # node 3 wants 5, not 7: beam 1 stops after one token
        onehot(0),
    ]).unsqueeze(0)
    logprobs = torch.tensor([[[-5.0, -5.0], [-0.1, -0.1]]])
    acc = accept_typical(beams, logprobs, logits, tree.unpack, T1, torch.Generator().manual_seed(0))
    assert acc.beam.tolist() == [0] and acc.length.tolist() == [2] and acc.bonus.tolist() == [1]
    assert acc.emitted(beams) == [3, 6, 1]


def test_typical_bonus_is_sampled_from_p():
    """With nothing accepted the bonus is a draw from p at g0 (not its argmax)."""
    rows = 20_000
    root_p = [0.05, 0.10, 0.15, 0.20, 0.22, 0.28]
    beams, logprobs, logits, unpack, probs = typical_setup(root_p, 3, 2)
    B = lambda t: t.expand(rows, *t.shape[1:])  # noqa: E731
    acc = accept_typical(B(beams), B(logprobs), B(logits), B(unpack), T1, torch.Generator().manual_seed(3),
                         epsilon=0.99, delta=100.0)  # threshold 0.99: nothing accepted
    assert (acc.length == 0).all()
    counts = torch.bincount(acc.bonus, minlength=6).double()
    expected = probs.double() * rows
    stat = float(((counts - expected) ** 2 / expected).sum())
    assert chi2_sf(stat, 5) > 1e-3, f"chi2={stat:.1f}"


def test_typical_greedy_sampling_falls_back_to_greedy():
    beams, tree = doc_tree()
    logits = torch.randn(1, 6, V, generator=torch.Generator().manual_seed(4))
    logits[0, 0, 8] = 10.0  # make sure something is accepted
    acc = accept_typical(beams, torch.zeros(1, 3, 2), logits, tree.unpack, SamplingConfig(), None)
    ref = accept_greedy(beams, logits, tree.unpack)
    for field in ("beam", "length", "bonus", "path"):
        assert torch.equal(getattr(acc, field), getattr(ref, field))


# -- logits_to_probs ---------------------------------------------------------------------------

def probs_of(p: list[float], **cfg) -> list[float]:
    out = logits_to_probs(torch.tensor(p).log(), SamplingConfig(**cfg))
    assert out.dtype == torch.float32
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-6)
    return out.tolist()


def approx(values):
    return pytest.approx(values, abs=1e-6)


def test_temperature():
    p = [1 / 7, 2 / 7, 4 / 7]
    assert probs_of(p, temperature=1.0) == approx(p)
    assert probs_of(p, temperature=0.5) == approx([1 / 21, 4 / 21, 16 / 21])
    r = math.sqrt(2)
    assert probs_of(p, temperature=2.0) == approx([1 / (3 + r), r / (3 + r), 2 / (3 + r)])


def test_top_k():
    p = [1 / 7, 2 / 7, 4 / 7]
    assert probs_of(p, temperature=1.0, top_k=2) == approx([0.0, 1 / 3, 2 / 3])
    assert probs_of(p, temperature=1.0, top_k=1) == approx([0.0, 0.0, 1.0])
    for k in (0, 3, 50):  # 0 disables, k >= V keeps everything
        assert probs_of(p, temperature=1.0, top_k=k) == approx(p)


# Shuffled, so the sort / scatter back to vocabulary order matters.
P4 = [0.15, 0.50, 0.05, 0.30]


@pytest.mark.parametrize("top_p,expected", [
    (1.0, P4),
    (0.96, P4),  # mass before the last token is 0.95 < 0.96: all kept
    (0.81, [0.15 / 0.95, 0.50 / 0.95, 0.0, 0.30 / 0.95]),  # 0.5 + 0.3 = 0.8 < 0.81: need a third
    (0.79, [0.0, 0.625, 0.0, 0.375]),  # 0.5 + 0.3 reaches 0.79: smallest set is two tokens
    (0.4, [0.0, 1.0, 0.0, 0.0]),  # the top token alone reaches 0.4
    (1e-6, [0.0, 1.0, 0.0, 0.0]),  # always at least one token
])
def test_top_p_keeps_smallest_set_reaching_top_p(top_p, expected):
    assert probs_of(P4, temperature=1.0, top_p=top_p) == approx(expected)


def test_top_p_applies_after_temperature():
    # T = 0.5 squares and renormalises: [0.0616, 0.6849, 0.0068, 0.2466]; the top two already
    # reach 0.9 (at T = 1 they hold 0.8 and a third token would be needed).
    sq = [p * p for p in P4]
    z = sq[1] + sq[3]
    assert probs_of(P4, temperature=0.5, top_p=0.9) == approx([0.0, sq[1] / z, 0.0, sq[3] / z])
    assert probs_of(P4, temperature=1.0, top_p=0.9) == approx([0.15 / 0.95, 0.50 / 0.95, 0.0, 0.30 / 0.95])


def test_top_k_then_top_p_on_the_renormalised_rest():
    # top_k = 2 leaves [0.625, 0.375]; then top_p = 0.6 is reached by the first alone
    # (transformers' warper order: top-p sees the renormalised top-k distribution).
    assert probs_of(P4, temperature=1.0, top_k=2, top_p=0.6) == approx([0.0, 1.0, 0.0, 0.0])
    assert probs_of(P4, temperature=1.0, top_k=2, top_p=0.7) == approx([0.0, 0.625, 0.0, 0.375])


def test_logits_to_probs_batched_and_low_precision():
    logits = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(temperature=0.8, top_k=5, top_p=0.7)
    out = logits_to_probs(logits, cfg)
    assert out.shape == (2, 3, 16) and out.dtype == torch.float32
    assert torch.allclose(out.sum(-1), torch.ones(2, 3))
    assert ((out > 0).sum(-1) <= 5).all() and ((out > 0).sum(-1) >= 1).all()
    for i, j in itertools.product(range(2), range(3)):  # rows are independent
        assert torch.allclose(out[i, j], logits_to_probs(logits[i, j], cfg), atol=1e-7)
    half = logits_to_probs(logits.to(torch.bfloat16), cfg)  # low-precision logits: float32 probabilities
    assert half.dtype == torch.float32 and torch.allclose(half.sum(-1), torch.ones(2, 3))


def test_choose_tokens_greedy_is_argmax():
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(choose_tokens(logits, SamplingConfig(), None), logits.argmax(-1))


# -- SamplingConfig validation -------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    {"temperature": -0.1},
    {"temperature": -1.0},
    {"top_k": -1},
    {"top_p": 0.0},
    {"top_p": -0.5},
    {"top_p": 1.01},
    {"top_p": 2.0},
    {"temperature": float("nan")},
])
def test_sampling_config_rejects_bad_values(kwargs):
    with pytest.raises(BadInputError):
        SamplingConfig(**kwargs)


def test_sampling_config_accepts_edges():
    assert SamplingConfig().greedy
    assert SamplingConfig(temperature=0.0, top_k=0, top_p=1.0).greedy
    cfg = SamplingConfig(temperature=1e-3, top_k=1, top_p=1e-9)
    assert not cfg.greedy
