"""The generation loops: plain autoregressive decoding and ReDrafter, both streaming.

State between ReDrafter steps, per row b of a batch:

    cache   : KV of the committed tokens, positions 0..P_b-1 (cache.lengths[b] = P_b)
    g0      : (B,) the token at position P_b, already emitted, not yet in the cache
    h       : (B, H) the target's hidden state at position P_b-1 (the one that chose g0);
              with a context-attention drafter, its context c there instead
              (`draft_context` keeps that drafter's keys and values of the last W positions)

One step: draft W beams [g0, d1..d_{L-1}] from (h, g0); pack them into a
tree; one target pass over the n nodes at positions P + depth; accept a
drafted tokens of the best beam plus the target's bonus token; keep the KV
of g0 and the accepted nodes (cache length P + a + 1); the bonus becomes the
next g0 and the hidden state at the last accepted node the next h. Rows
accept different numbers of tokens: each row's cache length advances on its
own (StaticKVCache), and a finished row leaves the batch.

Continuous batching: with more prompts than `slots`, a finished row's slot
goes to the next waiting prompt. Its prefill is a pass of its own (into a
fresh cache of the same capacity), after which its KV rows are copied into
the places that finished rows freed in the live cache (StaticKVCache.append:
only the joining rows are copied) and its (h, g0) appended to the state,
and it decodes with the rest:

    slots = 2, prompts A B C:  pass 1 prefill A B | steps A B ... B finishes
                               | prefill C | steps A C ... A finishes | steps C ...

Both loops yield `StepStats` per target pass, so callers can stream text and
collect statistics; the first one is the prefill, which emits one token.
"""

from __future__ import annotations

import numbers
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

from .beam_search import DraftBeams, check_beam_shape, draft_beams
from .cuda_graphs import GraphedDraft, graph_capacity, graphs_wanted
from .drafter import Drafter
from .datastore import SEP, Datastore, with_datastore_beams
from .lookup import with_lookup_beams
from .errors import BadInputError, check_field_types
from .sampling import SamplingConfig, choose_tokens
from .target import Target
from .tree_attention import pack_tree
from .verify import ACCEPT_RULES, accept_greedy, accept_rejection, accept_typical


MAX_LOOKUP_LENGTH = 32
# A prompt of one row longer than this is read in passes of this many tokens: `Generator.interrupt` is
# asked between them (a chat's Ctrl-C during a long paste), and no pass holds activations for all of it.
PREFILL_CHUNK = 512


@dataclass
class DecodeConfig:
    """Everything a generation needs besides the models. Defaults match the CLI's."""

    max_new_tokens: int = 128
    beam_width: int = 4
    beam_length: int = 5
    accept: str = "auto"  # auto: greedy at temperature 0, rejection (lossless sampling) above it; see `rule`
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    typical_epsilon: float = 0.09
    typical_delta: float = 0.3
    stop_on_eos: bool = True
    lookup_beams: int = 0  # extra beams copied from earlier context (lookup.py), beside the W drafted ones
    lookup_length: int = 0  # most tokens per copied beam, counting g0 (0: beam_length; lookup.copy_length); may exceed beam_length
    datastore_beams: int = 0  # extra beams from the drafter's datastore (datastore.py), up to lookup_length tokens long
    tree_nodes: int = 0  # keep the N most likely drafted tokens of the W x L search (beam_search.py); 0: every beam

    def __post_init__(self) -> None:
        check_field_types(self)
        if not isinstance(self.sampling, SamplingConfig):
            raise BadInputError(f"DecodeConfig.sampling must be a SamplingConfig, got {type(self.sampling).__name__}")
        if self.accept not in ("auto", *ACCEPT_RULES):
            raise BadInputError(f"--accept must be one of auto, {', '.join(ACCEPT_RULES)}, got {self.accept!r}")
        if self.accept == "greedy" and not self.sampling.greedy:
            raise BadInputError(f"--accept greedy decodes greedily, so --temperature {self.sampling.temperature} "
                                f"would apply to nothing: use --accept rejection (lossless sampling, the default "
                                f"above temperature 0) or typical")
        if self.max_new_tokens < 1:
            raise BadInputError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        check_beam_shape(self.beam_width, self.beam_length, tree_nodes=self.tree_nodes)
        if not 0 <= self.lookup_beams <= 16:
            raise BadInputError(f"--lookup must be between 0 and 16, got {self.lookup_beams}")
        if not 0 <= self.datastore_beams <= 16:
            raise BadInputError(f"--datastore must be between 0 and 16, got {self.datastore_beams}")
        if self.lookup_length != 0 and not 2 <= self.lookup_length <= MAX_LOOKUP_LENGTH:
            raise BadInputError(f"--lookup-length must be 0 (the beam length) or 2..{MAX_LOOKUP_LENGTH}, "
                                f"got {self.lookup_length}")
        if not 0 < self.typical_epsilon <= 1:  # (NaN fails)
            raise BadInputError(f"--epsilon (typical acceptance) must be in (0, 1], got {self.typical_epsilon}")
        if not 0 < self.typical_delta < float("inf"):
            raise BadInputError(f"--delta (typical acceptance) must be a finite number > 0, got {self.typical_delta}")

    @property
    def rule(self) -> str:
        """The acceptance rule that runs: greedy at temperature 0 (where every rule is greedy), else
        `accept`, with auto meaning rejection (lossless sampling)."""
        if self.sampling.greedy:
            return "greedy"
        return "rejection" if self.accept == "auto" else self.accept

    @property
    def tree_depth(self) -> int:
        """Tokens in the longest beam of a step's tree (drafted or copied), counting g0."""
        return max(self.beam_length, self.lookup_length if self.copied_beams else 0)

    @property
    def copied_beams(self) -> int:
        """Beams copied rather than drafted: context lookup plus datastore."""
        return self.lookup_beams + self.datastore_beams


