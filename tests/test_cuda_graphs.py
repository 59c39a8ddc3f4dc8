"""CUDA graphs of the lean pass (cuda_graphs.py): the padded, full-span pass a graph captures gives
the eager pass's results, decoding through it is unchanged, and whatever cannot be graphed runs eagerly.

On the CPU the graph's pass runs without capture (`GraphedForward(capture=False)`): the same buckets,
padding, full-span mask and device-side lengths, so everything but the recording is tested here.
The last test replays real graphs where CUDA is present."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts, tiny_llama
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.cuda_graphs import BUCKETS, GraphedDraft, GraphedForward, bucket
from redraft_cli.tree_attention import pack_tree

from test_decode_greedy import OracleProposer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4, eos_token_id=None, max_positions=200)


@pytest.fixture
def graphed(target):
    """The target with a non-capturing GraphedForward for the test's duration."""
    target.graphs = GraphedForward(target.lean, capture=False)
    yield target
    target.graphs = None


def test_bucket_is_the_smallest_that_holds():
    assert [bucket(n) for n in (1, 2, 3, 5, 9, 12, 13, 33, 64)] == [1, 2, 4, 8, 12, 12, 16, 48, 64]
    assert bucket(BUCKETS[-1] + 1) is None


def _prefilled(target, prompt, capacity):
    P = len(prompt)
    cache = target.new_tree_cache(1, capacity)
    pos = torch.arange(P).view(1, P)
    target.lean.forward(torch.tensor([prompt]), pos, cache, torch.ones(1, P, P, dtype=torch.bool).tril())
    cache.commit(pos, torch.tensor([P]))
    return cache


def test_graph_pass_equals_eager_pass_on_a_padded_batched_tree(target):
    """Two rows of a batched tree (the second with padding nodes), 5 nodes padded to bucket 8: the
    real nodes' hidden states are the eager pass's, padding cells are 0, and the cache slots of the
    real nodes hold the same keys."""
    torch.manual_seed(0)
    tokens = torch.randint(0, target.vocab_size, (2, 2, 3))  # (B, W, L) beams
    tokens[:, :, 0] = tokens[:, :1, 0]  # every beam starts with the row's g0
    tokens[1, 1] = tokens[1, 0]  # row 1's beams coincide: fewer nodes, padding
    caches = []
    for _ in range(2):
        cache = target.new_tree_cache(2, 64)
        for b, p in enumerate(([3, 4, 5, 6], [7, 8])):
            row = _prefilled(target, p, 64)
            cache._keys[:, b, :, :64], cache._values[:, b, :, :64] = row._keys[:, 0], row._values[:, 0]
        cache.lengths = torch.tensor([4, 2])
        caches.append(cache)
    tree = pack_tree(tokens, caches[0].lengths)
    assert not bool(tree.valid.all()), "the test needs padding nodes"
    eager = target.lean.forward(tree.tokens, tree.positions, caches[0], tree.mask, tree.valid)
    runner = GraphedForward(target.lean, capture=False)
    out = runner(tree.tokens, tree.positions, caches[1], tree.mask, tree.valid)
    assert out is not None and out.shape == eager.shape and runner.passes == 1
    assert torch.allclose(out, eager, atol=1e-5)
    assert bool((out[~tree.valid] == 0).all())
    n = tree.tokens.shape[1]
    for b, length in enumerate((4, 2)):
        k = int(tree.valid[b].sum())
        assert torch.allclose(caches[1]._keys[:, b, :, length:length + k], caches[0]._keys[:, b, :, length:length + k],
                              atol=1e-5)
    assert n < 8 and bucket(n) == 8


def test_what_cannot_be_graphed_runs_eagerly(target):
    runner = GraphedForward(target.lean, capture=False)
    cache = _prefilled(target, list(range(1, 11)), 80)
    ids = torch.zeros(1, BUCKETS[-1] + 1, dtype=torch.long)
    pos = 10 + torch.arange(ids.shape[1]).view(1, -1)
    assert runner(ids, pos, cache, torch.ones(1, ids.shape[1], ids.shape[1], dtype=torch.bool).tril()) is None
    # 9 nodes fit the cache's 80 slots after 10 tokens, but their bucket of 12 would not after 70.
    cache.lengths = torch.tensor([70])
    nine = torch.ones(1, 9, 9, dtype=torch.bool).tril()
    assert runner(torch.zeros(1, 9, dtype=torch.long), 70 + torch.arange(9).view(1, 9), cache, nine) is None
    assert runner.passes == 0


