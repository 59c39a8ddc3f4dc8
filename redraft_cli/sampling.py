"""One sampling configuration shared by plain decoding and ReDrafter.

`logits_to_probs` is the single place where temperature, top-k and top-p are
applied, so the plain sampler and the lossless rejection rule see exactly the
same target distribution p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BadInputError, check_field_types


MIN_TEMPERATURE = 1e-4  # the smallest non-zero temperature: below it, sampling is greedy in all but name


@dataclass
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise BadInputError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / T would overflow float32 long before T reaches 0
            raise BadInputError(f"--temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got "
                                f"{self.temperature:g}; use 0 (--accept greedy) for the target's argmax")
        if self.top_k < 0:
            raise BadInputError(f"--top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also rejects NaN
            raise BadInputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise BadInputError(f"--seed must be between 0 and 2^63 - 1, got {self.seed}")
        # Python numbers from here on: a NumPy seed fails torch's manual_seed, NumPy values fail json.dumps.
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.top_k, self.seed = int(self.top_k), int(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logits_to_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Target distribution after temperature, top-k and top-p.

    logits: (..., V), any float dtype. Returns float32 probabilities (..., V)
    that sum to 1 over the last dimension. Must not be called when cfg.greedy.
    """
    logits = logits.float() / cfg.temperature
    vocab = logits.shape[-1]
    if 0 < cfg.top_k < vocab:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p
        # (the first token is always kept).
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= cfg.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row by inverse-CDF sampling. probs: (..., V) -> (...,) int64.

    Exactly the law of torch.multinomial, several times faster on CPU for large
    vocabularies: token i is chosen when cdf[i-1] <= u < cdf[i], u ~ U(0, total).
    Zero-probability tokens have cdf[i] == cdf[i-1] and are never chosen, nor is the zero-probability
    tail past the last possible token when u, a float32 product, rounds up to the total.
    """
    flat = probs.reshape(-1, probs.shape[-1]).float()
    cdf = torch.cumsum(flat, dim=-1)  # (N, V)
    total = cdf[:, -1:].contiguous()  # (N, 1) (searchsorted warns on a strided view)
    u = torch.rand(flat.shape[0], 1, generator=generator, device=flat.device) * total
    idx = torch.searchsorted(cdf, u, right=True)  # (N, 1); V when u rounded up to the total
    last = torch.searchsorted(cdf, total)  # (N, 1): where the cdf reaches the total, the last token with p > 0
    return torch.minimum(idx, last).view(probs.shape[:-1])


def choose_tokens(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Argmax when greedy, else one sample from `logits_to_probs`. (..., V) -> (...,)."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return sample(logits_to_probs(logits, cfg), generator)