def check_datastore(drafter: Drafter | None, datastore_beams: int) -> None:
    """Raise BadInputError when datastore beams are asked of a drafter without a datastore, or with one
    (set from Python) that is not a Datastore of the drafter's vocabulary."""
    if not datastore_beams:
        return
    store = getattr(drafter, "datastore", None)
    if store is None:
        raise BadInputError("--datastore needs a drafter saved with a datastore (datastore.safetensors; "
                            "`redraft distill` writes one); this one has none")
    if not isinstance(store, Datastore):
        raise BadInputError(f"the drafter's datastore must be a Datastore (Datastore.from_answers), got "
                            f"{type(store).__name__}")
    vocab = drafter.config.vocab_size
    if store.vocab_size != vocab or store.max_token >= vocab or int(store.tokens.min()) < SEP:
        raise BadInputError(f"the drafter's datastore is for a vocabulary of {store.vocab_size} (its token ids span "
                            f"{int(store.tokens.min())}..{store.max_token}, -1 between answers), but the drafter's "
                            f"vocabulary is {vocab}")


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
    reused: int = 0  # a prefill's prompt tokens whose KV the previous generation left (reuse_cache)


class Proposer(Protocol):
    """Anything that drafts beams for one row: (h (1, H), g0 (1,), W, L, context ids) -> DraftBeams
    with tokens (1, W, L). A proposer with `batched = True` takes h (B, H), g0 (B,) and B contexts."""

    def __call__(self, h: torch.Tensor, g0: torch.Tensor, beam_width: int, beam_length: int, context: Any) -> DraftBeams: ...


def _checked(beams: Any, g0: torch.Tensor, W: int, L: int, vocab_size: int) -> DraftBeams:
    """A proposer's beams, checked: DraftBeams with tokens (B, W, L) starting with g0, token ids in the
    target's vocabulary, logprobs (B, W, L-1). A custom proposer that breaks this would change the
    output (its first column is what the target already chose) or fail deep in verification."""
    B = g0.shape[0]
    if not isinstance(beams, DraftBeams) or not isinstance(beams.tokens, torch.Tensor) or not isinstance(
            beams.logprobs, torch.Tensor):
        raise BadInputError(f"the proposer must return DraftBeams(tokens, logprobs), got {type(beams).__name__}")
    if tuple(beams.tokens.shape) != (B, W, L) or tuple(beams.logprobs.shape) != (B, W, L - 1):
        raise BadInputError(f"the proposer returned tokens {tuple(beams.tokens.shape)} and logprobs "
                            f"{tuple(beams.logprobs.shape)}; expected {(B, W, L)} and {(B, W, L - 1)}")
    if beams.tokens.is_floating_point() or beams.tokens.is_complex() or beams.tokens.dtype == torch.bool:
        raise BadInputError(f"the proposer's tokens must be integer token ids (torch.long), got "
                            f"{str(beams.tokens.dtype).removeprefix('torch.')}")
    if not beams.logprobs.is_floating_point():
        raise BadInputError(f"the proposer's logprobs must be floats, got {str(beams.logprobs.dtype).removeprefix('torch.')}")
    tokens = beams.tokens.to(g0.device, torch.long)
    if not bool((tokens[:, :, 0] == g0.view(B, 1)).all()):
        raise BadInputError("the proposer's beams must start with g0 (tokens[:, :, 0]), the token the target chose")
    if bool(((tokens < 0) | (tokens >= vocab_size)).any()):
        raise BadInputError(f"the proposer returned token ids outside the target's vocabulary (0..{vocab_size - 1})")
    return DraftBeams(tokens, beams.logprobs.to(g0.device))