def test_finished_caches_lend_their_buffers_to_the_next_generation(target):
    """Graphs are keyed by the cache's memory: a new cache of a known shape reuses the buffers of a
    finished one (never those of a cache still alive), and the pool stays small."""
    from redraft_cli.cuda_graphs import MAX_POOLED

    runner = GraphedForward(target.lean, capture=False)
    cpu = torch.device("cpu")
    a, b = (runner.new_cache(1, 256, torch.float32, cpu) for _ in range(2))
    assert a._keys.data_ptr() != b._keys.data_ptr()
    a.lengths = torch.tensor([17])
    ptr = a._keys.data_ptr()
    del a
    c = runner.new_cache(1, 256, torch.float32, cpu)
    assert c._keys.data_ptr() == ptr and c.lengths.tolist() == [0]
    assert runner.new_cache(2, 256, torch.float32, cpu)._keys.data_ptr() not in (ptr, b._keys.data_ptr())
    for capacity in (512, 768, 1024, 1280, 1536):
        runner.new_cache(1, capacity, torch.float32, cpu)
    assert len(runner._pool) <= MAX_POOLED
    assert {e[0].data_ptr() for e in runner._pool} >= {b._keys.data_ptr(), c._keys.data_ptr()}  # live ones stay


def test_prepare_captures_every_bucket_that_a_step_can_use(target):
    runner = GraphedForward(target.lean, capture=False)
    cache = _prefilled(target, list(range(1, 11)), 40)
    runner.prepare(cache, 20)  # trees of up to 20 nodes: buckets 1..24; all fit 10 + 24 <= 40
    assert sorted(key[-1] for key in runner.graphs) == [1, 2, 4, 8, 12, 16, 24]
    runner.prepare(cache, 200)  # 32 no longer fits 40 slots after 10: nothing past 24
    assert len(runner.graphs) == 7 and runner.passes == 7
    assert cache.lengths.tolist() == [10]


@pytest.mark.parametrize("mode", ["plain", "redraft"])
def test_decoding_through_the_graph_pass_is_unchanged(target, mode):
    prompts = random_prompts(3, target.vocab_size, seed=8, min_len=3, max_len=20)
    cfg = DecodeConfig(max_new_tokens=24, beam_width=3, beam_length=4, stop_on_eos=False)
    gen = Generator(target, proposer=OracleProposer(target, seed=1, oracle_beam=1))
    want = [gen.generate(p, cfg, mode).tokens for p in prompts]
    want_batch = gen.generate_batch(prompts, cfg, mode, slots=2).tokens  # continuous batching: rows join
    target.graphs = runner = GraphedForward(target.lean, capture=False)
    try:
        gen = Generator(target, proposer=OracleProposer(target, seed=1, oracle_beam=1))
        got = [gen.generate(p, cfg, mode).tokens for p in prompts]
        got_batch = gen.generate_batch(prompts, cfg, mode, slots=2).tokens
    finally:
        target.graphs = None
    assert got == want and got_batch == want_batch == want
    assert runner.passes > 0 and len(runner.graphs) > 1


def test_the_gpu_exact_path_through_graphs_keeps_greedy_output_identical():
    """A CUDA device's exact path (probed good counts up to invariance.CUDA_TOP, float64 attention
    scores), as the CPU can run it, under the graph's padded passes: ReDrafter's greedy output is
    plain decoding's, at batch 1 and in a batch."""
    from test_lean_llama import as_gpu_exact

    target = tiny_llama(seed=6, max_positions=200)
    as_gpu_exact(target.lean)
    target.graphs = GraphedForward(target.lean, capture=False)
    prompts = random_prompts(4, target.vocab_size, seed=3, min_len=3, max_len=40)
    cfg = DecodeConfig(max_new_tokens=30, beam_width=3, beam_length=5, stop_on_eos=False)
    gen = Generator(target, proposer=OracleProposer(target, seed=2, oracle_beam=0))
    plain = [gen.generate(p, cfg, "plain").tokens for p in prompts]
    fast = gen.generate_batch(prompts, cfg, "redraft", slots=3)
    assert fast.tokens == plain
    assert [gen.generate(p, cfg, "redraft").tokens for p in prompts] == plain
    assert sum(s.accepted for g in fast.rows for s in g.decode_steps) > 20


