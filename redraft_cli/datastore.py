"""Datastore beams: draft by copying what the target wrote after the same n-gram in its training answers.

The drafter learns the target's habits from its distillation data; the data
can also be looked up directly (retrieval drafting, as in REST, He et al.
2023). A datastore holds the target's own answer tokens from that data, all
answers concatenated with SEP (-1) between them, and an index of their
n-grams (n = 1..ngram_max). A step's query is the context's last n tokens,
longest n first that occurs in the store, down to `ngram_min` (2: a single
token says too little); its most recent `max_rows` occurrences give
continuation rows, which are walked as a trie: beam j starts with the j-th
most frequent next token, then follows, token by token, the most frequent
next token among the rows that agree so far (ties: the smaller token id).
It stops at an answer's end, and where fewer than `min_share` (0.3) of the
query's rows still agree: past that point the store is guessing, and every
guessed token would cost the target a tree node. The target verifies these
beams like the drafter's, so output is unchanged.

Unlike the context lookup (lookup.py), which copies from the conversation
itself, the datastore finds the target's stock phrases in unseen
conversations. In a greedy simulation of the shipped SmolLM2 drafter (48
held-out conversations, 128 tokens, beside its adaptive lookup beam), one
datastore beam raised tokens per step from 2.94 to 3.11 for 2.2 more tree
nodes a step; without the share rule and with 1-grams, two beams of 8
tokens had cost ten more nodes for a similar gain.

Worked example, ngram_max = 2, answers [4, 7, 1, 2], [4, 7, 1, 3], [9, 7, 5]:

    tokens  = [4, 7, 1, 2, -1, 4, 7, 1, 3, -1, 9, 7, 5, -1]
    context [..., 4, 7], 3 tokens after g0 = 7:
      2-gram [4, 7] occurs twice; rows [1, 2, -1], [1, 3, -1]
      beam 0: 1 (2 rows), then 2 or 3 (1 row each, half the rows: the smaller id, 2), then -1 ends it
              -> [7, 1, 2, PAD]
    context [..., 8, 7]: [8, 7] never occurs -> no beam (with ngram_min = 1, the 1-gram [7]
      occurs 3 times: rows [1, 2, -1], [1, 3, -1], [5, -1, 4]: beam 0 = [7, 1, 2, PAD], beam 1 = [7, 5, PAD, PAD])

On disk (`datastore.safetensors` in a drafter directory): `tokens` (T,),
stored as token id + 1 (0 = SEP) in uint16 when the vocabulary allows it,
else int32; metadata `vocab_size` and `answers`. The index is rebuilt when
first queried (about a second per million tokens).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch

from .errors import BadInputError, DrafterLoadError
from .files import atomic_write, safetensors_bytes
from .lookup import PAD, append_beams, copy_length

if TYPE_CHECKING:  # (beam_search imports this module)
    from .beam_search import DraftBeams

DATASTORE_NAME = "datastore.safetensors"
SEP = -1


class Datastore:
    """The target's answer tokens, (T,) int64 with SEP between answers, and their n-gram index."""

    def __init__(self, tokens: torch.Tensor, vocab_size: int, answers: int = 0, ngram_max: int = 3,
                 max_rows: int = 1024, ngram_min: int = 2, min_share: float = 0.3, min_rows: int = 1) -> None:
        self.tokens = tokens.to(torch.long).cpu()
        if self.tokens.numel() == 0 or int(self.tokens[-1]) != SEP:
            self.tokens = torch.cat([self.tokens, torch.tensor([SEP])])
        self.vocab_size = int(vocab_size)
        self.answers = int(answers)
        self.ngram_max = int(ngram_max)
        self.max_rows = int(max_rows)
        self.min_share = float(min_share)
        self.min_rows = int(min_rows)
        self.bits = max(1, (self.vocab_size - 1).bit_length())
        # n-gram keys pack n token ids exactly into one int64: no hash collisions.
        self.ngram_max = max(1, min(self.ngram_max, 62 // self.bits))
        self.ngram_min = max(1, min(int(ngram_min), self.ngram_max))
        self._index: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return int(self.tokens.numel())

    @property
    def max_token(self) -> int:
        return int(self.tokens.max())

    # -- construction, save and load -----------------------------------------
    @classmethod
    def from_answers(cls, answers: Iterable[torch.Tensor | list[int]], vocab_size: int, **kwargs) -> "Datastore":
        """One datastore from answer token lists (each the target's tokens of one answer: ids in
        0..vocab_size-1). Anything else is a one-line BadInputError."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise BadInputError(f"Datastore.from_answers' vocab_size must be a positive int, got {vocab_size!r}")
        parts, n = [], 0
        for i, a in enumerate(answers):
            try:
                a = torch.as_tensor(a)
            except (TypeError, ValueError, RuntimeError):
                raise BadInputError(f"Datastore.from_answers: answer {i + 1} is not a list of token ids") from None
            if a.numel() and (a.is_floating_point() or a.is_complex() or a.dtype == torch.bool):
                raise BadInputError(f"Datastore.from_answers: answer {i + 1} holds {a.dtype} values, not token ids")
            a = a.to(torch.long).flatten()
            low, high = (int(a.min()), int(a.max())) if a.numel() else (0, 0)
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                raise BadInputError(f"Datastore.from_answers: answer {i + 1} holds token id {bad}, outside the "
                                    f"vocabulary of {vocab_size} (ids 0..{vocab_size - 1})")
            if a.numel():
                parts += [a, torch.tensor([SEP])]
                n += 1
        tokens = torch.cat(parts) if parts else torch.tensor([SEP])
        return cls(tokens, vocab_size, answers=n, **kwargs)

    @classmethod
    def from_examples(cls, examples: Iterable[dict], vocab_size: int, **kwargs) -> "Datastore":
        """From distillation examples (input_ids (T,), loss_mask (T,)): each run of generated tokens is an answer."""
        answers = []
        for e in examples:
            ids, mask = e["input_ids"].to(torch.long), e["loss_mask"].to(torch.bool)
            edges = torch.diff(torch.nn.functional.pad(mask.to(torch.int8), (1, 1)))
            starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
            answers += [ids[s:t] for s, t in zip(starts.tolist(), ends.tolist())]
        return cls.from_answers(answers, vocab_size, **kwargs)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (a .safetensors file) atomically."""
        path = Path(path)
        shifted = self.tokens + 1  # SEP -> 0
        stored = shifted.to(torch.uint16) if self.vocab_size < 2**16 else shifted.to(torch.int32)
        meta = {"format": "pt", "vocab_size": str(self.vocab_size), "answers": str(self.answers)}
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(safetensors_bytes({"tokens": stored}, meta)))

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "Datastore":
        """Read a datastore file; errors are `DrafterLoadError` with one-line messages."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tokens = f.get_tensor("tokens")
            if "vocab_size" not in meta:
                raise ValueError("its metadata lacks vocab_size")
            vocab_size = int(meta["vocab_size"])
            answers = int(meta.get("answers", 0))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DrafterLoadError(f"datastore {path} is corrupt: {exc}") from exc
        except KeyError:
            raise DrafterLoadError(f"datastore {path} is corrupt: it holds no 'tokens' tensor") from None
        if tokens.dim() != 1:
            raise DrafterLoadError(f"datastore {path} is corrupt: tokens have shape {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise DrafterLoadError(f"datastore {path} is corrupt: its tokens are {tokens.dtype}, not token ids")
        tokens = tokens.to(torch.long) - 1
        if tokens.numel() and (int(tokens.min()) < SEP or int(tokens.max()) >= vocab_size):
            raise DrafterLoadError(f"datastore {path} holds token ids outside its vocabulary of {vocab_size}")
        return cls(tokens, vocab_size, answers=answers, **kwargs)

    # -- lookup ----------------------------------------------------------------
    def _keys(self, windows: torch.Tensor) -> torch.Tensor:
        """(..., n) token ids >= 0 -> (...,) int64 keys, exact."""
        n = windows.shape[-1]
        shifts = torch.arange(n - 1, -1, -1, dtype=torch.long) * self.bits
        return (windows << shifts).sum(-1)

    def index(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """n -> (sorted keys (M,), start of each window (M,)), windows holding SEP left out.
        Equal keys keep their positions in order (stable sort), so the last ones are the most recent."""
        if self._index is None:
            self._index = {}
            for n in range(1, self.ngram_max + 1):
                if len(self) < n:
                    break
                windows = self.tokens.unfold(0, n, 1)  # (T - n + 1, n)
                starts = (windows >= 0).all(-1).nonzero().flatten()
                keys = self._keys(windows[starts])
                keys, order = torch.sort(keys, stable=True)
                self._index[n] = (keys, starts[order].to(torch.int32 if len(self) < 2**31 else torch.long))
        return self._index

    def match(self, context: list[int]) -> tuple[int, torch.Tensor]:
        """The longest suffix n-gram of `context` found (n >= ngram_min; 0: none) and the store positions
        right after its latest `max_rows` occurrences, (R,) int64."""
        index = self.index()
        ctx = torch.tensor(context[-self.ngram_max :], dtype=torch.long)
        for n in range(min(self.ngram_max, len(ctx)), self.ngram_min - 1, -1):
            tail = ctx[-n:]
            if n not in index or int(tail.min()) < 0 or int(tail.max()) >= self.vocab_size:
                continue
            keys, starts = index[n]
            q = self._keys(tail)
            lo, hi = int(torch.searchsorted(keys, q)), int(torch.searchsorted(keys, q, right=True))
            if hi > lo:
                return n, starts[max(lo, hi - self.max_rows) : hi].long() + n
        return 0, torch.empty(0, dtype=torch.long)

    def _rows(self, after: torch.Tensor, length: int) -> torch.Tensor:
        """(R,) store positions -> (R, length) tokens from each."""
        at = (after.unsqueeze(1) + torch.arange(length)).clamp_(max=len(self) - 1)
        return self.tokens[at]

    def continuations(self, context: list[int], num_beams: int, length: int) -> list[list[int]]:
        """Up to `num_beams` distinct continuations of `context`, most frequent first.

        Each holds at most `copy_length(n, length + 1) - 1` tokens for a match of n tokens (the
        context lookup's rule, lookup.py), and goes on only while at least `min_share` of the query's
        rows (and `min_rows`) agree with it, so it stops where the store stops being sure; a first
        token too rare to be likely is not proposed at all.
        """
        n, after = self.match(context)
        if not n or length < 1:
            return []
        rows = self._rows(after, copy_length(n, length + 1) - 1)  # (R, D)
        need = max(self.min_rows, self.min_share * len(rows))
        firsts, counts = rows[:, 0].unique(return_counts=True)
        counts = torch.where(firsts >= 0, counts, 0)
        order = counts.argsort(descending=True, stable=True)
        out = []
        for f, c in zip(firsts[order[:num_beams]].tolist(), counts[order[:num_beams]].tolist()):
            if f < 0 or c < need:
                break
            sel, path = rows[rows[:, 0] == f], [f]
            for d in range(1, rows.shape[1]):
                values, c = sel[:, d].unique(return_counts=True)
                best = int(values[c.argmax()])  # the first maximum: the smaller id on ties
                if best < 0 or int(c.max()) < need:
                    break
                path.append(best)
                sel = sel[sel[:, d] == best]
            out.append(path)
        return out

    def beams(self, contexts: list[list[int]], num_beams: int, beam_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Datastore beams per context, in lookup.lookup_beams' layout.

        contexts: B token lists, each ending with its g0. Returns tokens (B,
        num_beams, L) int64 (beam[0] = g0, PAD after a continuation that ends
        early) and found (B, num_beams) bool.
        """
        B, L = len(contexts), beam_length
        tokens = torch.full((B, num_beams, L), PAD, dtype=torch.long)
        found = torch.zeros(B, num_beams, dtype=torch.bool)
        for b, ctx in enumerate(contexts):
            tokens[b, :, 0] = ctx[-1]
            if L < 2:
                continue
            for j, cont in enumerate(self.continuations(ctx, num_beams, L - 1)):
                tokens[b, j, 1 : 1 + len(cont)] = torch.tensor(cont)
                found[b, j] = True
        return tokens, found


def with_datastore_beams(beams: "DraftBeams", contexts: list[list[int]], datastore: Datastore, num_beams: int,
                         length: int | None = None) -> "DraftBeams":
    """Append up to `num_beams` datastore beams per row: (B, W, L) -> (B, W + num_beams, max(L, length))."""
    length = beams.tokens.shape[-1] if length is None else length
    if num_beams < 1 or length < 2:
        return beams
    return append_beams(beams, *datastore.beams(contexts, num_beams, length))
