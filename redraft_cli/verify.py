"""Acceptance rules (DESIGN section 5): which drafted tokens the target keeps.

The target's logits at node (i, k) score the token at (i, k+1); the logits at
the last node of the accepted path give the bonus token. All three rules
return an `Acceptance`: the chosen beam, how many drafted tokens it keeps,
and the bonus token. Everything is vectorised over (batch, beam, depth).

greedy
    The target's choice at each node is its argmax. Accept while
    beam[k+1] == argmax p_k; the longest run wins; the bonus is the argmax at
    its end. Output is identical to plain greedy decoding.

rejection (lossless sampling with deterministic drafts)
    DESIGN's rule: at a node with target distribution p and distinct children
    c1..cm, accept c1 with probability p(c1); if rejected remove c1 from p and
    renormalise, try c2, ...; if all are rejected (or at a leaf) sample the
    next token from what is left of p. Child c_j is then taken with
    probability p(c_j) exactly, and any other token x is emitted with
    probability p(x). That is the law of one draw x ~ p at the node: follow
    the child equal to x if there is one, else emit x and stop. We implement
    it that way: one independent draw per *node* (never per beam cell, which
    would re-draw shared nodes and bias acceptance upwards), then the same
    longest-path walk as greedy. Each emitted token is distributed exactly
    as p given the tokens before it, so the output law equals plain sampling.

typical (Medusa, lossy)
    Accept candidate x at a node if p(x) > min(epsilon, delta * exp(-H(p))).
    Longest accepted path wins, ties broken by the drafter's log-probability;
    the bonus token is sampled from p at the end node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sampling import SamplingConfig, choose_tokens, logits_to_probs, sample
from .tree_attention import unpack_nodes

ACCEPT_RULES = ("greedy", "rejection", "typical")


@dataclass
class Acceptance:
    """beam: (B,) chosen beam; length: (B,) accepted drafted tokens (0..L-1);
    bonus: (B,) the target's own next token; path: (B, L) packed node indices of
    the chosen beam (the first length+1 are the committed path: g0 and accepted)."""

    beam: torch.Tensor
    length: torch.Tensor
    bonus: torch.Tensor
    path: torch.Tensor

    def emitted(self, beams: torch.Tensor, row: int = 0) -> list[int]:
        """The tokens this step emits for one row: accepted drafts then the bonus."""
        b, a = int(self.beam[row]), int(self.length[row])
        return beams[row, b, 1 : a + 1].tolist() + [int(self.bonus[row])]


def _longest(accept: torch.Tensor, tie_score: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """accept: (B, W, L-1) bool, cell k says drafted token k+1 is accepted.

    Returns (beam (B,), length (B,)): the beam with the longest all-accepted
    prefix; among the longest, the highest tie_score (B, W) if given, else the
    lowest index.
    """
    length = torch.cumprod(accept.to(torch.int64), dim=-1).sum(-1)  # (B, W)
    if tie_score is None:
        beam = length.argmax(dim=-1)  # first max on ties
    else:
        longest = length == length.max(dim=-1, keepdim=True).values
        beam = torch.where(longest, tie_score.float(), torch.full_like(tie_score.float(), float("-inf"))).argmax(-1)
    return beam, length.gather(1, beam.unsqueeze(1)).squeeze(1)


def _finish(beam: torch.Tensor, length: torch.Tensor, choice_grid: torch.Tensor, unpack: torch.Tensor) -> Acceptance:
    """Bonus = the target's choice at the last accepted node of the chosen beam."""
    B = beam.shape[0]
    rows = torch.arange(B, device=beam.device)
    bonus = choice_grid[rows, beam, length]
    path = unpack[rows, beam]  # (B, L)
    return Acceptance(beam, length, bonus, path)


def walk_choices(beams: torch.Tensor, node_choice: torch.Tensor, unpack: torch.Tensor) -> Acceptance:
    """Follow the tree while the target's per-node choice matches a drafted child.

    beams: (B, W, L); node_choice: (B, n) the target's token at each node;
    unpack: (B, W, L). Beams whose accepted prefixes tie share one path, so the
    first longest beam is as good as any.
    """
    choice_grid = unpack_nodes(node_choice, unpack)  # (B, W, L)
    accept = beams[:, :, 1:] == choice_grid[:, :, :-1]  # (B, W, L-1); padding (-1) never matches
    beam, length = _longest(accept)
    return _finish(beam, length, choice_grid, unpack)


def accept_greedy(beams: torch.Tensor, node_logits: torch.Tensor, unpack: torch.Tensor) -> Acceptance:
    """beams (B, W, L), node_logits (B, n, V), unpack (B, W, L)."""
    return walk_choices(beams, node_logits.argmax(dim=-1), unpack)


def accept_rejection(
    beams: torch.Tensor,
    node_logits: torch.Tensor,
    unpack: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> Acceptance:
    """Lossless sampling: one draw per node from p (module docstring)."""
    return walk_choices(beams, choose_tokens(node_logits, sampling, generator), unpack)


def accept_typical(
    beams: torch.Tensor,
    beam_logprobs: torch.Tensor,
    node_logits: torch.Tensor,
    unpack: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> Acceptance:
    """Typical acceptance. beam_logprobs: (B, W, L-1) drafter log-probabilities."""
    if sampling.greedy:
        return accept_greedy(beams, node_logits, unpack)
    probs = logits_to_probs(node_logits, sampling)  # (B, n, V)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # (B, n)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    probs_grid = unpack_nodes(probs, unpack)  # (B, W, L, V)
    child = beams[:, :, 1:]
    p_child = probs_grid[:, :, :-1].gather(-1, child.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, W, L-1)
    accept = (p_child > unpack_nodes(threshold, unpack)[:, :, :-1]) & (child >= 0)  # padding is never accepted
    # A leading 0 column: beams of length 1 (no drafts) have nothing to gather.
    cum_logp = F.pad(torch.cumsum(beam_logprobs, dim=-1), (1, 0))  # (B, W, L): cum_logp[..., a] = logp of a drafts
    length_all = torch.cumprod(accept.to(torch.int64), dim=-1).sum(-1)  # (B, W)
    tie = cum_logp.gather(-1, length_all.unsqueeze(-1)).squeeze(-1)  # (B, W)
    beam, length = _longest(accept, tie)
    node_choice = sample(probs, generator)  # (B, n)
    return _finish(beam, length, unpack_nodes(node_choice, unpack), unpack)