class DrafterProposer:
    """The ReDrafter proposer: beam search over the recurrent drafter, all rows at once."""

    batched = True

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        # On CUDA the beam search replays CUDA graphs (cuda_graphs.GraphedDraft); a drafter with context
        # attention keeps a cache that changes shape, and drafts eagerly.
        device = drafter.rnn_w.weight.device
        self.graphs = GraphedDraft(drafter) if graphs_wanted(device) and drafter.context is None else None

    def __call__(self, h, g0, beam_width, beam_length, contexts, tree_nodes=0):
        if self.graphs is not None and not (self.drafter.training and self.drafter.dropout):  # dropout: eager
            beams = self.graphs(h, g0, beam_width, beam_length, tree_nodes)
            if beams is not None:
                return beams
        return draft_beams(self.drafter, h, g0, beam_width, beam_length, tree_nodes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class _Rows:
    """Per-row bookkeeping of a batched generation. `active` lists the original
    row ids decoding now, in the order of the cache's rows; `waiting` those not
    yet admitted (continuous batching: a finished row's slot goes to the next)."""

    def __init__(self, prompts: list[list[int]], slots: int) -> None:
        self.context = [list(p) for p in prompts]  # prompt + emitted tokens
        self.emitted = [0] * len(prompts)
        self.active: list[int] = []
        self.waiting = list(range(len(prompts)))
        self.slots = slots

    def admit(self) -> list[int]:
        """Take waiting rows into the free slots; returns their ids (empty when none)."""
        n = max(self.slots - len(self.active), 0)
        ids, self.waiting = self.waiting[:n], self.waiting[n:]
        return ids


class Generator:
    """Decodes with one target, optionally a drafter (or any Proposer).

    `plain`/`redraft` stream one prompt; `plain_batch`/`redraft_batch` decode
    several prompts, at most `slots` at once (rows finish independently and
    waiting prompts take their slots; greedy output of each row equals its
    batch-1 output) and yield, per target pass, the (row, StepStats) pairs of
    the rows that took part.
    """

    def __init__(self, target: Target, drafter: Drafter | None = None, proposer: Proposer | None = None) -> None:
        if not isinstance(target, Target):
            raise BadInputError(f"Generator needs a Target (from load_target), got {type(target).__name__}")
        self.target = target
        self.drafter = drafter
        if drafter is not None and not isinstance(drafter, Drafter):
            raise BadInputError(f"Generator's second argument is a Drafter, got {type(drafter).__name__}; "
                                f"pass other drafting objects as proposer=...")
        if proposer is not None and not callable(proposer):
            raise BadInputError(f"Generator's proposer must be callable (h, g0, beam_width, beam_length, context) "
                                f"-> DraftBeams, got {type(proposer).__name__}")
        if drafter is not None:
            drafter.check_target(target.hidden_size, target.vocab_size, target.name)
            drafter.attach(target.embed_weight, target.lm_head_weight)
        self.proposer = proposer or (DrafterProposer(drafter) if drafter is not None else None)
        self.cache: Any = None
        self.draft_context: Any = None  # the drafter's context-attention cache of the latest generation
        self._run: object = None  # the generation that owns the caches (the one started last)
        self._lock = threading.Lock()  # held while a pass runs (_rows): one thread's passes at a time
        # What a one-prompt generation left for the next one (reuse_cache): its rows and cache.
        self._held: tuple[_Rows, Any] | None = None
        self.last_reused = 0  # prompt tokens the latest generation took from the cache (reuse_cache)
        # Asked between the passes of a long prompt (PREFILL_CHUNK); True stops the generation there with a
        # KeyboardInterrupt, leaving the cache holding the part read (a chat's Ctrl-C handler sets it).
        self.interrupt: Callable[[], bool] | None = None

    def check(self, cfg: DecodeConfig) -> None:
        """Raise BadInputError when ReDrafter decoding with `cfg` cannot run with this drafter."""
        _check_config("Generator.check", cfg)
        if self.drafter is not None:
            check_beam_shape(cfg.beam_width, cfg.beam_length, self.drafter.draft_vocab_size, cfg.tree_nodes)
            window = self.drafter.config.context_window
            if window and cfg.tree_depth > window:
                what = ("--beam-length" if cfg.beam_length > window else "--lookup-length (copied beams)")
                raise BadInputError(f"beams of {cfg.tree_depth} tokens exceed the drafter's context window of {window}: "
                                    f"lower {what} to {window} or less")
        check_datastore(self.drafter, cfg.datastore_beams)
        if cfg.tree_nodes and not isinstance(self.proposer, DrafterProposer):
            raise BadInputError("--nodes prunes the drafter's beam search; this generator drafts otherwise")

    # -- shared pieces ----------------------------------------------------------
    def _generator(self, cfg: DecodeConfig) -> torch.Generator | None:
        if cfg.sampling.greedy:
            return None
        dev = self.target.device
        return torch.Generator(device=dev if dev.type != "mps" else "cpu").manual_seed(cfg.sampling.seed)

    def _prefill(self, prompts: list[list[int]], cfg: DecodeConfig, gen: torch.Generator | None, cache: Any,
                 k: int = 0, context: bool = False):
        """Run the prompts into `cache` (fresh, or for one prompt one that already holds its first k
        tokens: only the rest is run, after them); several prompts go one at a time (`_prefill_rows`).

        Returns (h (B, H), g0 (B,), per-row StepStats, context cache or None).
        context=True (a drafter with context attention) also starts its cache and
        returns its context c in place of h. A prompt of more than PREFILL_CHUNK tokens
        (without context attention) runs in passes of that many, `interrupt` asked between."""
        t = self.target
        if len(prompts) > 1:
            return self._prefill_rows(prompts, cfg, gen, cache, context)
        start = time.perf_counter()
        prompts = [p[k:] for p in prompts]
        B, lengths = len(prompts), [len(p) for p in prompts]
        P = max(lengths)
        ids = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p)
        ids = ids.to(t.device)
        lens = torch.tensor(lengths, device=t.device)
        chunk = P if context else PREFILL_CHUNK
        for s in range(0, P, chunk):  # (one pass unless chunked)
            if s and self.interrupt is not None and self.interrupt():
                raise KeyboardInterrupt
            n = min(chunk, P - s)
            positions = torch.arange(n, device=t.device).expand(B, n)
            causal = torch.ones(n, n, dtype=torch.bool, device=t.device).tril()
            real = positions < (lens - s).unsqueeze(1)  # (B, n): False on the right padding of shorter prompts
            mask = causal & real.unsqueeze(1)  # (B, n, n): pads are never seen
            hidden = t.forward_tree(ids[:, s : s + n], positions + k + s, cache, mask, real, graph=False)
            cache.commit(positions, (lens - s).clamp_max(n))
        h = hidden[torch.arange(B, device=t.device), lens - 1 - (P - n)]  # (B, H): each row's last token
        g0 = choose_tokens(t.logits(h), cfg.sampling, gen)  # (B,)
        draft_context = None
        if context:
            h, draft_context = self._start_context(hidden, ids, g0, lens)
        _sync(t.device)
        seconds = time.perf_counter() - start
        stats = [StepStats([int(g0[b])], tree_nodes=lengths[b], verify_s=seconds, prefill=True, reused=k)
                 for b in range(B)]
        return h, g0, stats, draft_context

    def _prefill_rows(self, prompts: list[list[int]], cfg: DecodeConfig, gen: torch.Generator | None, cache: Any,
                      context: bool):
        """`_prefill` of several prompts, one pass (or one chunked run) per prompt, each exactly as if it
        were alone, its KV then copied into its row of `cache` (B rows, empty). A batched pass would
        run a short prompt padded to the longest one, whose attention (over 256 tokens: the fused
        kernel, not the batch-invariant one) rounds differently: a row's greedy output would then
        depend on which prompts share its batch. Returns what `_prefill` returns."""
        start = time.perf_counter()
        t = self.target  # one row, reused (a row starts at length 0); not from the CUDA graphs' buffer pool
        one = t.lean.new_cache(1, cache.capacity, t.compute_dtype, t.device) if t.lean is not None else \
            t.new_tree_cache(1, cache.capacity)
        parts = []
        for b, prompt in enumerate(prompts):
            if b and self.interrupt is not None and self.interrupt():
                raise KeyboardInterrupt
            one.lengths = torch.zeros_like(one.lengths)
            parts.append(self._prefill([prompt], cfg, gen, one, 0, context))
            cache.put_row(b, one)
        seconds = time.perf_counter() - start
        stats = [s for part in parts for s in part[2]]
        for s in stats:  # one prefill of the batch, as the rows' shared pass
            s.verify_s = seconds
        draft_context = None
        if context:
            draft_context = parts[0][3]
            for part in parts[1:]:
                draft_context.append(part[3])
        return (torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), stats,
                draft_context)

    def limit_reuse(self, n: int) -> None:
        """Let the next reuse_cache generation reuse at most the first n tokens this one left."""
        if self._held is not None:
            cache = self._held[1]
            cache.truncate(min(n, cache.get_seq_length()))

    def _reusable(self, prompt: list[int], capacity: int) -> tuple[Any, int] | None:
        """(cache, k): the cache the last one-prompt generation left, holding the first k tokens of
        `prompt` (the longest prefix it shares with that generation's prompt and output, at most all
        but the prompt's last token, whose hidden state the first token needs), or None when it holds
        none of them. A cache with fewer than `capacity` slots is copied into a larger one."""
        if self._held is None:
            return None
        rows, cache = self._held
        done = rows.context[0][: min(cache.get_seq_length(), len(rows.context[0]))]  # tokens whose KV it holds
        k = 0
        limit = min(len(done), len(prompt) - 1)
        if limit > 0:
            same = torch.tensor(done[:limit]) != torch.tensor(prompt[:limit])
            k = int(same.int().argmax()) if bool(same.any()) else limit
        if k == 0:
            return None
        cache.truncate(k)
        if getattr(cache, "capacity", capacity) < capacity:  # a preallocated cache too small for this prompt
            grown = self.target.new_tree_cache(1, capacity)
            grown.load_prefix(cache, k)
            cache = grown
        return cache, k

    # -- the drafter's context attention (context_attention.py) ------------------------------
    def _start_context(self, hidden: torch.Tensor, ids: torch.Tensor, g0: torch.Tensor, lens: torch.Tensor):
        """hidden: (B, P, H) and ids: (B, P) of the right-padded prompts, g0: (B,), lens: (B,).
        Fills a fresh context cache with each row's last W positions (the token after the last
        one is g0); returns c (B, H) at each row's last prompt position, and that cache."""
        d = self.drafter
        B, P, _ = hidden.shape
        draft_context = d.context_cache(B)
        nxt = F.pad(ids[:, 1:], (0, 1)).scatter(1, (lens - 1).unsqueeze(1), g0.unsqueeze(1))  # (B, P): x_{j+1}
        start = (lens - d.config.context_window).clamp_min(0)
        m = int((lens - start).max())
        idx = (start.unsqueeze(1) + torch.arange(m, device=ids.device)).clamp_max(P - 1)  # (B, m)
        h = hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return draft_context.extend(h, d.embed(nxt.gather(1, idx)), start, lens - start), draft_context

    def _extend_context(self, hidden: torch.Tensor, tokens: torch.Tensor, acc, start: torch.Tensor) -> torch.Tensor:
        """After a step: add g0 and the accepted nodes (their hidden states from the tree pass,
        hidden (R, n, H); tree tokens (R, n)) at positions start.. (start: (R,), g0's position);
        the token after the last one is the bonus. Returns c (R, H) at the last accepted node."""
        path_tokens = tokens.gather(1, acc.path)  # (R, L): g0, d1, ...
        nxt = F.pad(path_tokens[:, 1:], (0, 1)).scatter(1, acc.length.unsqueeze(1), acc.bonus.unsqueeze(1))
        h = hidden.gather(1, acc.path.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (R, L, H)
        return self.draft_context.extend(h, self.drafter.embed(nxt), start, acc.length + 1)

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

    def _record(self, rows: _Rows, ids: list[int], stats: list[StepStats], cfg: DecodeConfig
                ) -> tuple[list[tuple[int, StepStats]], list[int]]:
        """Apply _finish to the step of each row in `ids`; returns (row, stats) pairs and the
        indices into `ids` of the rows that go on."""
        out, keep = [], []
        for i, (row, st) in enumerate(zip(ids, stats)):
            accepted = st.accepted
            done = self._finish(st, rows.emitted[row], len(rows.context[row]), cfg)
            st.accepted = min(accepted, len(st.tokens))
            rows.context[row].extend(st.tokens)
            rows.emitted[row] += len(st.tokens)
            out.append((row, st))
            if not done:
                keep.append(i)
        return out, keep

    def _rows(self, *args, **kwargs) -> Iterator[list[tuple[int, StepStats]]]:
        """`_rows_unlocked`, each of its passes run holding the Generator's lock: a generation that another
        thread starts while one runs a pass is a BadInputError at once, not two passes writing one cache.
        (Between passes the lock is free: the stream started last owns the caches, `_check_owner`.)"""
        rows = self._rows_unlocked(*args, **kwargs)
        while True:
            if not self._lock.acquire(blocking=False):
                rows.close()
                raise BadInputError("this Generator is running a generation in another thread; they would share its "
                                    "KV cache: make one Generator(target, drafter) per thread")
            try:
                out = next(rows)
            except StopIteration:
                return
            finally:
                self._lock.release()
            yield out

    def _rows_unlocked(self, prompts: list[list[int]], cfg: DecodeConfig, slots: int | None, margin: int, step,
                       context: bool = False, reuse: bool = False) -> Iterator[list[tuple[int, StepStats]]]:
        """The batched loop of both paths, with continuous batching.

        At most `slots` rows decode at once (default: every prompt). Waiting prompts are
        prefilled, in one pass, into the slots that finished rows left, and join the batch:
        their KV rows are appended to the cache, their (h, g0) to the state. Each cache row
        has room for the longest prompt + max_new_tokens + `margin` (a step's tree nodes).
        `step(rows, h, g0, cfg, gen)` runs one pass over the active rows and returns
        (per-row StepStats, h (R, H), g0 (R,)). Yields, per pass, the (row, StepStats)
        pairs of the rows that took part; a prefill pass yields the admitted rows.
        reuse: one prompt starts from the KV the last one-prompt generation left (`_reusable`).
        """
        if not prompts:
            raise BadInputError("no prompts to decode")
        if slots is not None and slots < 1:
            raise BadInputError(f"the batch needs at least one slot, got {slots}")
        t = self.target
        for p in prompts:
            t.check_prompt(p)
        gen = self._generator(cfg)
        rows = _Rows(prompts, slots or len(prompts))
        capacity = min(max(map(len, prompts)) + cfg.max_new_tokens, t.max_context) + margin
        if t.graphs is not None:  # one cache shape for many generations: their CUDA graphs are reused
            capacity = graph_capacity(capacity)
        reused = self._reusable(prompts[0], capacity) if reuse and len(prompts) == 1 and not context else None
        self._held = None
        self.last_reused = reused[1] if reused else 0
        self.cache = self.draft_context = None  # the last generation's caches go before this one's are made
        self._run = run = object()
        h = g0 = None
        while rows.active or rows.waiting:
            ids = rows.admit()
            if ids:
                cache, k = reused or (t.new_tree_cache(len(ids), capacity), 0)
                reused = None
                if len(prompts) == 1 and not context:  # held from now: a prompt pass stopped midway leaves its part
                    self._held = (rows, cache)
                h_new, g0_new, stats, draft_context = self._prefill([prompts[r] for r in ids], cfg, gen, cache, k,
                                                                    context)
                out, keep = self._record(rows, ids, stats, cfg)
                yield out
                self._check_owner(run)
                if not rows.active:  # the first rows (or a batch that had emptied): their cache replaces the last
                    self.cache, self.draft_context = cache, draft_context
                    h, g0 = self._select(keep, len(ids), h_new, g0_new, cache, draft_context)
                elif keep:
                    h_new, g0_new = self._select(keep, len(ids), h_new, g0_new, cache, draft_context)
                    self.cache.append(cache)
                    if draft_context is not None:
                        self.draft_context.append(draft_context)
                    h, g0 = torch.cat([h, h_new]), torch.cat([g0, g0_new])
                rows.active += [ids[i] for i in keep]
                continue
            if t.graphs is not None:  # every tree size for these rows captured before their steps (once)
                t.graphs.prepare(self.cache, margin)
            stats, h, g0 = step(rows, h, g0, cfg, gen)
            out, keep = self._record(rows, rows.active, stats, cfg)
            yield out
            self._check_owner(run)
            h, g0 = self._select(keep, len(rows.active), h, g0, self.cache, self.draft_context)
            rows.active = [rows.active[i] for i in keep]

    def _check_owner(self, run: object) -> None:
        """BadInputError when a generation resumes after another one of this Generator started: the caches
        are the newer one's now (interleaved streams would decode each other's context)."""
        if self._run is not run:
            raise BadInputError("this Generator started another generation before this one finished; they share "
                                "its KV cache, so this one cannot go on: finish a stream before starting the next, or "
                                "make one Generator(target, drafter) per stream")

    def _select(self, keep: list[int], n: int, h: torch.Tensor, g0: torch.Tensor, cache: Any = None,
                draft_context: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep rows `keep` of n in h (n, H), g0 (n,) and, when given, in the caches (in place).
        With no row left, the caches are left as they are (the next admission replaces them)."""
        if len(keep) == n or not keep:
            return h, g0
        idx = torch.tensor(keep, device=self.target.device)
        if cache is not None:
            cache.keep(idx)
        if draft_context is not None:
            draft_context.select(idx)
        return h.index_select(0, idx), g0.index_select(0, idx)

    # -- plain decoding -------------------------------------------------------------
    def plain(self, prompt_ids: list[int], cfg: DecodeConfig, reuse_cache: bool = False) -> Iterator[StepStats]:
        """Autoregressive decoding of one prompt, one target pass per token. reuse_cache: see `redraft`."""
        _check_single("plain", prompt_ids, cfg, reuse_cache)
        return (step[0][1] for step in self._rows([prompt_ids], cfg, None, 1, self._plain_step, reuse=reuse_cache))

    def plain_batch(self, prompts: list[list[int]], cfg: DecodeConfig, slots: int | None = None
                    ) -> Iterator[list[tuple[int, StepStats]]]:
        """Autoregressive decoding of several prompts, at most `slots` at once (default: all);
        one pass per token for all active rows."""
        _check_batch("plain_batch", prompts, cfg, slots)
        return self._rows(prompts, cfg, slots, 1, self._plain_step)

    def _plain_step(self, rows: _Rows, h: torch.Tensor, tok: torch.Tensor, cfg: DecodeConfig,
                    gen: torch.Generator | None):
        """One token for every active row; returns (StepStats per row, hidden (R, H), tokens (R,))."""
        t, cache = self.target, self.cache
        start = time.perf_counter()
        R = len(rows.active)
        one = torch.ones(R, 1, 1, dtype=torch.bool, device=t.device)
        hidden = t.forward_tree(tok.view(R, 1), cache.lengths.view(R, 1), cache, one)[:, -1]
        cache.advance(1)
        tok = choose_tokens(t.logits(hidden), cfg.sampling, gen)  # (R,)
        _sync(t.device)
        seconds = time.perf_counter() - start
        return [StepStats([int(x)], verify_s=seconds) for x in tok.tolist()], hidden, tok

    # -- ReDrafter ------------------------------------------------------------------
    def redraft(self, prompt_ids: list[int], cfg: DecodeConfig, reuse_cache: bool = False) -> Iterator[StepStats]:
        """Speculative decoding of one prompt with beam drafts and dynamic tree attention.

        reuse_cache: start from the KV cache the last one-prompt generation of this Generator
        (`plain` or `redraft`) left, where its prompt and output begin this prompt: a chat's next
        turn runs only its new tokens through the target (the first StepStats' `reused` counts
        the others). A drafter with context attention starts afresh."""
        _check_single("redraft", prompt_ids, cfg, reuse_cache)
        return (step[0][1] for step in self._redraft_rows([prompt_ids], cfg, None, reuse_cache))

    def redraft_batch(self, prompts: list[list[int]], cfg: DecodeConfig, slots: int | None = None
                      ) -> Iterator[list[tuple[int, StepStats]]]:
        """Speculative decoding of several prompts, at most `slots` at once (default: all):
        one draft and one tree pass per step for all active rows."""
        _check_batch("redraft_batch", prompts, cfg, slots)
        return self._redraft_rows(prompts, cfg, slots)

    def _redraft_rows(self, prompts: list[list[int]], cfg: DecodeConfig, slots: int | None, reuse: bool = False
                      ) -> Iterator[list[tuple[int, StepStats]]]:
        if self.proposer is None:
            raise BadInputError("ReDrafter decoding needs a drafter")
        self.check(cfg)
        has_context = getattr(self.drafter, "context", None) is not None
        margin = (cfg.beam_width + cfg.copied_beams) * cfg.tree_depth + 1
        return self._rows(prompts, cfg, slots, margin, self._redraft_step, context=has_context, reuse=reuse)

    def _redraft_step(self, rows: _Rows, h: torch.Tensor, g0: torch.Tensor, cfg: DecodeConfig,
                      gen: torch.Generator | None):
        """Draft, verify and accept once for every active row; returns (StepStats per row, h, g0)."""
        t, cache = self.target, self.cache
        has_context = self.draft_context is not None
        R = len(rows.active)
        budget = max(cfg.max_new_tokens - rows.emitted[r] for r in rows.active)
        room = min(t.max_context - len(rows.context[r]) for r in rows.active)
        length = max(1, min(cfg.beam_length, budget, room))
        t0 = time.perf_counter()
        contexts = [rows.context[r] for r in rows.active]
        beams = self._propose(h, g0, cfg.beam_width, length, contexts, cfg.tree_nodes)
        copy_length = max(1, min(cfg.lookup_length or cfg.beam_length, budget, room))
        if cfg.lookup_beams:
            beams = with_lookup_beams(beams, contexts, cfg.lookup_beams, copy_length)
        if cfg.datastore_beams:
            beams = with_datastore_beams(beams, contexts, self.drafter.datastore, cfg.datastore_beams, copy_length)
        tree = pack_tree(beams.tokens, cache.lengths)
        _sync(t.device)
        t1 = time.perf_counter()
        hidden = t.forward_tree(tree.tokens, tree.positions, cache, tree.mask, tree.valid)  # (R, n, H)
        logits = t.logits_at(hidden, tree.valid)  # (R, n, V); padding nodes of short rows are not scored
        _sync(t.device)
        t2 = time.perf_counter()
        acc = self._accept(beams, logits, tree.unpack, cfg, gen)
        start = cache.lengths.clone() if has_context else None  # g0's position, before the commit
        cache.commit(acc.path, acc.length + 1)
        ridx = torch.arange(R, device=t.device)
        if has_context:
            h = self._extend_context(hidden, tree.tokens, acc, start)  # (R, H): c at the last accepted node
        else:
            h = hidden[ridx, acc.path[ridx, acc.length]]  # (R, H): hidden state at the last accepted node
        lengths = acc.length.tolist()
        nodes = tree.num_nodes.tolist()
        _sync(t.device)
        t3 = time.perf_counter()
        steps = [StepStats(acc.emitted(beams.tokens, i), lengths[i], nodes[i], t1 - t0, t2 - t1, t3 - t2)
                 for i in range(R)]
        return steps, h, acc.bonus

    def _propose(self, h: torch.Tensor, g0: torch.Tensor, W: int, L: int, contexts: list[list[int]],
                 tree_nodes: int = 0) -> DraftBeams:
        if tree_nodes:  # only the drafter's proposer prunes its search to a node budget
            return self.proposer(h, g0, W, L, contexts, tree_nodes=tree_nodes)
        if getattr(self.proposer, "batched", False):
            return _checked(self.proposer(h, g0, W, L, contexts), g0, W, L, self.target.vocab_size)
        parts = [_checked(self.proposer(h[i : i + 1], g0[i : i + 1], W, L, ctx), g0[i : i + 1], W, L,
                          self.target.vocab_size) for i, ctx in enumerate(contexts)]
        return DraftBeams(torch.cat([p.tokens for p in parts]), torch.cat([p.logprobs for p in parts]))

    def _accept(self, beams: DraftBeams, logits, unpack, cfg: DecodeConfig, gen):
        if cfg.rule == "greedy":
            return accept_greedy(beams.tokens, logits, unpack)
        if cfg.rule == "rejection":
            return accept_rejection(beams.tokens, logits, unpack, cfg.sampling, gen)
        return accept_typical(
            beams.tokens, beams.logprobs, logits, unpack, cfg.sampling, gen, cfg.typical_epsilon, cfg.typical_delta
        )

    # -- convenience -------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], cfg: DecodeConfig, mode: str = "redraft",
                 on_step: Callable[[StepStats], Any] | None = None) -> "Generation":
        """Run a whole generation; mode 'redraft' or 'plain'."""
        _check_single("generate", prompt_ids, cfg)
        _check_callback("generate", "on_step", on_step)
        loop = self.redraft if _checked_mode(mode) == "redraft" else self.plain
        start = time.perf_counter()
        steps: list[StepStats] = []
        for s in loop(prompt_ids, cfg):
            steps.append(s)
            if on_step is not None:
                on_step(s)
        return Generation(steps, time.perf_counter() - start)

    def generate_batch(self, prompts: list[list[int]], cfg: DecodeConfig, mode: str = "redraft",
                       slots: int | None = None,
                       on_row_done: Callable[[int, "Generation"], Any] | None = None) -> "BatchGeneration":
        """Decode `prompts`, at most `slots` rows at once (default: all; continuous batching
        otherwise); mode 'redraft' or 'plain'. Each row's Generation.seconds runs from the
        start of the pass that admitted it to the end of the pass that finished it;
        `on_row_done(row, generation)` is called as each row finishes."""
        _check_batch("generate_batch", prompts, cfg, slots)
        _check_callback("generate_batch", "on_row_done", on_row_done)
        run = BatchRun(self, prompts, cfg, mode, slots, on_row_done)
        while run.step():
            pass
        return run.result()


def _check_config(method: str, cfg: Any) -> None:
    """A DecodeConfig, checked again: its fields may have changed since it was made (`cfg.sampling.temperature
    = -1` sampled from the inverted distribution, `cfg.accept = "foo"` was ignored)."""
    if not isinstance(cfg, DecodeConfig):
        raise BadInputError(f"{method} needs a DecodeConfig as cfg (DecodeConfig(...) or drafter.decode_config(...)), "
                            f"got {type(cfg).__name__}")
    cfg.__post_init__()
    cfg.sampling.__post_init__()


def _check_single(method: str, prompt_ids: Any, cfg: Any, reuse_cache: Any = False) -> None:
    """The entry checks of a one-prompt method (the prompt's ids are checked by Target.check_prompt)."""
    _check_config(method, cfg)
    if not isinstance(reuse_cache, bool):
        raise BadInputError(f"{method}'s reuse_cache must be True or False, got {reuse_cache!r}")
    if isinstance(prompt_ids, (list, tuple)) and prompt_ids and isinstance(prompt_ids[0], (list, tuple)):
        raise BadInputError(f"{method} takes one prompt (a list of token ids), got a list of lists; "
                            f"for several prompts use {method}_batch")


def _check_batch(method: str, prompts: Any, cfg: Any, slots: Any) -> None:
    """The entry checks of a batch method: cfg, the prompts list (not its ids) and slots."""
    _check_config(method, cfg)
    if not isinstance(prompts, (list, tuple)):
        raise BadInputError(f"{method} takes a list of prompts (each a list of token ids), got {type(prompts).__name__}")
    if prompts and all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in prompts):
        raise BadInputError(f"{method} takes a list of prompts (each a list of token ids), got one flat list of "
                            f"ints; wrap a single prompt as [ids]")
    if slots is not None and (not isinstance(slots, numbers.Integral) or isinstance(slots, bool)):
        raise BadInputError(f"{method}'s slots must be an int or None, got {type(slots).__name__}")
    if slots is not None and slots < 1:
        raise BadInputError(f"the batch needs at least one slot, got {slots}")


def _check_callback(method: str, name: str, fn: Any) -> None:
    if fn is not None and not callable(fn):
        raise BadInputError(f"{method}'s {name} must be callable or None, got {type(fn).__name__}")


def _checked_mode(mode: str) -> str:
    if mode not in ("redraft", "plain"):
        raise BadInputError(f"mode must be 'redraft' or 'plain', got {mode!r}")
    return mode


class BatchRun:
    """A batched generation advanced one target pass at a time (`step`), timing only its own
    passes: two runs stepped in turn (bench's plain and ReDrafter paths at --batch-size B)
    each count their own seconds, under the same machine conditions."""

    def __init__(self, gen: Generator, prompts: list[list[int]], cfg: DecodeConfig, mode: str = "redraft",
                 slots: int | None = None, on_row_done: Callable[[int, "Generation"], Any] | None = None) -> None:
        loop = gen.redraft_batch if _checked_mode(mode) == "redraft" else gen.plain_batch
        self._passes = loop(prompts, cfg, slots)
        self.on_row_done = on_row_done
        self.steps: list[list[StepStats]] = [[] for _ in prompts]
        self.begin = [0.0] * len(prompts)
        self.seconds = [0.0] * len(prompts)
        self.pass_stats: list[StepStats] = []
        self.clock = 0.0  # seconds spent in this run's own passes
        self.done = False

    def step(self) -> bool:
        """Run one pass; False once the generation has finished."""
        if self.done:
            return False
        start = time.perf_counter()
        out = next(self._passes, None)
        before, self.clock = self.clock, self.clock + time.perf_counter() - start
        if out is None:
            self.done = True
            return False
        first = out[0][1]
        self.pass_stats.append(StepStats([], 0, 0, first.draft_s, first.verify_s, first.accept_s, first.prefill))
        for row, st in out:
            if not self.steps[row]:
                self.begin[row] = before
            self.steps[row].append(st)
            self.seconds[row] = self.clock - self.begin[row]
            if st.finished and self.on_row_done is not None:
                self.on_row_done(row, Generation(self.steps[row], self.seconds[row]))
        return True

    def result(self) -> "BatchGeneration":
        return BatchGeneration([Generation(s, t) for s, t in zip(self.steps, self.seconds)], self.clock,
                               self.pass_stats)


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


@dataclass
class BatchGeneration:
    """Several prompts decoded together: one Generation per row, the wall-clock
    seconds of the whole batch, and one StepStats per target pass (its time
    split, shared by the rows that took part; `passes` counts them)."""

    rows: list[Generation]
    seconds: float
    pass_stats: list[StepStats]

    @property
    def passes(self) -> int:
        return len(self.pass_stats)

    @property
    def tokens(self) -> list[list[int]]:
        return [g.tokens for g in self.rows]
