"""Greedy losslessness: ReDrafter output is token-for-token plain greedy decoding."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts, tiny_llama, tiny_model_dir
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.beam_search import DraftBeams
from redraft_cli.target import Target


def greedy_continuation(target: Target, context: list[int], n: int) -> list[int]:
    """The target's own next n greedy tokens after `context` (full forwards, tiny model only)."""
    ids = list(context)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = target.model(torch.tensor([ids])).logits[0, -1]
        tok = int(logits.argmax())
        ids.append(tok)
        out.append(tok)
    return out


class OracleProposer:
    """Test double: some beams are the target's own greedy continuation (fully right),
    one is right up to a random depth, the rest random. All beams distinct, start with g0."""

    def __init__(self, target: Target, seed: int = 0, oracle_beam: int = -1) -> None:
        self.target = target
        self.gen = torch.Generator().manual_seed(seed)
        self.oracle_beam = oracle_beam

    def __call__(self, h, g0, beam_width, beam_length, context):
        V = self.target.vocab_size
        L = beam_length
        truth = greedy_continuation(self.target, context, L - 1)
        beams = []
        attempts = 0
        while len(beams) < beam_width and attempts < 50 * beam_width:
            kind = attempts % 3
            attempts += 1
            if kind == 0:
                cand = truth
            elif kind == 1 and L > 1:
                cut = int(torch.randint(0, L - 1, (1,), generator=self.gen))
                cand = truth[:cut] + torch.randint(0, V, (L - 1 - cut,), generator=self.gen).tolist()
            else:
                cand = torch.randint(0, V, (L - 1,), generator=self.gen).tolist()
            beam = [int(g0)] + cand
            if beam not in beams:
                beams.append(beam)
        if len(beams) < beam_width:  # L == 1: all beams are [g0]
            beams += [beams[0]] * (beam_width - len(beams))
        # Put the oracle beam at the requested index to exercise beam selection.
        beams.insert(self.oracle_beam % beam_width, beams.pop(0))
        tokens = torch.tensor([beams])
        return DraftBeams(tokens, torch.zeros(1, beam_width, L - 1))


SHAPES = [(w, l) for w in (1, 2, 4) for l in (2, 3, 5)]


@pytest.mark.parametrize("width,length", SHAPES)
def test_random_drafter_is_lossless(tiny_target, width, length):
    drafter = Drafter.for_target(tiny_target, seed=1)
    gen = Generator(tiny_target, drafter)
    cfg = DecodeConfig(max_new_tokens=24, beam_width=width, beam_length=length)
    for prompt in random_prompts(20, tiny_target.vocab_size, seed=width * 10 + length):
        plain = gen.generate(prompt, cfg, "plain").tokens
        fast = gen.generate(prompt, cfg, "redraft").tokens
        assert fast == plain, f"prompt {prompt}: {fast} != {plain}"


@pytest.mark.parametrize("width,length", SHAPES)
def test_oracle_drafts_are_lossless_and_accepted(tiny_target, width, length):
    gen_plain = Generator(tiny_target)
    cfg = DecodeConfig(max_new_tokens=20, beam_width=width, beam_length=length)
    steps = tokens = 0
    for i, prompt in enumerate(random_prompts(20, tiny_target.vocab_size, seed=100 + width * 10 + length)):
        gen = Generator(tiny_target, proposer=OracleProposer(tiny_target, seed=i, oracle_beam=i))
        plain = gen_plain.generate(prompt, cfg, "plain").tokens
        result = gen.generate(prompt, cfg, "redraft")
        assert result.tokens == plain, f"prompt {prompt}"
        steps += len(result.decode_steps)
        tokens += sum(len(s.tokens) for s in result.decode_steps)
    per_step = tokens / steps
    # Every step has a fully right beam: tokens per step is L except where the budget cuts it.
    assert per_step > 1.0 + 0.5 * (length - 1), f"tokens per step {per_step:.2f} with right drafts"


