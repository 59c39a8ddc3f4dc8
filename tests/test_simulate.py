"""Offline acceptance simulation: tokens per step from greedy data and cached hidden states."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.datastore import Datastore
from redraft_cli.simulate import answer_spans, simulate_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def test_answer_spans():
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    assert answer_spans({"loss_mask": mask}) == [(2, 5), (7, 9)]
    assert answer_spans({"loss_mask": mask}, max_new_tokens=2) == [(2, 4), (7, 9)]


def greedy_examples(target, prompts: list[list[int]], n: int) -> list[dict]:
    """The target's own greedy answers (plain decoding) with its hidden states, as distill caches them."""
    gen = Generator(target, None)
    cfg = DecodeConfig(max_new_tokens=n, stop_on_eos=False)
    out = []
    for p in prompts:
        ids = torch.tensor(p + gen.generate(p, cfg, "plain").tokens)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(p):] = True
        with torch.no_grad():
            hidden = target.base(input_ids=ids.unsqueeze(0), use_cache=False).last_hidden_state[0]
        out.append({"input_ids": ids, "loss_mask": mask, "hidden": hidden})
    return out


@pytest.mark.parametrize("shape", [(2, 3, 0, 0, 0, 0), (2, 3, 2, 7, 0, 0), (1, 4, 1, 2, 0, 0), (2, 3, 1, 6, 2, 0),
                                   (4, 5, 1, 7, 0, 5)])
def test_simulation_equals_real_decoding(tiny_target, shape):
    W, L, lookup, lookup_length, datastore, nodes = shape
    prompts = [p * 3 for p in random_prompts(5, tiny_target.vocab_size, seed=4, min_len=2, max_len=5)]
    data = greedy_examples(tiny_target, prompts, 30)
    drafter = Drafter.for_target(tiny_target, seed=2)
    if datastore:  # answers to other prompts: partial matches, misses and hits alike
        others = random_prompts(6, tiny_target.vocab_size, seed=9, min_len=2, max_len=5) + prompts[:2]
        drafter.datastore = Datastore.from_examples(greedy_examples(tiny_target, others, 30), tiny_target.vocab_size)
    cfg = DecodeConfig(max_new_tokens=30, beam_width=W, beam_length=L, lookup_beams=lookup,
                       lookup_length=lookup_length, datastore_beams=datastore, tree_nodes=nodes, stop_on_eos=False)
    gen = Generator(tiny_target, drafter)
    steps = [s for p in prompts for s in gen.generate(p, cfg, "redraft").decode_steps]
    sim = simulate_greedy(drafter, data, W, L, lookup, lookup_length, datastore_beams=datastore, tree_nodes=nodes)
    assert sim.answers == 5
    assert (sim.steps, sim.tokens) == (len(steps), sum(len(s.tokens) for s in steps))
    if lookup:
        assert sim.tokens_per_step > 1.2  # the repeated prompts make lookups pay: a test that can fail
