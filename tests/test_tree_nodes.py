"""Node budget (`tree_nodes`): the N most likely nodes of a beam search, as a tree.

The pruned tree is checked against a naive Python search that lists every
prefix the beam search kept with its running log-probability, on a stub
drafter (a hand-worked example) and a seeded random drafter; decoding with it
stays lossless and the simulator still equals real decoding.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import random_prompts
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.beam_search import check_beam_shape, draft_beams
from redraft_cli.errors import BeamShapeError
from redraft_cli.sampling import SamplingConfig
from redraft_cli.tree_attention import pack_tree
from test_beam_search import _inputs, _step_logp, _stub_drafter


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _kept_prefixes(drafter: Drafter, h: torch.Tensor, g0: int, W: int, L: int) -> list[tuple[float, tuple[int, ...]]]:
    """Every prefix a naive W x L beam search keeps at any step, with its running log-probability."""
    vocab = drafter.draft_vocab.tolist() if drafter.draft_vocab is not None else list(range(drafter.draft_vocab_size))
    hyps = [(torch.zeros((), dtype=torch.float32), [g0])]
    kept = []
    for _ in range(L - 1):
        cands = []
        for p, (score, toks) in enumerate(hyps):
            totals = (score + _step_logp(drafter, h, toks)).tolist()
            cands += [(totals[v], p, v) for v in range(len(vocab))]
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        hyps = [(torch.tensor(t, dtype=torch.float32), hyps[p][1] + [vocab[v]]) for t, p, v in cands[:W]]
        kept += [(float(s), tuple(t)) for s, t in hyps]
    return kept


def _nodes(beams: torch.Tensor) -> set[tuple[int, ...]]:
    """The distinct drafted prefixes (g0 left out) of beams (W, L), PAD (-1) ending a beam."""
    out = set()
    for beam in beams.tolist():
        beam = [t for t in beam if t >= 0]
        out |= {tuple(beam[: k + 1]) for k in range(1, len(beam))}
    return out


def test_hand_worked_example_with_stub_drafter():
    # The stub of test_beam_search: g0 = 0, W = 2, L = 3. Kept prefixes and their running log-probabilities:
    # [0, 1] log .6 = -0.51, [0, 2] log .25 = -1.39; then [0, 2, 3] -1.45, [0, 1, 0] -1.71.
    stub = _stub_drafter([
        [0.10, 0.60, 0.25, 0.05],
        [0.30, 0.25, 0.25, 0.20],
        [0.02, 0.02, 0.02, 0.94],
        [0.25, 0.25, 0.25, 0.25],
    ])
    out = draft_beams(stub, torch.zeros(1, 1), torch.tensor([0]), 2, 3, tree_nodes=3)
    assert out.tokens.tolist() == [[[0, 1, -1], [0, 2, -1], [0, 2, 3]]]
    expected = [[[math.log(0.6), 0.0], [math.log(0.25), 0.0], [math.log(0.25), math.log(0.94)]]]
    torch.testing.assert_close(out.logprobs, torch.tensor(expected), rtol=0, atol=1e-6)
    # Two nodes, both at depth 1: the tree is one level deep, so the beams are cut to length 2.
    two = draft_beams(stub, torch.zeros(1, 1), torch.tensor([0]), 2, 3, tree_nodes=2)
    assert two.tokens.tolist() == [[[0, 1], [0, 2]]]


@pytest.mark.parametrize("W,L,N", [(4, 5, 6), (3, 4, 9), (8, 4, 5), (2, 6, 1)])
def test_best_nodes_match_a_naive_search(tiny_target, W, L, N):
    drafter = Drafter.for_target(tiny_target, seed=3)
    h, g0 = _inputs(tiny_target, 3, seed=W * 100 + L * 10 + N)
    out = draft_beams(drafter, h, g0, W, L, tree_nodes=N)
    assert out.tokens.shape[:2] == (3, N) and out.logprobs.shape[-1] == out.tokens.shape[-1] - 1
    tree = pack_tree(out.tokens, 0)
    assert tree.num_nodes.tolist() == [N + 1] * 3, "N distinct drafted nodes plus g0"
    for b in range(3):
        kept = sorted(_kept_prefixes(drafter, h[b], int(g0[b]), W, L), key=lambda c: -c[0])
        got = _nodes(out.tokens[b])
        assert got == {t for _, t in kept[:N]} or kept[N - 1][0] == kept[N][0], f"row {b}: not the N best nodes"
        assert all(t[:-1] in got for t in got if len(t) > 2), f"row {b}: the kept set is not prefix-closed"
        # Each beam's log-probabilities sum to its node's running score.
        scores = dict((t, s) for s, t in kept)
        for beam, lp in zip(out.tokens[b].tolist(), out.logprobs[b]):
            node = tuple(t for t in beam if t >= 0)
            assert math.isclose(float(lp.sum()), scores[node], abs_tol=1e-4)


def test_all_nodes_hold_every_beam_and_rows_are_independent(tiny_target):
    drafter = Drafter.for_target(tiny_target, seed=4)
    W, L = 3, 4
    h, g0 = _inputs(tiny_target, 4, seed=7)
    plain = draft_beams(drafter, h, g0, W, L)
    full = draft_beams(drafter, h, g0, W, L, tree_nodes=W * (L - 1))
    some = draft_beams(drafter, h, g0, W, L, tree_nodes=4)
    for b in range(4):
        assert _nodes(plain.tokens[b]) <= _nodes(full.tokens[b]), "every beam's nodes are among the kept ones"
        alone = draft_beams(drafter, h[b : b + 1], g0[b : b + 1], W, L, tree_nodes=4)
        assert _nodes(alone.tokens[0]) == _nodes(some.tokens[b]), f"row {b} depends on the other rows"


@pytest.mark.parametrize("W,L,N", [(2, 4, 7), (1, 1, 1), (4, 3, -1)])
def test_impossible_node_budgets_are_rejected(W, L, N):
    with pytest.raises(BeamShapeError, match="--nodes"):
        check_beam_shape(W, L, tree_nodes=N)
    with pytest.raises(BeamShapeError, match="--nodes"):
        DecodeConfig(beam_width=W, beam_length=L, tree_nodes=N)


@pytest.mark.parametrize("accept", ["greedy", "rejection", "typical"])
def test_decoding_with_a_node_budget_stays_identical(tiny_target, accept):
    drafter = Drafter.for_target(tiny_target, seed=1)
    gen = Generator(tiny_target, drafter)
    sampling = {} if accept == "greedy" else {"sampling": SamplingConfig(temperature=0.8, seed=5)}
    cfg = DecodeConfig(max_new_tokens=24, beam_width=4, beam_length=5, tree_nodes=6, lookup_beams=1,
                       lookup_length=7, stop_on_eos=False, accept=accept, **sampling)
    prompts = random_prompts(6, tiny_target.vocab_size, seed=12)
    out = gen.generate_batch(prompts, cfg, "redraft")
    steps = [s for g in out.rows for s in g.decode_steps]
    assert all(len(g.tokens) == 24 for g in out.rows)
    assert max(s.tree_nodes for s in steps) <= 1 + 6 + 6, "g0, 6 drafted nodes and one lookup beam's 6"
    if accept == "greedy":
        assert out.tokens == [gen.generate(p, cfg, "plain").tokens for p in prompts]


def test_the_drafters_budget_comes_only_with_its_beam_shape(tiny_target):
    from redraft_cli.cli.common import decode_config, with_drafter_shape
    from redraft_cli.errors import BadInputError

    drafter = Drafter.for_target(tiny_target, seed=0, beam_width=8, beam_length=5, tree_nodes=10)
    assert with_drafter_shape(DecodeConfig(), drafter, None, None).tree_nodes == 10
    # A shape of the user's own: every beam (the budget was chosen for 8x5), unless --nodes says otherwise.
    assert with_drafter_shape(DecodeConfig(), drafter, 2, None).tree_nodes == 0
    assert with_drafter_shape(DecodeConfig(), drafter, 2, 4, nodes=3).tree_nodes == 3
    # Before the drafter loads its shape is unknown: the budget is checked against the drafter's 8x5 after.
    cfg = decode_config(64, None, None, "greedy", 0.0, 0, 1.0, 0, nodes=30)
    assert with_drafter_shape(cfg, drafter, None, None, nodes=30).tree_nodes == 30
    with pytest.raises(BadInputError, match="--nodes 33: a 8x5 beam search drafts 32"):
        with_drafter_shape(cfg, drafter, None, None, nodes=33)
    with pytest.raises(BadInputError, match="--nodes must be >= 0"):
        decode_config(64, None, None, "greedy", 0.0, 0, 1.0, 0, nodes=-1)


def test_sweep_caps_the_budget_per_cell_and_recipes_check_it_on_load():
    from redraft_cli.distill.recipe import recipe_from_dict
    from redraft_cli.errors import BadInputError
    from redraft_cli.sweep import SweepConfig

    cfg = SweepConfig(beam_widths=[1, 4], beam_lengths=[2, 5], tree_nodes=[6, 0, 3, 6])
    # Budgets capped at the W*(L-1) tokens a cell drafts; those that cap alike run once, and the full
    # budget of a one-beam cell or of one draft step (length 2: 4x2 keeps all 4) does not run again beside 0.
    assert cfg.shapes == [(1, 2, 0), (1, 5, 0), (1, 5, 3), (4, 2, 0), (4, 2, 3),
                          (4, 5, 0), (4, 5, 3), (4, 5, 6)]
    with pytest.raises(BadInputError, match="--nodes must be >= 0"):
        SweepConfig(tree_nodes=[-1])
    assert recipe_from_dict({"beam": {"width": 8, "length": 5, "nodes": 12}}).beam.decode_config().tree_nodes == 12
    with pytest.raises(BadInputError, match="beam.nodes 40"):
        recipe_from_dict({"beam": {"width": 8, "length": 5, "nodes": 40}})


def test_chat_sets_the_budget(tiny_target):
    from redraft_cli.chat import ChatSession
    from redraft_cli.errors import BadInputError

    session = ChatSession(Generator(tiny_target, Drafter.for_target(tiny_target, seed=0)),
                          DecodeConfig(beam_width=4, beam_length=4))
    assert session.set("nodes", "5") == "nodes = 5" and session.cfg.tree_nodes == 5
    with pytest.raises(BadInputError, match="^nodes 13"):
        session.set("nodes", "13")
    assert session.cfg.tree_nodes == 5


def test_a_sweep_over_budgets_marks_the_best_cell_and_plots_it(tiny_target, tmp_path):
    from redraft_cli.cli.sweep import render
    from redraft_cli.plots import _grid, _labels, save_sweep_plot
    from redraft_cli.sweep import SweepConfig, csv_rows, run_sweep

    drafter = Drafter.for_target(tiny_target, seed=0)
    cfg = SweepConfig(beam_widths=[2], beam_lengths=[3], tree_nodes=[0, 2], decode=DecodeConfig(max_new_tokens=6),
                      warmup=False)
    result = run_sweep(Generator(tiny_target, drafter), random_prompts(1, tiny_target.vocab_size), cfg)
    assert [(c["beam_width"], c["beam_length"], c["tree_nodes"]) for c in result["cells"]] == [(2, 3, 0), (2, 3, 2)]
    assert result["tree_nodes"] == [0, 2] and all(c["identical_outputs"] == 1 for c in result["cells"])
    assert [r["best"] for r in csv_rows(result)].count(1) == 1
    fastest = max(result["cells"], key=lambda c: c["speedup"])
    assert _grid(result, "speedup") == [[fastest["speedup"]]]
    assert _labels(result) == [[f"\nbest {fastest['tree_nodes']}" if fastest["tree_nodes"] else "\nall"]]
    info = {**result, "model": "tiny", "drafter": "random"}
    table = render(info, cfg.shapes, result["cells"], final=True)
    assert [col.header for col in table.columns][:3] == ["width", "length", "best"]
    assert save_sweep_plot(info, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