def test_graphed_draft_search_is_the_eager_search(target):
    """GraphedDraft's fixed-shape search (without capture here) returns draft_beams' beams, node
    beams trimmed to their depth; a beam length of 1 drafts nothing to graph."""
    from redraft_cli.beam_search import draft_beams
    from redraft_cli.cuda_graphs import GraphedDraft

    drafter = Drafter.for_target(target, seed=3)
    torch.manual_seed(1)
    h, g0 = torch.randn(2, target.hidden_size), torch.tensor([5, 9])
    graphed = GraphedDraft(drafter, capture=False)
    for W, L, nodes in ((3, 4, 0), (3, 4, 5), (2, 5, 1)):
        want, got = draft_beams(drafter, h, g0, W, L, nodes), graphed(h, g0, W, L, nodes)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logprobs, want.logprobs)
        assert not got.logprobs.requires_grad  # no autograd graph (none may be recorded into a CUDA graph)
    assert graphed(h, g0, 3, 1) is None


def test_a_capture_that_fails_turns_graphs_off_and_decoding_goes_on(graphed):
    """On a machine without CUDA the capture itself fails (no CUDA stream): the reason is kept and
    every pass runs eagerly, with the same output."""
    if torch.cuda.is_available():
        pytest.skip("the capture works here")
    target = graphed
    prompt = random_prompts(1, target.vocab_size, seed=2)[0]
    cfg = DecodeConfig(max_new_tokens=12, beam_width=2, beam_length=3)
    drafter = Drafter.for_target(target, seed=0)
    want = Generator(target, drafter).generate(prompt, cfg).tokens
    target.graphs = runner = GraphedForward(target.lean, capture=True)
    gen = Generator(target, drafter)
    gen.proposer.graphs = drafts = GraphedDraft(drafter, capture=True)
    got = gen.generate(prompt, cfg).tokens
    assert got == want
    assert runner.failed and runner.passes == 1 and not runner.graphs
    assert drafts.failed and not drafts.graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager_decoding(monkeypatch):
    """Graphs of the target's passes and of the drafter's search, replayed, decode what eager passes
    decode; caches of one shape reuse their buffers, so a second generation captures nothing new."""
    target = tiny_llama(seed=4, max_positions=200)
    target.model.to("cuda")
    from redraft_cli.target import Target

    target = Target(target.model, None, "tiny-cuda")
    assert target.graphs is not None
    prompts = random_prompts(2, target.vocab_size, seed=8, min_len=3, max_len=20)
    cfg = DecodeConfig(max_new_tokens=24, beam_width=3, beam_length=4, stop_on_eos=False)
    nodes = DecodeConfig(max_new_tokens=24, beam_width=3, beam_length=4, tree_nodes=5, stop_on_eos=False)
    drafter = Drafter.for_target(target, seed=0)
    gen = Generator(target, drafter)
    assert gen.proposer.graphs is not None
    runs = [(p, c, mode) for p in prompts for c, mode in ((cfg, "plain"), (cfg, "redraft"), (nodes, "redraft"))]
    got = [gen.generate(p, c, mode).tokens for p, c, mode in runs]
    runner, drafts = target.graphs, gen.proposer.graphs
    # Draft graphs: one per beam length drafted (the last steps of an answer draft shorter beams) and budget.
    assert runner.failed is None and runner.captures > 0 and drafts.failed is None and 2 <= drafts.captures <= 6
    target.graphs = None
    monkeypatch.setenv("REDRAFT_CUDA_GRAPHS", "0")
    eager = Generator(target, drafter)
    assert eager.proposer.graphs is None
    assert got == [eager.generate(p, c, mode).tokens for p, c, mode in runs]
    # One cache shape per path (plain, ReDrafter): one one-token graph each, for all 6 generations,
    # and another generation captures nothing new.
    assert sum(1 for key in runner.graphs if key[-1] == 1) <= 2
    target.graphs, captures = runner, (runner.captures, drafts.captures)
    gen.generate(prompts[0], cfg, "redraft")
    assert (runner.captures, drafts.captures) == captures
