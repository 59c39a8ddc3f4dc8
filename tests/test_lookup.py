"""Context lookup beams: n-gram matches in the sequence so far, appended beside the drafted beams."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.beam_search import DraftBeams
from redraft_cli.errors import BadInputError
from redraft_cli.lookup import continuation, copy_length, find_matches, lookup_beams, with_lookup_beams
from redraft_cli.sampling import SamplingConfig
from redraft_cli.tree_attention import pack_tree
from redraft_cli.verify import accept_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_worked_example():
    # The module docstring's example: a 2-token match, copied with its period once the sequence ends.
    tokens, found = lookup_beams([[5, 8, 2, 9, 7, 5, 8]], num_beams=1, beam_length=32)
    assert found.tolist() == [[True]]
    assert tokens.tolist() == [[[8, 2, 9, 7, 5, 8, 2, 9]]]  # copy_length(2) = 8
    tokens, _ = lookup_beams([[5, 8, 2, 9, 7, 5, 8]], num_beams=1, beam_length=4)
    assert tokens.tolist() == [[[8, 2, 9, 7]]]


def test_longest_match_then_most_recent_and_distinct():
    seq = [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]
    positions, match = find_matches(torch.tensor(seq))
    # 3 sits at 2 (preceded by 1, 2: all three match) and at 6 (preceded by 2, not 1): the older, longer match first.
    assert positions.tolist() == [2, 6] and match.tolist() == [3, 2]
    tokens, found = lookup_beams([seq], num_beams=3, beam_length=3)
    assert tokens[0, :2].tolist() == [[3, 4, 9], [3, 5, 6]]
    assert found.tolist() == [[True, True, False]]
    assert tokens[0, 2].tolist() == [3, -1, -1]  # not found: g0 and padding, for the caller to replace
    # Equal matches: the most recent first; a copy that an earlier beam already holds is skipped.
    positions, match = find_matches(torch.tensor([7, 1, 5, 7, 1, 5, 7, 9, 5]))
    assert positions.tolist() == [5, 2] and match.tolist() == [1, 1]
    tokens, found = lookup_beams([[7, 1, 5, 7, 1, 5, 7, 9, 5]], num_beams=2, beam_length=3)
    assert tokens[0, 0].tolist() == [5, 7, 9] and found.tolist() == [[True, True]]
    assert tokens[0, 1].tolist() == [5, 7, 1]
    tokens, found = lookup_beams([[3, 4, 3, 4, 3]], num_beams=2, beam_length=5)
    assert tokens[0, 0].tolist() == [3, 4, 3, 4, 3] and found.tolist() == [[True, False]]  # [3, 4, ...] again: skipped


def test_copy_length_grows_with_the_match():
    assert [copy_length(m, 32) for m in (1, 2, 5, 14, 40)] == [6, 8, 14, 32, 32]
    assert copy_length(9, 8) == 8
    # A 1-token match is a guess: a short copy.
    tokens, _ = lookup_beams([[4, 5, 6, 7, 8, 9, 10, 11, 4]], num_beams=1, beam_length=32)
    assert tokens.tolist() == [[[4, 5, 6, 7, 8, 9]]]
    # A loop: the latest match runs back to the start (6 tokens), and the copy wraps with period 2.
    loop = [1, 2, 1, 2, 1, 2, 1, 2]
    positions, match = find_matches(torch.tensor(loop))
    assert positions.tolist()[0] == 5 and match.tolist()[0] == 6
    tokens, _ = lookup_beams([loop], num_beams=1, beam_length=32)
    assert tokens[0, 0].tolist() == [2] + [1, 2] * 7 + [1]  # copy_length(6) = 16
    assert continuation(torch.tensor(loop), 5, 5).tolist() == [1, 2, 1, 2, 1]


def test_no_match_and_short_sequences():
    tokens, found = lookup_beams([[1, 2, 3], [7], [4, 4]], num_beams=2, beam_length=3)
    assert found.tolist() == [[False, False], [False, False], [True, False]]
    assert tokens[:, 0, 0].tolist() == [3, 7, 4]
    assert tokens[2, 0].tolist() == [4, 4, 4]  # period 1: the copy repeats the token
    tokens, found = lookup_beams([[1, 2, 3]], num_beams=1, beam_length=3)
    assert tokens.shape == (1, 1, 1) and not found.any()  # nothing found: only g0
    tokens, found = lookup_beams([[4, 4, 4, 4]], num_beams=1, beam_length=3)
    assert found.tolist() == [[True]] and tokens.tolist() == [[[4, 4, 4]]]


def test_with_lookup_beams_appends_and_falls_back():
    drafted = DraftBeams(torch.tensor([[[8, 1, 1], [8, 2, 2]], [[6, 3, 3], [6, 4, 4]]]), torch.full((2, 2, 2), -1.0))
    out = with_lookup_beams(drafted, [[5, 8, 2, 9, 5, 8], [1, 6]], num_beams=1)
    assert out.tokens.shape == (2, 3, 3) and out.logprobs.shape == (2, 3, 2)
    assert out.tokens[0, 2].tolist() == [8, 2, 9]  # found
    assert out.tokens[1, 2].tolist() == [6, 3, 3]  # not found: a copy of the first drafted beam
    assert out.logprobs[:, 2].eq(0).all()
    assert with_lookup_beams(drafted, [[1], [2]], 0) is drafted


def test_decoding_with_lookup_stays_identical(tiny_target):
    gen = Generator(tiny_target, Drafter.for_target(tiny_target, seed=0))
    cfg = DecodeConfig(max_new_tokens=24, beam_width=2, beam_length=4, lookup_beams=2, stop_on_eos=False)
    prompts = [p * 3 for p in random_prompts(4, tiny_target.vocab_size, seed=2, min_len=2, max_len=5)]
    out = gen.generate_batch(prompts, cfg, "redraft")
    assert out.tokens == [gen.generate(p, cfg, "plain").tokens for p in prompts]
    assert max(s.tree_nodes for g in out.rows for s in g.decode_steps) <= (2 + 2) * 4
    with pytest.raises(BadInputError, match="--lookup"):
        DecodeConfig(lookup_beams=-1)


def test_lookup_beams_longer_than_drafted_pad_the_drafted_ones():
    drafted = DraftBeams(torch.tensor([[[7, 3, 4]]]), torch.full((1, 1, 2), -1.0))
    out = with_lookup_beams(drafted, [[7, 3, 9, 9, 2, 5, 7]], num_beams=1, length=5)
    # The docstring's worked example: the lookup beam follows the 1-gram [7] at position 0.
    assert out.tokens.tolist() == [[[7, 3, 4, -1, -1], [7, 3, 9, 9, 2]]]
    assert out.logprobs.shape == (1, 2, 4) and out.logprobs[0, 0].tolist() == [-1.0, -1.0, 0.0, 0.0]
    tree = pack_tree(out.tokens, 10)
    assert tree.tokens.tolist() == [[7, 3, 4, 9, 9, 2]]
    assert tree.depth.tolist() == [[0, 1, 2, 2, 3, 4]]
    assert tree.mask[0, 5].tolist() == [True, True, False, True, True, True]
    # Shorter lookup beams are padded instead, and a miss copies the (padded) first drafted beam.
    out = with_lookup_beams(DraftBeams(torch.tensor([[[7, 3, 4, 1]]]), torch.zeros(1, 1, 3)), [[2, 7]], 1, length=2)
    assert out.tokens.tolist() == [[[7, 3, 4, 1], [7, 3, 4, 1]]]
    assert pack_tree(out.tokens, 0).num_nodes.tolist() == [4]


def test_padding_is_never_accepted():
    beams = torch.tensor([[[5, 6, -1, -1], [5, 6, 7, 8]]])
    tree = pack_tree(beams, 0)
    logits = torch.full((1, tree.n, 10), -5.0)
    # The target agrees with every drafted token; padding must still stop beam 0 at one token.
    for node, nxt in enumerate([6, 7, 8, 9]):
        logits[0, node, nxt] = 5.0
    acc = accept_greedy(beams, logits, tree.unpack)
    assert (int(acc.beam[0]), int(acc.length[0]), int(acc.bonus[0])) == (1, 3, 9)
    acc = accept_greedy(beams[:, :1], logits[:, :2], pack_tree(beams[:, :1], 0).unpack)
    assert (int(acc.length[0]), int(acc.bonus[0])) == (1, 7)


@pytest.mark.parametrize("accept", ["greedy", "rejection", "typical"])
def test_long_lookup_beams_stay_identical_and_accept_past_the_drafted_length(tiny_target, accept):
    gen = Generator(tiny_target, Drafter.for_target(tiny_target, seed=0))
    sampling = {} if accept == "greedy" else {"sampling": SamplingConfig(temperature=0.8, seed=3)}
    cfg = DecodeConfig(max_new_tokens=40, beam_width=2, beam_length=3, lookup_beams=2, lookup_length=8,
                       stop_on_eos=False, accept=accept, **sampling)
    prompts = [p * 3 for p in random_prompts(4, tiny_target.vocab_size, seed=2, min_len=2, max_len=5)]
    out = gen.generate_batch(prompts, cfg, "redraft")
    assert all(len(g.tokens) == 40 for g in out.rows)
    steps = [s for g in out.rows for s in g.decode_steps]
    assert max(s.tree_nodes for s in steps) <= 2 * 3 + 2 * 8
    if accept == "greedy":  # identical to plain; an untrained drafter: only copies reach past the drafted length
        assert out.tokens == [gen.generate(p, cfg, "plain").tokens for p in prompts]
        assert max(s.accepted for s in steps) > 2


def test_lookup_length_is_checked():
    with pytest.raises(BadInputError, match="--lookup-length"):
        DecodeConfig(lookup_length=1)
    with pytest.raises(BadInputError, match="--lookup-length"):
        DecodeConfig(lookup_length=33)
    assert DecodeConfig(beam_length=3, lookup_beams=1, lookup_length=8).tree_depth == 8
    assert DecodeConfig(beam_length=3, lookup_beams=0, lookup_length=8).tree_depth == 3
