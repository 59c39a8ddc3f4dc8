"""The drafter's attention over recent positions (optional: `context_window` > 0 in its config).

ReDrafter's head sees one target hidden state h_t and g0 = x_{t+1}; g0 meets
the earlier context only through h_t. This block lets the drafter look back,
EAGLE-style. Every position j gets a unit u_j from (h_j, x_{j+1}); one causal
attention layer over the last W positions turns it into the context c_t
that replaces h_t as the drafter's input (the recurrent steps and the beam
search are unchanged):

    u_j = inp(cat(norm(h_j), norm(E(x_{j+1}))))                 (..., H)
    a_t = u_t + o(attention(q_t; k_j, v_j for t-W < j <= t))    RoPE on q, k
    m_t = a_t + down(SiLU(up(norm(a_t))))
    c_t = h_t + out(norm(m_t))                                  `out` starts at zero: c = h

Worked example, W = 3, a sequence x_0..x_5 whose drafter position is t = 4
(g0 = x_5): c_4 attends over u_2, u_3, u_4, built from (h_2, x_3), (h_3, x_4),
(h_4, x_5). One layer, so c_t needs the keys and values of earlier positions
only, never their outputs: decoding keeps a ring of the last W keys and
values per row (`ContextCache`) and adds the positions each step accepts.

A drafter with this block is redraft's own extension: the reference
implementation and TensorRT-LLM's converter know only the plain head.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding. x: (B, heads, n, d); positions: (B, n) int64. Returns x rotated, same shape."""
    d = x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # (d/2,)
    ang = positions.to(torch.float32).unsqueeze(-1) * inv  # (B, n, d/2)
    cos = torch.cat([ang.cos(), ang.cos()], -1).unsqueeze(1).to(x.dtype)  # (B, 1, n, d)
    sin = torch.cat([ang.sin(), ang.sin()], -1).unsqueeze(1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class ContextAttention(nn.Module):
    """One pre-norm attention + MLP layer over a window of the last `window` positions."""

    def __init__(self, hidden_size: int, window: int, heads: int) -> None:
        super().__init__()
        H = hidden_size
        if heads <= 0 or H % heads or (H // heads) % 2:
            raise ValueError(f"context_heads {heads} must divide hidden size {H} into an even head size")
        self.window, self.heads, self.head_dim = window, heads, H // heads
        self.norm_h = nn.RMSNorm(H, eps=1e-6)
        self.norm_x = nn.RMSNorm(H, eps=1e-6)
        self.inp = nn.Linear(2 * H, H, bias=False)
        self.norm_a = nn.RMSNorm(H, eps=1e-6)
        self.qkv = nn.Linear(H, 3 * H, bias=False)
        self.o = nn.Linear(H, H, bias=False)
        self.norm_m = nn.RMSNorm(H, eps=1e-6)
        self.up = nn.Linear(H, 2 * H, bias=False)
        self.down = nn.Linear(2 * H, H, bias=False)
        self.norm_c = nn.RMSNorm(H, eps=1e-6)
        self.out = nn.Linear(H, H, bias=False)

    def units(self, h: torch.Tensor, x_emb: torch.Tensor) -> torch.Tensor:
        """h, x_emb: (..., H) the hidden state at j and the embedding of x_{j+1} -> u_j (..., H)."""
        return self.inp(torch.cat([self.norm_h(h.to(x_emb.dtype)), self.norm_x(x_emb)], dim=-1))

    def qkv_heads(self, u: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u: (B, n, H), positions: (B, n) -> q, k, v each (B, heads, n, head_dim), RoPE on q and k."""
        B, n, _ = u.shape
        q, k, v = self.qkv(self.norm_a(u)).view(B, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return _rope(q, positions), _rope(k, positions), v

    def finish(self, u_q: torch.Tensor, h_q: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """The layer after q, k, v: u_q, h_q (B, P, H); q (B, heads, P, d); k, v (B, heads, n, d);
        mask (B, P, n) bool, True where query p may see key j (at least one per row). Returns c (B, P, H)."""
        B, P, H = u_q.shape
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # (B, heads, P, d)
        a = u_q + self.o(att.transpose(1, 2).reshape(B, P, H))
        m = a + self.down(F.silu(self.up(self.norm_m(a))))
        return h_q.to(m.dtype) + self.out(self.norm_c(m))

    def forward(self, hidden: torch.Tensor, x_emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Training: whole sequences at once.

        hidden: (B, T, H) the target's hidden states; x_emb: (B, T, H) embeddings of
        x_{j+1} (the next token) at every j; pos: (B, P) drafter positions t.
        Returns c_t (B, P, H). Padding after a sequence is never attended: keys
        j <= t only, and x_{t+1} exists at every drafter position.
        """
        B, T, H = hidden.shape
        positions = torch.arange(T, device=hidden.device).expand(B, T)
        u = self.units(hidden, x_emb)  # (B, T, H)
        q, k, v = self.qkv_heads(u, positions)
        q = q.gather(2, pos.view(B, 1, -1, 1).expand(-1, self.heads, -1, self.head_dim))  # (B, heads, P, d)
        j = torch.arange(T, device=hidden.device)
        t = pos.unsqueeze(-1)  # (B, P, 1)
        mask = (j <= t) & (j > t - self.window)  # (B, P, T)
        u_q = u.gather(1, pos.unsqueeze(-1).expand(-1, -1, H))
        h_q = hidden.gather(1, pos.unsqueeze(-1).expand(-1, -1, H))
        return self.finish(u_q, h_q, q, k, v, mask)


class ContextCache:
    """Decoding state: per row, the keys and values of its last W positions.

    k, v: (B, heads, W + 1, head_dim), slot = position % W; slot W is a sink for
    the padding of ragged writes and is never attended. pos: (B, W + 1) int64,
    the position each slot holds (-1: empty).
    """

    def __init__(self, block: ContextAttention, batch: int, device: torch.device, dtype: torch.dtype) -> None:
        self.block = block
        W, nh, d = block.window, block.heads, block.head_dim
        self.k = torch.zeros(batch, nh, W + 1, d, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.full((batch, W + 1), -1, dtype=torch.long, device=device)

    def extend(self, h: torch.Tensor, x_emb: torch.Tensor, start: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Add positions start..start+count-1 of each row and return c at its last one.

        h: (R, m, H) hidden states at those positions, left-aligned, ragged rows padded;
        x_emb: (R, m, H) embeddings of the token after each; start: (R,) position of
        entry 0; count: (R,) entries per row, 1..min(m, W). Returns c (R, H).
        """
        b = self.block
        R, m, H = h.shape
        W = b.window
        i = torch.arange(m, device=h.device)
        positions = start.unsqueeze(1) + i  # (R, m)
        u = b.units(h, x_emb)
        q, k, v = b.qkv_heads(u, positions)
        valid = i < count.unsqueeze(1)  # (R, m)
        slot = torch.where(valid, positions % W, torch.full_like(positions, W))
        idx = slot.view(R, 1, m, 1).expand(-1, b.heads, -1, b.head_dim)
        self.k.scatter_(2, idx, k.to(self.k.dtype))
        self.v.scatter_(2, idx, v.to(self.v.dtype))
        self.pos.scatter_(1, slot, torch.where(valid, positions, torch.full_like(positions, -1)))
        self.pos[:, W] = -1
        last = (count - 1).view(R, 1)  # (R, 1)
        qpos = start.view(R, 1) + last  # (R, 1)
        q_last = q.gather(2, last.view(R, 1, 1, 1).expand(-1, b.heads, 1, b.head_dim))  # (R, heads, 1, d)
        mask = ((self.pos >= 0) & (self.pos <= qpos) & (self.pos > qpos - W)).unsqueeze(1)  # (R, 1, W+1)
        u_q = u.gather(1, last.unsqueeze(-1).expand(-1, -1, H))
        h_q = h.gather(1, last.unsqueeze(-1).expand(-1, -1, H))
        return b.finish(u_q, h_q, q_last, self.k.to(q.dtype), self.v.to(q.dtype), mask)[:, 0]

    def select(self, rows: torch.Tensor | list[int]) -> "ContextCache":
        """Keep only `rows` (finished rows leave the batch)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.k.device)
        self.k, self.v, self.pos = self.k[idx], self.v[idx], self.pos[idx]
        return self

    def append(self, other: "ContextCache") -> "ContextCache":
        """Add the rows of `other` (the same block's cache) after this cache's rows."""
        self.k, self.v = torch.cat([self.k, other.k]), torch.cat([self.v, other.v])
        self.pos = torch.cat([self.pos, other.pos])
        return self
