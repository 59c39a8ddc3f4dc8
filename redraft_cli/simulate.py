"""Offline acceptance simulation: greedy tokens per step without running the target.

With greedy self-distillation data the target's answer is known: it is the
data. A greedy ReDrafter step at answer position p (g0 = x_p, h = h_{p-1},
the target's hidden state before it) keeps the longest prefix of any beam
that equals x_{p+1}, x_{p+2}, ...; the bonus token is the next data token.
So tokens per step for any beam shape follows from the drafter, the cached
hidden states and the data alone: seconds instead of minutes of target
passes, and equal to real decoding up to the rounding differences between
the cached hidden states and the decoder's own (equal in a test on a tiny
model). On this project's CPU, with data from the float32 target and
`bench` running bfloat16 (whose greedy answers differ here and there), the
two agreed within 1-4%: 1.594 against 1.608 and 1.693 against 1.700 tokens
per step for one drafter, 1.78 against 1.85 for another, on 10 Vicuna-bench
questions.

The loop follows `Generator.redraft_batch`: the first answer token comes from
the prefill, then each step drafts beams of min(L, budget) tokens (plus
lookup beams) and emits accepted + 1 tokens, cut to the budget.

Worked example, one answer x = [a, b, c, d, e] (max_new_tokens 5), L = 3:

    prefill emits a                       (emitted 1)
    step 1: g0 = a, beams [a b c], [a b x] -> keeps b c, bonus d  (emitted 4)
    step 2: g0 = d, budget 1 -> beams [d] -> keeps nothing, bonus e (emitted 5)
    tokens per step = (5 - 1) / 2 = 2.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .beam_search import draft_beams
from .drafter import Drafter
from .datastore import with_datastore_beams
from .lookup import with_lookup_beams


@dataclass
class SimulationResult:
    steps: int
    tokens: int  # tokens emitted by decode steps (the prefill's first token left out)
    answers: int

    @property
    def tokens_per_step(self) -> float | None:
        """None when no step was simulated (answers of one token): a ratio with nothing to divide."""
        return self.tokens / self.steps if self.steps else None

    def to_dict(self) -> dict:
        tps = self.tokens_per_step
        return {"steps": self.steps, "tokens": self.tokens, "answers": self.answers,
                "tokens_per_step": round(tps, 4) if tps is not None else None}


def answer_spans(example: dict, max_new_tokens: int | None = None) -> list[tuple[int, int]]:
    """[start, end) of each run of generated tokens (an answer) in an example's loss_mask (T,)."""
    mask = example["loss_mask"].to(torch.int8)
    edges = torch.diff(torch.nn.functional.pad(mask, (1, 1)))
    starts = (edges == 1).nonzero().flatten().tolist()
    ends = (edges == -1).nonzero().flatten().tolist()
    return [(s, e if max_new_tokens is None else min(e, s + max_new_tokens)) for s, e in zip(starts, ends) if s > 0]


@torch.no_grad()
def simulate_greedy(drafter: Drafter, examples: list[dict], beam_width: int, beam_length: int,
                    lookup_beams: int = 0, lookup_length: int = 0, max_new_tokens: int | None = None,
                    datastore_beams: int = 0, tree_nodes: int = 0) -> SimulationResult:
    """Tokens per step of greedy ReDrafter decoding (batch 1) on greedy data.

    examples: dicts with input_ids (T,), loss_mask (T,) bool (the target's own
    greedy answer tokens) and hidden (T, H), the target's post-norm hidden
    states. Every answer (a run of generated tokens after a prompt, cut to
    max_new_tokens) is decoded as if its prompt were everything before it.
    All answers advance together: one `draft_beams` call per round and beam
    length (rows near their end draft shorter beams, as the decoder does).
    Datastore beams come from `drafter.datastore` (up to lookup_length tokens long);
    tree_nodes > 0 keeps that many drafted tokens of the search (beam_search.py).
    """
    device = drafter.rnn_w.weight.device
    dtype = drafter.rnn_w.weight.dtype
    # One cursor per answer: [example, position of g0, end of the answer].
    cursors = [[i, s, e] for i, ex in enumerate(examples) for s, e in answer_spans(ex, max_new_tokens)]
    # The drafter's input at each position: h, or c with context attention (the data is what decoding commits).
    states = [drafter.context_states(ex["hidden"][None].to(device=device, dtype=dtype), ex["input_ids"][None].to(device))[0]
              if drafter.context is not None else ex["hidden"] for ex in examples]
    result = SimulationResult(0, 0, len(cursors))
    while True:
        cursors = [c for c in cursors if c[2] - c[1] - 1 > 0]  # tokens left to emit after g0
        if not cursors:
            return result
        groups: dict[tuple[int, int], list[list[int]]] = {}
        for c in cursors:
            budget = c[2] - c[1] - 1
            groups.setdefault((min(beam_length, budget), min(lookup_length or beam_length, budget)), []).append(c)
        for (length, look), rows in groups.items():
            h = torch.stack([states[c[0]][c[1] - 1] for c in rows]).to(device=device, dtype=dtype)
            g0 = torch.stack([examples[c[0]]["input_ids"][c[1]] for c in rows]).to(device)
            beams = draft_beams(drafter, h, g0, beam_width, length, tree_nodes)
            if lookup_beams or datastore_beams:
                contexts = [examples[c[0]]["input_ids"][: c[1] + 1].tolist() for c in rows]
            if lookup_beams:
                beams = with_lookup_beams(beams, contexts, lookup_beams, look)
            if datastore_beams:
                beams = with_datastore_beams(beams, contexts, drafter.datastore, datastore_beams, look)
            tokens = beams.tokens.cpu()  # (R, W', D), D = max(length, look)
            D = tokens.shape[-1]
            # The data's next D-1 tokens after g0; -2 past the answer's end never matches.
            truth = torch.stack([F.pad(examples[c[0]]["input_ids"][c[1] + 1 : c[2]], (0, D), value=-2)[: D - 1]
                                 for c in rows])  # (R, D-1)
            match = tokens[:, :, 1:] == truth.unsqueeze(1)  # (R, W', D-1)
            accepted = torch.cumprod(match.to(torch.int64), dim=-1).sum(-1).max(dim=-1).values  # (R,)
            for c, a in zip(rows, accepted.tolist()):
                result.steps += 1
                result.tokens += a + 1
                c[1] += a + 1
