"""Batched decoding: several prompts at once, each row identical to its batch-1 greedy output."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import random_prompts, tiny_llama
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.errors import BadInputError
from redraft_cli.sampling import SamplingConfig

from test_decode_greedy import OracleProposer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eos_target():
    # An EOS token the random model emits now and then: rows finish at different steps.
    return tiny_llama(eos_token_id=5, seed=3, max_positions=96)


def test_batch_rows_equal_batch_one(eos_target):
    target = eos_target
    prompts = random_prompts(5, target.vocab_size, seed=21, min_len=2, max_len=30)
    cfg = DecodeConfig(max_new_tokens=40, beam_width=3, beam_length=4)
    # Make EOS a token that some rows produce early and others never: rows finish at different steps.
    free = Generator(target).generate_batch(prompts, DecodeConfig(max_new_tokens=40, stop_on_eos=False), "plain")
    firsts = {tok for row in free.tokens for tok in row[5:15]}
    eos = min(firsts, key=lambda tok: sum(tok in row for row in free.tokens))
    target.eos_ids = frozenset({eos})
    for gen in (Generator(target, Drafter.for_target(target, seed=1)),
                Generator(target, proposer=OracleProposer(target, seed=2, oracle_beam=1))):
        singles = [gen.generate(p, cfg, "plain").tokens for p in prompts]
        plain = gen.generate_batch(prompts, cfg, "plain")
        fast = gen.generate_batch(prompts, cfg, "redraft")
        assert plain.tokens == singles
        assert fast.tokens == singles
        assert len({len(t) for t in singles}) > 1, "rows must finish at different steps"
        # One target pass per step for all rows: far fewer passes than tokens.
        assert plain.passes == max(len(t) for t in singles)
        assert fast.passes <= plain.passes


def test_batch_accepts_drafts_and_respects_context(eos_target):
    target = eos_target
    gen = Generator(target, proposer=OracleProposer(target, seed=0, oracle_beam=0))
    prompts = [[i % 60 + 1 for i in range(89)], [7, 8], [9] * 40]  # the first row runs into the 96-token context
    cfg = DecodeConfig(max_new_tokens=30, beam_width=2, beam_length=5, stop_on_eos=False)
    out = gen.generate_batch(prompts, cfg, "redraft")
    assert [len(t) for t in out.tokens] == [96 - 89, 30, 30]
    assert out.tokens == [gen.generate(p, cfg, "plain").tokens for p in prompts]
    assert sum(s.accepted for g in out.rows for s in g.decode_steps) > 0


def test_batch_sampling_runs_each_row_to_its_budget(tiny_target):
    gen = Generator(tiny_target, Drafter.for_target(tiny_target, seed=0))
    prompts = random_prompts(3, tiny_target.vocab_size, seed=5)
    for accept in ("rejection", "typical"):
        cfg = DecodeConfig(max_new_tokens=12, accept=accept, sampling=SamplingConfig(temperature=0.8, seed=3),
                           stop_on_eos=False)
        out = gen.generate_batch(prompts, cfg, "redraft")
        assert [len(t) for t in out.tokens] == [12, 12, 12]
        assert gen.generate_batch(prompts, cfg, "redraft").tokens == out.tokens, "seeded runs reproduce"
        refilled = gen.generate_batch(prompts, cfg, "redraft", slots=2)
        assert [len(t) for t in refilled.tokens] == [12, 12, 12]
        assert gen.generate_batch(prompts, cfg, "redraft", slots=2).tokens == refilled.tokens


def test_batch_needs_the_lean_path(tiny_target, monkeypatch):
    lean, tiny_target.lean = tiny_target.lean, None
    try:
        with pytest.raises(BadInputError, match="batched decoding needs a Llama-family"):
            Generator(tiny_target).generate_batch([[1, 2], [3]], DecodeConfig(max_new_tokens=2), "plain")
        monkeypatch.setenv("REDRAFT_GENERIC", "1")  # (battery 31: it said a 'llama' was not Llama-family)
        with pytest.raises(BadInputError, match="REDRAFT_GENERIC=1 puts tiny-llama-v64 on the generic Hugging Face path"):
            Generator(tiny_target).generate_batch([[1, 2], [3]], DecodeConfig(max_new_tokens=2), "plain")
        monkeypatch.delenv("REDRAFT_GENERIC")
        # One row still works on the generic path.
        assert len(Generator(tiny_target).generate_batch([[1, 2]], DecodeConfig(max_new_tokens=3), "plain").tokens[0]) == 3
    finally:
        tiny_target.lean = lean


def _tokens_by_row(passes, n):
    rows = [[] for _ in range(n)]
    for out in passes:
        for row, st in out:
            rows[row] += st.tokens
    return rows


@pytest.mark.parametrize("mode", ["plain", "redraft"])
def test_continuous_batching_refills_free_slots(eos_target, mode):
    """7 prompts through 3 slots: a finished row's slot goes to the next prompt while the others
    go on decoding, at most 3 rows take part in a pass, and every row is its batch-1 output.
    Some prompts run into the 96-token context, so rows finish at different steps on both paths."""
    target = eos_target
    prompts = random_prompts(7, target.vocab_size, seed=8, min_len=2, max_len=30)
    prompts[1] = random_prompts(1, target.vocab_size, seed=9, min_len=88, max_len=88)[0]
    prompts[4] = random_prompts(1, target.vocab_size, seed=10, min_len=75, max_len=75)[0]
    budgets = DecodeConfig(max_new_tokens=30, beam_width=3, beam_length=4, stop_on_eos=False)
    gen = Generator(target, proposer=OracleProposer(target, seed=2, oracle_beam=1))
    singles = [gen.generate(p, budgets, "plain").tokens for p in prompts]
    loop = gen.redraft_batch if mode == "redraft" else gen.plain_batch
    for cfg in (budgets, replace(budgets, max_new_tokens=12)):
        passes = list(loop(prompts, cfg, slots=3))
        assert _tokens_by_row(passes, len(prompts)) == [s[: cfg.max_new_tokens] for s in singles]
        assert max(len(out) for out in passes) == 3
        admitted = [[row for row, _ in out] for out in passes if out[0][1].prefill]
        assert sorted(r for group in admitted for r in group) == list(range(7)) and admitted[0] == [0, 1, 2]
        # A row admitted later decodes in the same pass as a row admitted before it.
        group_of = {row: i for i, group in enumerate(admitted) for row in group}
        assert any(len({group_of[row] for row, _ in out}) > 1 for out in passes if not out[0][1].prefill)


def test_continuous_batching_with_eos_and_a_real_drafter(eos_target):
    target = eos_target
    prompts = random_prompts(6, target.vocab_size, seed=21, min_len=2, max_len=30)
    free = Generator(target).generate_batch(prompts, DecodeConfig(max_new_tokens=40, stop_on_eos=False), "plain")
    firsts = {tok for row in free.tokens for tok in row[3:12]}
    eos = min(firsts, key=lambda tok: sum(tok in row for row in free.tokens))
    target.eos_ids = frozenset({eos})
    gen = Generator(target, Drafter.for_target(target, seed=1))
    cfg = DecodeConfig(max_new_tokens=40, beam_width=2, beam_length=3, lookup_beams=1, lookup_length=6)
    singles = [gen.generate(p, cfg, "plain").tokens for p in prompts]
    assert len({len(t) for t in singles}) > 1
    done = []
    for mode in ("plain", "redraft"):
        out = gen.generate_batch(prompts, cfg, mode, slots=2, on_row_done=lambda row, g: done.append((row, len(g.tokens))))
        assert out.tokens == singles
        assert all(g.seconds <= out.seconds for g in out.rows)
    assert sorted(done) == sorted([(r, len(t)) for r, t in enumerate(singles)] * 2)


def test_continuous_batching_bad_slots_and_generic_path(tiny_target):
    gen = Generator(tiny_target)
    with pytest.raises(BadInputError, match="at least one slot"):
        gen.generate_batch([[1, 2]], DecodeConfig(max_new_tokens=2), "plain", slots=0)
    prompts = random_prompts(3, tiny_target.vocab_size, seed=2)
    cfg = DecodeConfig(max_new_tokens=5, stop_on_eos=False)
    singles = [gen.generate(p, cfg, "plain").tokens for p in prompts]
    # Every row finishing in its prefill pass: the slots refill until no prompt waits.
    fast = Generator(tiny_target, Drafter.for_target(tiny_target, seed=0))
    for g, mode in ((gen, "plain"), (fast, "redraft")):
        one = g.generate_batch(prompts, DecodeConfig(max_new_tokens=1), mode, slots=2)
        assert one.tokens == [s[:1] for s in singles] and one.passes == 2, mode
    lean, tiny_target.lean = tiny_target.lean, None
    try:  # one slot: the generic (one-row) path decodes the prompts one after another
        assert gen.generate_batch(prompts, cfg, "plain", slots=1).tokens == singles
    finally:
        tiny_target.lean = lean


def test_batch_runs_stepped_in_turn_keep_their_own_time(eos_target):
    """Two BatchRuns stepped pass for pass (bench's plain and ReDrafter at --batch-size) decode what
    generate_batch decodes, and each clock counts only its own passes."""
    import time

    from redraft_cli.decode import BatchRun

    target = eos_target
    prompts = random_prompts(5, target.vocab_size, seed=12, min_len=2, max_len=30)
    cfg = DecodeConfig(max_new_tokens=20, beam_width=2, beam_length=3, stop_on_eos=False)
    fast_gen = Generator(target, proposer=OracleProposer(target, seed=4, oracle_beam=1))
    runs = [BatchRun(Generator(target), prompts, cfg, "plain", 2), BatchRun(fast_gen, prompts, cfg, "redraft", 2)]
    start = time.perf_counter()
    rounds = 0
    while any([r.step() for r in runs]):
        rounds += 1
    wall = time.perf_counter() - start
    plain, fast = (r.result() for r in runs)
    assert plain.tokens == fast.tokens == Generator(target).generate_batch(prompts, cfg, "plain", slots=2).tokens
    assert rounds == max(plain.passes, fast.passes) and fast.passes < plain.passes
    assert 0 < plain.seconds and 0 < fast.seconds and plain.seconds + fast.seconds <= wall
    assert all(0 < g.seconds <= plain.seconds for g in plain.rows)
    assert not runs[0].step() and runs[0].result().passes == plain.passes  # a finished run stays finished


@pytest.mark.parametrize("stop_at", [40, 10_000])
def test_bench_at_a_batch_size_keeps_the_prompts_both_paths_finished_on_ctrl_c(eos_target, monkeypatch, stop_at):
    """A Ctrl-C during `bench --batch-size B`: the prompts both paths had finished are the result (marked
    interrupted), their tokens identical; before any had finished it is an interruption with nothing to report.
    stop_at 10_000: a Ctrl-C in the HF baseline after both paths finished keeps them, without the baseline."""
    from redraft_cli import bench
    from redraft_cli.decode import BatchRun

    target = eos_target
    prompts = random_prompts(6, target.vocab_size, seed=12, min_len=2, max_len=30)
    cfg = bench.BenchConfig(DecodeConfig(max_new_tokens=12, beam_width=2, beam_length=3), warmup=False,
                            hf_baseline=True, batch_size=2)
    real_step, steps = BatchRun.step, []

    def step(self):
        steps.append(1)
        if len(steps) == stop_at:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(BatchRun, "step", step)
    if stop_at == 10_000:
        monkeypatch.setattr(bench, "hf_generate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    gen = Generator(target, proposer=OracleProposer(target, seed=4, oracle_beam=1))
    result = bench.run_bench(gen, prompts, cfg)
    assert result["interrupted"] and result["prompts_asked"] == 6
    assert 0 < result["num_prompts"] == len(result["per_prompt"]) <= 6
    assert result["identical_outputs"] == result["num_prompts"]
    assert "baseline_hf" not in result and result["baseline"]["tokens"] > 0
    if stop_at == 10_000:
        assert result["num_prompts"] == 6
    steps.clear()
    monkeypatch.setattr(BatchRun, "step", lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        bench.run_bench(gen, prompts, cfg)


def test_a_prompt_prefills_the_same_bits_whatever_shares_its_batch():
    # A 300-token partner pads a batched pass past the 256 tokens up to which attention is the
    # batch-invariant kind: the short prompt's prefill must still be its batch-1 prefill, bit for bit
    # (a batched pass gave it the fused kernel's rounding, and SmolLM2 in bfloat16 another answer).
    target = tiny_llama(seed=4, max_positions=400)
    gen = Generator(target, Drafter.for_target(target, seed=0))
    short, long = random_prompts(2, target.vocab_size, seed=8, min_len=5, max_len=5)[0], list(range(1, 301))
    long = [t % (target.vocab_size - 1) + 1 for t in long]
    cfg = DecodeConfig(max_new_tokens=8)
    alone = {}
    for name, prompt in (("short", short), ("long", long)):
        cache = target.new_tree_cache(1, 320)
        h, g0, _, _ = gen._prefill([prompt], cfg, None, cache)
        alone[name] = (h[0], g0[0], cache.keys[:, 0, :, : len(prompt)].clone())
    for order in (("short", "long"), ("long", "short")):
        prompts = [short if name == "short" else long for name in order]
        cache = target.new_tree_cache(2, 320)
        h, g0, stats, _ = gen._prefill(prompts, cfg, None, cache)
        assert cache.lengths.tolist() == [len(p) for p in prompts]
        assert [s.tree_nodes for s in stats] == [len(p) for p in prompts]
        for b, name in enumerate(order):
            assert torch.equal(h[b], alone[name][0]) and int(g0[b]) == int(alone[name][1])
            assert torch.equal(cache.keys[:, b, :, : len(prompts[b])], alone[name][2])
    assert gen.generate_batch([short, long], cfg, "redraft").tokens == [gen.generate(p, cfg, "plain").tokens
                                                                       for p in (short, long)]
