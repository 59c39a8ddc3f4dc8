"""KV reuse between generations (`reuse_cache=True`): a prompt that begins with what the last one-prompt
generation read and wrote runs only its new tokens, and decodes exactly as a fresh generation would.

Worked example: the last generation read A = [a0 a1 a2] and wrote [b0 b1 b2] (b2, the last token, was
emitted but never run, so the cache holds a0 a1 a2 b0 b1). The next prompt A + [b0 b1 b2 c0 c1] reuses
those 5 tokens and runs b2 c0 c1; a prompt [a0 a1 x ...] reuses a0 a1."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts, tiny_llama
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.target import Target
from test_model_families import _tiny

pytestmark = pytest.mark.usefixtures("one_thread")
CFG = DecodeConfig(max_new_tokens=12, beam_width=3, beam_length=4, stop_on_eos=False)


@pytest.fixture(scope="module")
def target() -> Target:
    return tiny_llama(vocab_size=64, seed=3, max_positions=512)


def fresh(target: Target, prompt: list[int], cfg: DecodeConfig = CFG, mode: str = "redraft") -> list[int]:
    return Generator(target, Drafter.for_target(target, seed=0)).generate(prompt, cfg, mode).tokens


def same_cache(gen: Generator, tokens: list[int]) -> bool:
    """Whether gen's cache holds, for `tokens`, the keys and values a fresh prefill of them gives (to float32
    rounding: a pass of another row count may sum in another order; a wrong position or a stale slot is far off)."""
    ref = Generator(gen.target)
    list(ref.plain(tokens + [0], DecodeConfig(max_new_tokens=1)))
    n = len(tokens)
    return all(torch.allclose(a[:, :1, :, :n], b[:, :1, :, :n], atol=1e-5, rtol=1e-4) for a, b in
               ((gen.cache.keys, ref.cache.keys), (gen.cache.values, ref.cache.values)))


def run(gen: Generator, prompt: list[int], cfg: DecodeConfig = CFG, mode: str = "redraft"):
    """(tokens, first StepStats) of one generation with reuse_cache."""
    loop = gen.redraft if mode == "redraft" else gen.plain
    steps = list(loop(prompt, cfg, reuse_cache=True))
    return [t for s in steps for t in s.tokens], steps[0]


@pytest.mark.parametrize("mode", ["redraft", "plain"])
def test_a_next_turn_runs_only_its_new_tokens_and_decodes_as_a_fresh_generation(target, mode):
    gen = Generator(target, Drafter.for_target(target, seed=0))
    prompt = random_prompts(1, 64, seed=1, min_len=9, max_len=9)[0]
    out, first = run(gen, prompt, mode=mode)
    assert first.prefill and first.reused == 0 and first.tree_nodes == len(prompt)
    turn = prompt + out + [5, 9, 11]
    out2, first = run(gen, turn, mode=mode)
    assert first.reused == len(prompt) + len(out) - 1  # the last emitted token was never run
    assert first.tree_nodes == len(turn) - first.reused
    assert out2 == fresh(target, turn, mode=mode)
    assert same_cache(gen, turn + out2[:-1])


def test_plain_and_redraft_go_on_from_each_others_cache(target):
    gen = Generator(target, Drafter.for_target(target, seed=0))
    prompt = [3, 17, 40, 2, 8, 8, 31]
    out, _ = run(gen, prompt, mode="plain")
    turn = prompt + out + [1, 2]
    out2, first = run(gen, turn, mode="redraft")
    assert first.reused > len(prompt) and out2 == fresh(target, turn, mode="plain") and same_cache(gen, turn)


def test_only_the_shared_prefix_is_reused(target):
    gen = Generator(target, Drafter.for_target(target, seed=0))
    prompt = [3, 17, 40, 2, 8, 8, 31, 5]
    run(gen, prompt)
    other = prompt[:3] + [9, 9, 9, 9]
    out, first = run(gen, other)
    assert first.reused == 3 and out == fresh(target, other) and same_cache(gen, other)
    unrelated = [50, 51, 52]
    out, first = run(gen, unrelated)
    assert first.reused == 0 and out == fresh(target, unrelated)
    again = list(unrelated)  # the whole prompt held: its last token still runs (its state picks the first token)
    out, first = run(gen, again)
    assert first.reused == 2 and first.tree_nodes == 1 and out == fresh(target, again)


def test_a_batch_or_a_generation_without_reuse_in_between_starts_afresh(target):
    gen = Generator(target, Drafter.for_target(target, seed=0))
    prompt = [3, 17, 40, 2, 8, 8, 31]
    out, _ = run(gen, prompt)
    gen.generate_batch([prompt, [4, 5]], CFG)
    _, first = run(gen, prompt + out)
    assert first.reused == 0
    list(gen.redraft(prompt, CFG))  # reuse_cache=False: runs the whole prompt, but leaves its cache
    _, first = run(gen, prompt + [1])
    assert first.reused == len(prompt)


def test_a_cache_too_small_for_the_next_prompt_is_grown(target):
    gen = Generator(target, Drafter.for_target(target, seed=0))
    short = replace_tokens(CFG, 3)
    prompt = [3, 17, 40, 2, 8]
    out, _ = run(gen, prompt, short)
    capacity = gen.cache.capacity
    turn = prompt + out + list(range(10, 10 + capacity))
    long = replace_tokens(CFG, 20)
    out2, first = run(gen, turn, long)
    assert first.reused == len(prompt) + len(out) - 1 and gen.cache.capacity > capacity
    assert out2 == fresh(target, turn, long) and same_cache(gen, turn)


def replace_tokens(cfg: DecodeConfig, n: int) -> DecodeConfig:
    from dataclasses import replace

    return replace(cfg, max_new_tokens=n)


def test_a_generation_stopped_midway_leaves_what_it_committed(target):
    gen = Generator(target, Drafter.for_target(target, seed=0))
    prompt = [3, 17, 40, 2, 8, 8, 31]
    stream = gen.redraft(prompt, replace_tokens(CFG, 40), reuse_cache=True)
    emitted = [t for _, s in zip(range(3), stream) for t in s.tokens]
    stream.close()  # a chat's Ctrl-C
    turn = prompt + emitted + [6, 7]
    out, first = run(gen, turn)
    assert len(prompt) <= first.reused <= len(prompt) + len(emitted) - 1
    assert out == fresh(target, turn) and same_cache(gen, turn)


def test_the_generic_path_truncates_its_dynamic_cache():
    target = _tiny("gpt_neox")
    assert target.lean is None
    gen = Generator(target, Drafter.for_target(target, seed=0))
    prompt = [7, 3, 44, 2, 8]
    out, _ = run(gen, prompt)
    turn = prompt[:4] + [60, 61, 62]
    out2, first = run(gen, turn)
    assert first.reused == 4 and gen.cache.hf.get_seq_length() == gen.cache.get_seq_length()
    assert out2 == fresh(target, turn)
    with torch.no_grad():  # the cache's first 4 positions are the prompt's: a fresh prefill of them matches
        ref = Generator(target)
        list(ref.plain(prompt[:4] + [60], DecodeConfig(max_new_tokens=1)))
        assert torch.allclose(ref.cache.hf.layers[0].keys[:, :, :4], gen.cache.hf.layers[0].keys[:, :, :4], atol=1e-6)


@pytest.fixture(scope="module")
def long_target() -> Target:
    return tiny_llama(vocab_size=64, seed=5, max_positions=4096)


def test_a_long_prompt_is_read_in_chunks_as_in_one_pass(long_target, monkeypatch):
    import redraft_cli.decode as decode

    prompt = random_prompts(1, 64, seed=7, min_len=1300, max_len=1300)[0]
    chunked = Generator(long_target, Drafter.for_target(long_target, seed=0))
    out = chunked.generate(prompt, CFG).tokens
    assert chunked.cache.get_seq_length() >= len(prompt)
    monkeypatch.setattr(decode, "PREFILL_CHUNK", 1 << 20)
    whole = Generator(long_target, Drafter.for_target(long_target, seed=0))
    assert whole.generate(prompt, CFG).tokens == out
    n = len(prompt)
    for a, b in ((chunked.cache.keys, whole.cache.keys), (chunked.cache.values, whole.cache.values)):
        assert torch.allclose(a[:, :1, :, :n], b[:, :1, :, :n], atol=1e-5, rtol=1e-4)


def test_an_interrupted_prompt_pass_stops_between_chunks_and_keeps_what_it_read(long_target):
    import redraft_cli.decode as decode

    gen = Generator(long_target, Drafter.for_target(long_target, seed=0))
    prompt = random_prompts(1, 64, seed=8, min_len=1300, max_len=1300)[0]
    asked = []
    gen.interrupt = lambda: asked.append(1) or len(asked) >= 2  # a Ctrl-C during the second chunk
    with pytest.raises(KeyboardInterrupt):
        run(gen, prompt)
    assert len(asked) == 2
    gen.interrupt = None
    out, first = run(gen, prompt + [1, 2])
    assert first.reused == 2 * decode.PREFILL_CHUNK and out == fresh(long_target, prompt + [1, 2])
    gen.interrupt = lambda: True
    with pytest.raises(KeyboardInterrupt):
        run(gen, prompt[:5] + [9] * 1200)
    assert gen.last_reused == 5
    gen.limit_reuse(gen.last_reused)  # what a chat does when it takes the message back
    gen.interrupt = None
    _, first = run(gen, prompt[:5] + [9] * 1200)
    assert first.reused == 5


def test_reuse_cache_takes_a_bool(target):
    from redraft_cli.errors import BadInputError

    gen = Generator(target, Drafter.for_target(target, seed=0))
    for method in (gen.redraft, gen.plain):
        with pytest.raises(BadInputError, match="reuse_cache must be True or False"):
            method([1, 2, 3], CFG, reuse_cache="yes")
