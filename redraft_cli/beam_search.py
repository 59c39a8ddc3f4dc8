"""Beam drafting (DESIGN section 3): W beams of length L from the recurrent drafter.

A beam is `[g0, d1, ..., d_{L-1}]`; L counts g0, so L-1 drafter steps run.
Each step: advance the W recurrent states with the beams' last tokens, score
the draft vocabulary, add each beam's running log-probability, keep the top W
of the W*V_d flattened scores, and gather states/histories by parent.

Worked example, W=2, L=3, g0=7, draft vocabulary {0..9}:

    step 1: running = [0, -inf]  -> only beam 0 expands; its top-2: token 3 (-0.9), token 5 (-1.2)
            beams = [[7, 3], [7, 5]], running = [-0.9, -1.2]
    step 2: scores[i, v] = running[i] + logp_i(v), flattened to 2*10 entries; say
            beam 1's best child (token 3, -0.1) scores -1.3 and beam 0's best (token 4, -0.6) -1.5:
            top-2 indices 13 -> parent 1, token 3;  4 -> parent 0, token 4
            beams = [[7, 5, 3], [7, 3, 4]]   (histories gathered by parent)

Node budget (`tree_nodes` = N > 0, EAGLE-2's dynamic tree on ReDrafter's
beams): the target's cost grows with the tree's nodes, and the W final beams
are not the tree's most likely nodes (a beam's deep tail can be far less
likely than a dropped sibling near the root). So the search keeps every
prefix it kept at any step, W * (L-1) distinct nodes, each scored by its
running log-probability, and returns the N best, one beam per node (its path,
PAD after it). A child never scores above its parent and the candidates are
ordered by depth, so a stable sort keeps the set prefix-closed: a tree of
exactly N drafted nodes (plus g0). In the example above with N = 3:

    candidates  [7, 3] -0.9   [7, 5] -1.2   [7, 5, 3] -1.3   [7, 3, 4] -1.5
    kept        [[7, 3, -1], [7, 5, -1], [7, 5, 3]]   -> nodes 7; 3, 5; 3 (under 5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .drafter import Drafter
from .errors import BeamShapeError
from .lookup import PAD


@dataclass
class DraftBeams:
    """tokens: (B, W, L) int64, tokens[:, :, 0] = g0.
    logprobs: (B, W, L-1) float32, the drafter's log-probability of each drafted token."""

    tokens: torch.Tensor
    logprobs: torch.Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        B, W, L = self.tokens.shape
        return B, W, L


def check_beam_shape(beam_width: int, beam_length: int, draft_vocab_size: int | None = None,
                     tree_nodes: int = 0) -> None:
    """Raise BeamShapeError for shapes that cannot be drafted."""
    if beam_width < 1:
        raise BeamShapeError(f"--beam-width must be >= 1, got {beam_width}")
    if beam_length < 1:
        raise BeamShapeError(f"--beam-length must be >= 1 (it counts g0), got {beam_length}")
    if beam_width > 256:
        raise BeamShapeError(f"--beam-width {beam_width} is too large (max 256)")
    if beam_length > 64:
        raise BeamShapeError(f"--beam-length {beam_length} is too large (max 64)")
    if draft_vocab_size is not None and beam_width > draft_vocab_size:
        raise BeamShapeError(f"--beam-width {beam_width} exceeds the draft vocabulary ({draft_vocab_size} tokens)")
    drafted = beam_width * (beam_length - 1)  # distinct tokens a W x L search keeps over its L-1 steps
    if tree_nodes and beam_length < 2:
        raise BeamShapeError(f"--nodes {tree_nodes}: a beam length of {beam_length} drafts nothing to keep; "
                             "use a beam length >= 2 or --nodes 0")
    if tree_nodes and not 1 <= tree_nodes <= drafted:
        raise BeamShapeError(f"--nodes {tree_nodes}: a {beam_width}x{beam_length} beam search drafts {drafted} "
                             f"distinct tokens, keep 1..{drafted} of them (or 0: every beam)")


@torch.no_grad()
def draft_beams(drafter: Drafter, h: torch.Tensor, g0: torch.Tensor, beam_width: int, beam_length: int,
                tree_nodes: int = 0) -> DraftBeams:
    """Draft W beams of length L for each row.

    h: (B, H) target hidden state after its final norm at the last accepted token.
    g0: (B,) the token the target produced after h.
    Returns DraftBeams with tokens (B, W, L) and logprobs (B, W, L-1); with
    tree_nodes N > 0, the N most likely nodes of the search instead (module
    docstring): tokens (B, N', D) and logprobs (B, N', D-1), N' = min(N, W*(L-1)),
    D <= L the depth of the deepest kept node, PAD (-1) after each node.
    """
    beams = search_beams(drafter, h, g0, beam_width, beam_length, tree_nodes)
    return trim_to_depth(beams) if tree_nodes else beams


