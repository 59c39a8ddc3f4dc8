"""The generation loops: plain autoregressive decoding and ReDrafter, both streaming.

State between ReDrafter steps (batch 1):

    cache   : KV of the committed tokens, positions 0..P-1
    g0      : the token at position P, already emitted, not yet in the cache
    h       : the target's hidden state at position P-1 (the one that chose g0)

One step: draft W beams [g0, d1..d_{L-1}] from (h, g0); pack them into a
tree; one target pass over the n nodes at positions P + depth; accept a
drafted tokens of the best beam plus the target's bonus token; keep the KV
of g0 and the accepted nodes (cache length P + a + 1); the bonus becomes the
next g0 and the hidden state at the last accepted node the next h.

Both loops yield `StepStats` per target pass, so callers can stream text and
collect statistics; the first one is the prefill, which emits one token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch

from .beam_search import DraftBeams, check_beam_shape, draft_beams
from .drafter import Drafter
from .errors import BadInputError
from .kv_cache import commit_path
from .sampling import SamplingConfig, choose_tokens
from .target import Target
from .tree_attention import attention_bias, pack_tree
from .verify import ACCEPT_RULES, accept_greedy, accept_rejection, accept_typical


@dataclass
class DecodeConfig:
    """Everything a generation needs besides the models. Defaults match the CLI's."""

    max_new_tokens: int = 128
    beam_width: int = 4
    beam_length: int = 5
    accept: str = "greedy"
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if self.accept not in ACCEPT_RULES:
            raise BadInputError(f"--accept must be one of {', '.join(ACCEPT_RULES)}, got {self.accept!r}")
        if self.max_new_tokens < 1:
            raise BadInputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check_beam_shape(self.beam_width, self.beam_length)
        if not 0 < self.typical_epsilon <= 1 or self.typical_delta <= 0:
            raise BadInputError("typical acceptance needs 0 < epsilon <= 1 and delta > 0")


@dataclass
class StepStats:
    """One target pass. tokens: what it emitted; accepted: drafted tokens kept
    (0 for plain steps); tree_nodes: tokens the target processed (n); seconds
    spent drafting, in the target pass, and accepting/committing."""

    tokens: list[int]
    accepted: int = 0
    tree_nodes: int = 1
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    prefill: bool = False
    finished: bool = False


class Proposer(Protocol):
    """Anything that drafts beams: (h (1, H), g0 (1,), W, L, context ids) -> DraftBeams."""

    def __call__(self, h: torch.Tensor, g0: torch.Tensor, beam_width: int, beam_length: int, context: list[int]) -> DraftBeams: ...


