"""Context lookup beams: draft by copying what followed the same n-gram earlier.

Chat models repeat themselves and their prompt (names, code, lists, the
question's wording): in SmolLM2's self-distilled answers 45% of positions
complete a 4-gram seen earlier in the same sequence. A lookup beam costs no
model call: find the latest earlier occurrence of the sequence's last n
tokens (n = ngram_max down to ngram_min, longest first) and propose the
tokens that followed it. ReDrafter's tree takes such beams beside the
drafter's; the target verifies them like any other, so output is unchanged
(greedy and rejection sampling alike: both rules hold for any deterministic
tree of drafts).

Worked example, L = 4 (g0 + 3 drafts), ngram_max = 2:

    sequence = [5, 8, 2, 9, 7, 5, 8]      (ends with g0 = 8)
    last 2-gram [5, 8] occurs at 0..1  ->  beam = [8, 2, 9, 7]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = -1  # a beam cell holding no token (a beam shorter than the tree's depth)


def lookup_beams(sequences: list[list[int]], num_beams: int, beam_length: int, ngram_max: int = 3,
                 ngram_min: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `num_beams` distinct lookup beams per sequence.

    sequences: B token lists, each ending with its g0. Returns tokens (B,
    num_beams, L) int64 (beam[0] = g0) and found (B, num_beams) bool;
    beams not found hold g0 repeated and must be replaced by the caller.
    Matches are taken most recent first, longest n-gram first.
    """
    B, L = len(sequences), beam_length
    tokens = torch.zeros(B, num_beams, L, dtype=torch.long)
    found = torch.zeros(B, num_beams, dtype=torch.bool)
    for b, seq in enumerate(sequences):
        tokens[b, :, :] = seq[-1]
        if L < 2 or len(seq) < 2:
            continue
        s = torch.tensor(seq, dtype=torch.long)
        got: list[list[int]] = []
        for n in range(min(ngram_max, len(s) - 1), ngram_min - 1, -1):
            # Windows s[i : i + n] for start i with a full continuation after them, excluding the suffix itself.
            last = len(s) - n - (L - 1)
            if last < 0:
                continue
            windows = s[: last + n].unfold(0, n, 1)  # (last + 1, n): starts 0..last
            hits = (windows == s[-n:]).all(-1).nonzero().flatten().flip(0)  # most recent first
            for i in hits.tolist():
                cont = s[i + n : i + n + L - 1].tolist()
                if cont not in got:
                    got.append(cont)
                if len(got) == num_beams:
                    break
            if len(got) == num_beams:
                break
        for j, cont in enumerate(got):
            tokens[b, j, 1:] = torch.tensor(cont)
            found[b, j] = True
    return tokens, found


def with_lookup_beams(beams: "DraftBeams", sequences: list[list[int]], num_beams: int,
                      length: int | None = None) -> "DraftBeams":
    """Append up to `num_beams` lookup beams per row to drafted beams (B, W, L) -> (B, W + num_beams, L').

    Lookup beams hold `length` tokens (counting g0; default L). They may be
    longer than the drafted beams: copying is free, and when the target
    repeats itself a long copy is accepted whole. The result is as long as
    the longer kind, L' = max(L, length); the shorter beams are padded with
    PAD (-1), which the tree and the acceptance rules treat as "no node".

    A lookup beam that was not found becomes a copy of the row's first
    drafted beam, which the tree deduplicates (no extra nodes). Lookup beams
    carry log-probability 0 (the drafter did not score them).

    Worked example, W = 1 drafted beam [7, 3, 4], length 5, a lookup hit [7, 3, 9, 9, 2]:

        tokens = [[7,  3,  4, -1, -1],
                  [7,  3,  9,  9,  2]]     -> tree nodes 7, 3, 4, 9, 9, 2 (6 nodes)
    """
    length = beams.tokens.shape[-1] if length is None else length
    if num_beams < 1 or length < 2:
        return beams
    return append_beams(beams, *lookup_beams(sequences, num_beams, length))


def append_beams(beams: "DraftBeams", extra: torch.Tensor, found: torch.Tensor) -> "DraftBeams":
    """Append copied beams to drafted ones: (B, W, L) + extra (B, n, L2) -> (B, W + n, max(L, L2)).

    found (B, n) bool: a beam not found becomes a copy of the row's first
    drafted beam (no extra tree nodes). Copied beams carry log-probability 0.
    """
    from .beam_search import DraftBeams

    B, W, L = beams.tokens.shape
    n, Lout = extra.shape[1], max(L, extra.shape[-1])
    extra, found = extra.to(beams.tokens.device), found.to(beams.tokens.device)
    drafted, logprobs = pad_beams(beams.tokens, Lout), F.pad(beams.logprobs, (0, Lout - L))
    extra = pad_beams(extra, Lout)
    fallback = drafted[:, :1].expand(B, n, Lout)
    extra = torch.where(found.unsqueeze(-1), extra, fallback)
    extra_logprobs = torch.zeros(B, n, Lout - 1, dtype=logprobs.dtype, device=logprobs.device)
    return DraftBeams(torch.cat([drafted, extra], 1), torch.cat([logprobs, extra_logprobs], 1))


def pad_beams(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """(B, W, L) -> (B, W, length), new cells PAD (-1)."""
    return F.pad(tokens, (0, length - tokens.shape[-1]), value=PAD)