@torch.no_grad()
def search_beams(drafter: Drafter, h: torch.Tensor, g0: torch.Tensor, beam_width: int, beam_length: int,
                 tree_nodes: int = 0) -> DraftBeams:
    """`draft_beams` with shapes set by its arguments alone (no value read on the host, so a CUDA
    graph can record it, cuda_graphs.GraphedDraft): with tree_nodes, tokens (B, N', L) and logprobs
    (B, N', L-1), PAD past each node's depth, not yet cut to the deepest (`trim_to_depth`)."""
    B = g0.shape[0]
    W, L = beam_width, beam_length
    device = g0.device
    tokens = g0.view(B, 1, 1).expand(B, W, 1)  # (B, W, 1)
    logprobs = torch.zeros(B, W, 0, device=device)
    if L == 1:
        return DraftBeams(tokens.contiguous(), logprobs)
    vocab_map = drafter.draft_vocab  # (V_d,) or None
    V = drafter.draft_vocab_size
    h = h.unsqueeze(1)  # (B, 1, H)
    state = torch.zeros(B, W, drafter.config.hidden_size, device=device, dtype=drafter.rnn_w.weight.dtype)
    running = torch.full((B, W), float("-inf"), device=device)
    running[:, 0] = 0.0  # step 1: all beams equal, only beam 0 may expand
    last = tokens[:, :, 0]  # (B, W)
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # every step's beams, for tree_nodes
    for _ in range(L - 1):
        state = drafter.rnn_step(state, drafter.embed(last))  # (B, W, H)
        step_logp = torch.log_softmax(drafter.logits(h, state).float(), dim=-1)  # (B, W, V_d)
        scores = (running.unsqueeze(-1) + step_logp).view(B, W * V)
        running, flat = torch.topk(scores, W, dim=-1)  # (B, W)
        parent = torch.div(flat, V, rounding_mode="floor")  # (B, W)
        local = flat - parent * V  # index in the draft vocabulary
        chosen_logp = step_logp.view(B, W * V).gather(1, flat)  # (B, W)
        last = vocab_map[local] if vocab_map is not None else local
        state = state.gather(1, parent.unsqueeze(-1).expand_as(state))
        tokens = torch.cat([tokens.gather(1, parent.unsqueeze(-1).expand(B, W, tokens.shape[-1])), last.unsqueeze(-1)], -1)
        logprobs = torch.cat(
            [logprobs.gather(1, parent.unsqueeze(-1).expand(B, W, logprobs.shape[-1])), chosen_logp.unsqueeze(-1)], -1
        )
        if tree_nodes:
            kept.append((tokens, logprobs, running))
    if tree_nodes:
        return _best_nodes(kept, tree_nodes)
    return DraftBeams(tokens, logprobs)


def _best_nodes(kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n: int) -> DraftBeams:
    """The n best of the nodes a beam search kept, one beam per node, each PAD after its depth.

    kept: per step k = 1..L-1, (tokens (B, W, k+1), logprobs (B, W, k), running (B, W)).
    Returns tokens (B, n, L), logprobs (B, n, L-1).
    """
    L = len(kept) + 1
    tokens = torch.cat([F.pad(t, (0, L - t.shape[-1]), value=PAD) for t, _, _ in kept], 1)  # (B, W*(L-1), L)
    logprobs = torch.cat([F.pad(lp, (0, L - 1 - lp.shape[-1])) for _, lp, _ in kept], 1)  # (B, W*(L-1), L-1)
    scores = torch.cat([r for _, _, r in kept], 1)  # (B, W*(L-1)), depth-major: parents before children
    B, C = scores.shape
    n = min(n, C)
    # Stable: on a tie (a child with log-probability 0) the parent, listed first, stays ahead of its child.
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :n]  # (B, n)
    tokens = tokens.gather(1, best.unsqueeze(-1).expand(B, n, L))
    logprobs = logprobs.gather(1, best.unsqueeze(-1).expand(B, n, L - 1))
    return DraftBeams(tokens, logprobs)


def trim_to_depth(beams: DraftBeams) -> DraftBeams:
    """Node beams (PAD after each node) cut to the depth D of the deepest: tokens (B, N, D),
    logprobs (B, N, D-1). Reads D on the host."""
    depth = int((beams.tokens != PAD).sum(-1).max())  # deepest kept node, counting g0
    return DraftBeams(beams.tokens[..., :depth].contiguous(), beams.logprobs[..., : depth - 1].contiguous())
