"""Context lookup beams: n-gram matches in the sequence so far, appended beside the drafted beams."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.beam_search import DraftBeams
from redraft_cli.errors import BadInputError
from redraft_cli.lookup import lookup_beams, with_lookup_beams

pytestmark = pytest.mark.usefixtures("one_thread")


def test_worked_example():
    tokens, found = lookup_beams([[5, 8, 2, 9, 7, 5, 8]], num_beams=1, beam_length=4, ngram_max=2)
    assert found.tolist() == [[True]]
    assert tokens.tolist() == [[[8, 2, 9, 7]]]


def test_longest_ngram_then_most_recent_and_distinct():
    seq = [1, 2, 3, 4, 9, 2, 3, 5, 6, 1, 2, 3]
    tokens, found = lookup_beams([seq], num_beams=3, beam_length=3, ngram_max=3)
    # [1, 2, 3] occurs at 0 -> [4, 9]; then 2-grams [2, 3] at 5 -> [5, 6] (at 1 -> [4, 9], a duplicate);
    # then 1-grams [3]: at 6 -> [5, 6] (dup), at 2 -> [4, 9] (dup); nothing else.
    assert tokens[0, :, 1:].tolist()[:2] == [[4, 9], [5, 6]]
    assert found.tolist() == [[True, True, False]]
    assert tokens[0, 2].tolist() == [3, 3, 3]  # not found: g0 repeated, for the caller to replace


def test_no_match_and_short_sequences():
    tokens, found = lookup_beams([[1, 2, 3], [7], [4, 4]], num_beams=2, beam_length=3)
    assert not found.any()
    assert tokens[:, 0, 0].tolist() == [3, 7, 4]
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
