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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .drafter import Drafter
from .errors import BeamShapeError


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


def check_beam_shape(beam_width: int, beam_length: int, draft_vocab_size: int | None = None) -> None:
    """Raise BeamShapeError for shapes that cannot be drafted."""
    if beam_width < 1:
        raise BeamShapeError(f"beam width must be >= 1, got {beam_width}")
    if beam_length < 1:
        raise BeamShapeError(f"beam length must be >= 1 (it counts g0), got {beam_length}")
    if beam_width > 256 or beam_length > 64:
        raise BeamShapeError(f"beam shape {beam_width}x{beam_length} is too large (max 256 x 64)")
    if draft_vocab_size is not None and beam_width > draft_vocab_size:
        raise BeamShapeError(f"beam width {beam_width} exceeds the draft vocabulary ({draft_vocab_size} tokens)")


@torch.no_grad()
def draft_beams(drafter: Drafter, h: torch.Tensor, g0: torch.Tensor, beam_width: int, beam_length: int) -> DraftBeams:
    """Draft W beams of length L for each row.

    h: (B, H) target hidden state after its final norm at the last accepted token.
    g0: (B,) the token the target produced after h.
    Returns DraftBeams with tokens (B, W, L) and logprobs (B, W, L-1).
    """
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
    return DraftBeams(tokens, logprobs)