def test_context_limit_and_eos_stop_like_plain():
    target = tiny_llama(max_positions=40, eos_token_id=5, seed=3)
    drafter = Drafter.for_target(target, seed=0)
    gen = Generator(target, drafter)
    oracle = Generator(target, proposer=OracleProposer(target, seed=0))
    cfg = DecodeConfig(max_new_tokens=64, beam_width=3, beam_length=4)
    hit_eos = hit_ctx = 0
    for prompt in random_prompts(20, target.vocab_size, seed=7, min_len=5, max_len=36):
        plain = gen.generate(prompt, cfg, "plain").tokens
        assert len(prompt) + len(plain) <= 40
        hit_eos += 5 in plain
        hit_ctx += len(prompt) + len(plain) == 40
        assert gen.generate(prompt, cfg, "redraft").tokens == plain
        assert oracle.generate(prompt, cfg, "redraft").tokens == plain
    assert hit_eos and hit_ctx, "the prompts should exercise both stopping rules"


def test_hf_baseline_stops_at_the_context_like_redraft():
    """bench's `generate()` baseline is cut at the context window too, so both produce the same tokens."""
    from redraft_cli.bench import hf_generate

    target = tiny_llama(max_positions=40, seed=3)
    gen = Generator(target)
    prompt = random_prompts(1, target.vocab_size, seed=7, min_len=33, max_len=33)[0]
    rows, _ = hf_generate(gen, [prompt], DecodeConfig(max_new_tokens=64))
    assert rows[0] == gen.generate(prompt, DecodeConfig(max_new_tokens=64), "plain").tokens
    assert len(rows[0]) == 40 - 33


def test_max_new_tokens_exact(tiny_target):
    gen = Generator(tiny_target, proposer=OracleProposer(tiny_target))
    for n in (1, 2, 3, 7):
        out = gen.generate([1, 2, 3], DecodeConfig(max_new_tokens=n, beam_width=2, beam_length=5), "redraft")
        assert len(out.tokens) == n


def test_embedded_default_greedy_identical(smollm2):
    drafter = Drafter.for_target(smollm2, seed=0)
    gen = Generator(smollm2, drafter)
    cfg = DecodeConfig(max_new_tokens=24, beam_width=4, beam_length=4)
    for text in ("Name three colours.", "What is the capital of France?"):
        ids = smollm2.encode_chat(text)
        plain = gen.generate(ids, cfg, "plain").tokens
        assert gen.generate(ids, cfg, "redraft").tokens == plain


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("quantize", ["8bit", "4bit"])
def test_quantized_targets_stay_lossless(tmp_path, quantize, dtype):
    """bitsandbytes on CPU on the lean path: 8-bit is row-wise int8 (exact integer products,
    llm_int8_threshold 0), 4-bit is dequantised for every pass of two or more rows, and the float
    matmuls around them get good row counts (invariance.py); nothing depends on the other tokens of
    a pass, so greedy ReDrafter output is plain decoding's."""
    from redraft_cli.loading import load_target

    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny", layers=2, hidden_size=64)
    target = load_target(str(model_dir), quantize=quantize, device="cpu", dtype=dtype)
    if not target.batch_invariant:
        pytest.skip(f"{dtype} matmuls on this CPU are batch-invariant at no row count (invariance.py)")
    assert str(target.compute_dtype) == f"torch.{dtype}"
    gen = Generator(target, proposer=OracleProposer(target, seed=1))
    cfg = DecodeConfig(max_new_tokens=20, beam_width=3, beam_length=4)
    accepted = 0
    for prompt in random_prompts(3, target.vocab_size, seed=2):
        out = gen.generate(prompt, cfg, "redraft")
        assert out.tokens == gen.generate(prompt, cfg, "plain").tokens
        accepted += sum(s.accepted for s in out.decode_steps)
    assert accepted > 0, "the oracle's beams must be accepted for the check to mean anything"


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_quantized_embedded_default_stays_lossless(dtype):
    """The real model, dtype auto (bfloat16 where the CPU has it, as for unquantised targets) and
    float32 (before every pass was padded to a good row count, MKL's float32 GEMMs left plain
    decoding's output on 3 of 3 prompts at 8 bits)."""
    from redraft_cli.cli.common import resolve_drafter
    from redraft_cli.lean_llama import cpu_has_native_bf16
    from redraft_cli.loading import load_target

    for quantize in ("8bit", "4bit"):
        target = load_target("smollm2-135m", quantize=quantize, device="cpu", dtype=dtype)
        if dtype == "auto" and cpu_has_native_bf16():
            assert target.compute_dtype == torch.bfloat16
        if not target.batch_invariant:
            pytest.skip(f"{target.compute_dtype} matmuls on this CPU are batch-invariant at no row count")
        gen = Generator(target, resolve_drafter(target, "auto", seed=0)[0])  # the shipped drafter: trees get accepted
        cfg = DecodeConfig(max_new_tokens=32, beam_width=4, beam_length=4, tree_nodes=7, lookup_beams=1, lookup_length=32)
        accepted = 0
        for text in ("Name three colours.", "What is 12 times 12?", "Write a haiku about rain."):
            ids = target.encode_chat(text)
            out = gen.generate(ids, cfg, "redraft")
            assert out.tokens == gen.generate(ids, cfg, "plain").tokens, (quantize, text)
            accepted += sum(s.accepted for s in out.decode_steps)
        assert accepted > 0