class DrafterProposer:
    """The ReDrafter proposer: beam search over the recurrent drafter."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter

    def __call__(self, h, g0, beam_width, beam_length, context):
        return draft_beams(self.drafter, h, g0, beam_width, beam_length)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class Generator:
    """Decodes with one target, optionally a drafter (or any Proposer)."""

    def __init__(self, target: Target, drafter: Drafter | None = None, proposer: Proposer | None = None) -> None:
        self.target = target
        self.drafter = drafter
        if drafter is not None:
            drafter.check_target(target.hidden_size, target.vocab_size, target.name)
            drafter.attach(target.embed_weight, target.lm_head_weight)
        self.proposer = proposer or (DrafterProposer(drafter) if drafter is not None else None)
        self.cache: Any = None

    # -- shared pieces ----------------------------------------------------------
    def _generator(self, cfg: DecodeConfig) -> torch.Generator | None:
        if cfg.sampling.greedy:
            return None
        dev = self.target.device
        return torch.Generator(device=dev if dev.type != "mps" else "cpu").manual_seed(cfg.sampling.seed)

    def _prefill(self, prompt_ids: list[int], cfg: DecodeConfig, gen: torch.Generator | None):
        """Run the prompt; returns (cache, h (1, H), g0 (1,), StepStats)."""
        t = self.target
        t.check_prompt(prompt_ids)
        start = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=t.device)
        cache = t.new_cache()
        self.cache = cache  # the live KV cache of the latest generation (for inspection and tests)
        pos = torch.arange(len(prompt_ids), device=t.device).unsqueeze(0)
        hidden = t.forward(ids, pos, cache)[:, -1]  # (1, H)
        g0 = choose_tokens(t.logits(hidden), cfg.sampling, gen)  # (1,)
        _sync(t.device)
        stats = StepStats([int(g0)], tree_nodes=len(prompt_ids), verify_s=time.perf_counter() - start, prefill=True)
        return cache, hidden, g0, stats

    def _finish(self, stats: StepStats, emitted: int, seq_len: int, cfg: DecodeConfig) -> bool:
        """Truncate at EOS / token budget; return True when generation must stop."""
        done = False
        if cfg.stop_on_eos:
            for i, tok in enumerate(stats.tokens):
                if tok in self.target.eos_ids:
                    stats.tokens = stats.tokens[: i + 1]
                    done = True
                    break
        budget = cfg.max_new_tokens - emitted
        if len(stats.tokens) >= budget:
            stats.tokens = stats.tokens[:budget]
            done = True
        if seq_len + len(stats.tokens) >= self.target.max_context:
            done = True
        stats.finished = done
        return done

    # -- plain decoding -------------------------------------------------------------
    def plain(self, prompt_ids: list[int], cfg: DecodeConfig) -> Iterator[StepStats]:
        """Autoregressive decoding, one target pass per token."""
        t = self.target
        gen = self._generator(cfg)
        cache, _, tok, stats = self._prefill(prompt_ids, cfg, gen)
        seq_len, emitted = len(prompt_ids), 0
        done = self._finish(stats, emitted, seq_len, cfg)
        yield stats
        seq_len += 1
        emitted += 1
        while not done:
            start = time.perf_counter()
            pos = torch.tensor([[seq_len - 1]], device=t.device)
            hidden = t.forward(tok.view(1, 1), pos, cache)[:, -1]
            tok = choose_tokens(t.logits(hidden), cfg.sampling, gen)
            _sync(t.device)
            stats = StepStats([int(tok)], verify_s=time.perf_counter() - start)
            done = self._finish(stats, emitted, seq_len, cfg)
            yield stats
            seq_len += 1
            emitted += 1

    # -- ReDrafter ------------------------------------------------------------------
    def redraft(self, prompt_ids: list[int], cfg: DecodeConfig) -> Iterator[StepStats]:
        """Speculative decoding with beam drafts and dynamic tree attention."""
        if self.proposer is None:
            raise BadInputError("ReDrafter decoding needs a drafter")
        if self.drafter is not None:
            check_beam_shape(cfg.beam_width, cfg.beam_length, self.drafter.draft_vocab_size)
        t = self.target
        gen = self._generator(cfg)
        cache, h, g0, stats = self._prefill(prompt_ids, cfg, gen)
        context = list(prompt_ids) + stats.tokens
        emitted = 0
        done = self._finish(stats, emitted, len(prompt_ids), cfg)
        yield stats
        emitted += 1
        while not done:
            seq_len = len(context)  # committed tokens + g0
            prefix_len = seq_len - 1
            length = min(cfg.beam_length, cfg.max_new_tokens - emitted, t.max_context - seq_len)
            t0 = time.perf_counter()
            beams = self.proposer(h, g0, cfg.beam_width, length, context)  # tokens (1, W, L)
            tree = pack_tree(beams.tokens, prefix_len)
            _sync(t.device)
            t1 = time.perf_counter()
            bias = attention_bias(tree.mask, prefix_len, t.compute_dtype)
            hidden = t.forward(tree.tokens, tree.positions, cache, bias)  # (1, n, H)
            logits = t.logits(hidden)  # (1, n, V)
            _sync(t.device)
            t2 = time.perf_counter()
            acc = self._accept(beams, logits, tree.unpack, cfg, gen)
            a = int(acc.length[0])
            path = acc.path[0, : a + 1]
            commit_path(cache, prefix_len, path)
            h = hidden[:, int(path[-1])]  # (1, H)
            g0 = acc.bonus
            tokens = acc.emitted(beams.tokens)
            _sync(t.device)
            t3 = time.perf_counter()
            stats = StepStats(tokens, a, tree.n, t1 - t0, t2 - t1, t3 - t2)
            done = self._finish(stats, emitted, seq_len, cfg)
            stats.accepted = min(a, len(stats.tokens))
            context.extend(stats.tokens)
            emitted += len(stats.tokens)
            yield stats

    def _accept(self, beams: DraftBeams, logits, unpack, cfg: DecodeConfig, gen):
        if cfg.accept == "greedy" or cfg.sampling.greedy:
            return accept_greedy(beams.tokens, logits, unpack)
        if cfg.accept == "rejection":
            return accept_rejection(beams.tokens, logits, unpack, cfg.sampling, gen)
        return accept_typical(
            beams.tokens, beams.logprobs, logits, unpack, cfg.sampling, gen, cfg.typical_epsilon, cfg.typical_delta
        )

    # -- convenience -------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], cfg: DecodeConfig, mode: str = "redraft",
                 on_step: Callable[[StepStats], Any] | None = None) -> "Generation":
        """Run a whole generation; mode 'redraft' or 'plain'."""
        loop = self.redraft if mode == "redraft" else self.plain
        start = time.perf_counter()
        steps: list[StepStats] = []
        for s in loop(prompt_ids, cfg):
            steps.append(s)
            if on_step is not None:
                on_step(s)
        return Generation(steps, time.perf_counter() - start)


@dataclass
class Generation:
    """A finished generation: its steps (prefill first) and wall-clock seconds."""

    steps: list[StepStats]
    seconds: float

    @property
    def tokens(self) -> list[int]:
        return [tok for s in self.steps for tok in s.tokens]

    @property
    def decode_steps(self) -> list[StepStats]:
        return [s for s in self.steps if not s.prefill]