@pytest.mark.parametrize("accept", ["typical", "rejection"])
def test_sampling_rules_run_end_to_end(tiny_target, accept):
    from redraft_cli.sampling import SamplingConfig

    cfg = DecodeConfig(max_new_tokens=15, beam_width=3, beam_length=4, accept=accept,
                       sampling=SamplingConfig(temperature=0.7, top_p=0.9, seed=3))
    out = Generator(tiny_target, proposer=OracleProposer(tiny_target)).generate([1, 2, 3], cfg, "redraft")
    assert len(out.tokens) == 15
    assert sum(s.accepted for s in out.decode_steps) > 0
    # Same seed, same (deterministic) drafts: the same output.
    again = Generator(tiny_target, proposer=OracleProposer(tiny_target)).generate([1, 2, 3], cfg, "redraft")
    assert again.tokens == out.tokens, "a seeded sampled run must be reproducible"


def test_the_python_api_refuses_wrong_types_with_clear_errors(tiny_target):
    from redraft_cli import SamplingConfig
    from redraft_cli.errors import BadInputError

    gen = Generator(tiny_target, Drafter.for_target(tiny_target, seed=0))
    for bad, match in ((lambda: DecodeConfig(max_new_tokens="8"), "max_new_tokens must be int"),
                       (lambda: DecodeConfig(sampling={"temperature": 0.7}), "must be a SamplingConfig"),
                       (lambda: SamplingConfig(temperature="0.7"), "temperature must be float"),
                       (lambda: gen.generate([1, 2, 3], DecodeConfig(), mode="bogus"), "mode must be"),
                       (lambda: gen.generate_batch([[1, 2]], DecodeConfig(), mode="fast"), "mode must be"),
                       (lambda: gen.generate("Hello", DecodeConfig()), "list of token ids"),
                       (lambda: gen.generate([1.0, 2.0], DecodeConfig()), "holding other values"),
                       (lambda: gen.generate([1, 10**6], DecodeConfig()), "token id 1000000 is outside"),
                       (lambda: Generator(tiny_target, "drafter"), "proposer=")):
        with pytest.raises(BadInputError, match=match):
            bad()
    assert len(gen.generate((1, 2, 3), DecodeConfig(max_new_tokens=3)).tokens) == 3  # a tuple is a list of ids
