"""Benchmark: ReDrafter against plain decoding, same target, same prompts, same process.

Metrics (DESIGN section 7), defined once here and printed everywhere:
- tokens per step   = tokens emitted by decode steps / target verify passes
                      (the prefill pass and its one token are left out of both);
- acceptance rate   = accepted draft tokens / (steps * (beam_length - 1));
- speedup           = tokens/s of ReDrafter / tokens/s of plain decoding,
                      prefill included in both, paths alternated per prompt
                      after a warm-up;
- time split        = seconds drafting, in the verify pass, and accepting.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .decode import DecodeConfig, Generation, Generator

ProgressFn = Callable[[int, int, str], None]


@dataclass
class Ticker:
    """Counts finished units of work and reports (done, total, label) to an optional callback."""

    total: int
    progress: ProgressFn | None = None
    done: int = 0

    def __call__(self, label: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, label)


@dataclass
class BenchConfig:
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    warmup: bool = True
    hf_baseline: bool = True
    chat_template: bool = True


@dataclass
class PathTotals:
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "seconds": round(self.seconds, 4), "tokens_per_s": round(self.tokens_per_s, 3)}


@dataclass
class RedraftTotals(PathTotals):
    steps: int = 0
    step_tokens: int = 0
    accepted: int = 0
    tree_nodes: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    prefill_s: float = 0.0

    def add(self, gen: Generation) -> None:
        self.tokens += len(gen.tokens)
        self.seconds += gen.seconds
        for s in gen.steps:
            if s.prefill:
                self.prefill_s += s.verify_s
                continue
            self.steps += 1
            self.step_tokens += len(s.tokens)
            self.accepted += s.accepted
            self.tree_nodes += s.tree_nodes
            self.draft_s += s.draft_s
            self.verify_s += s.verify_s
            self.accept_s += s.accept_s

    def to_dict(self, beam_length: int = 1) -> dict[str, Any]:
        steps = max(self.steps, 1)
        split = self.draft_s + self.verify_s + self.accept_s
        return {
            **super().to_dict(),
            "steps": self.steps,
            "tokens_per_step": round(self.step_tokens / steps, 4),
            "acceptance_rate": round(self.accepted / (steps * max(beam_length - 1, 1)), 4),
            "mean_tree_nodes": round(self.tree_nodes / steps, 3),
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "accept_s": round(self.accept_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "draft_share": round(self.draft_s / split, 4) if split else 0.0,
            "verify_share": round(self.verify_s / split, 4) if split else 0.0,
            "accept_share": round(self.accept_s / split, 4) if split else 0.0,
        }


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def hf_generate(gen: Generator, prompt_ids: list[int], cfg: DecodeConfig) -> tuple[list[int], float]:
    """Plain decoding through Hugging Face `model.generate()` with the same settings."""
    t = gen.target
    s = cfg.sampling
    kwargs: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "do_sample": not s.greedy}
    if not s.greedy:
        kwargs.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
        torch.manual_seed(s.seed)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    eos = sorted(t.eos_ids) if cfg.stop_on_eos and t.eos_ids else None
    ids = torch.tensor([prompt_ids], device=t.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = t.model.generate(
            ids, attention_mask=torch.ones_like(ids), eos_token_id=eos, pad_token_id=eos[0] if eos else 0, **kwargs
        )
    seconds = time.perf_counter() - start
    return out[0, len(prompt_ids):].tolist(), seconds


def run_bench(gen: Generator, prompts: list[list[int]], cfg: BenchConfig, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Alternate plain, ReDrafter (and HF generate) on each tokenised prompt.

    Returns the JSON-ready result (see the CLI's --json); per-prompt rows under `per_prompt`.
    """
    d = cfg.decode
    paths = ["plain", "redraft"] + (["hf"] if cfg.hf_baseline else [])
    tick = Ticker(len(prompts) * len(paths) + (len(paths) if cfg.warmup else 0), progress)
    if cfg.warmup:
        warm_up(gen, prompts[0], d, paths, tick)

    base, hf, red = PathTotals(), PathTotals(), RedraftTotals()
    identical = 0
    rows = []
    for i, ids in enumerate(prompts):
        order = paths if i % 2 == 0 else list(reversed(paths))
        outputs: dict[str, list[int]] = {}
        for path in order:
            tokens, seconds, generation = _run_path(gen, path, ids, d)
            outputs[path] = tokens
            if path == "plain":
                base.tokens += len(tokens)
                base.seconds += seconds
            elif path == "hf":
                hf.tokens += len(tokens)
                hf.seconds += seconds
            else:
                red.add(generation)
            tick(f"prompt {i + 1}/{len(prompts)} {path}")
        same = outputs["plain"] == outputs["redraft"]
        identical += same
        rows.append({"prompt_tokens": len(ids), "plain_tokens": len(outputs["plain"]),
                     "redraft_tokens": len(outputs["redraft"]), "identical": same})

    greedy = d.sampling.greedy or d.accept == "greedy"
    result: dict[str, Any] = {
        "accept": d.accept,
        "temperature": d.sampling.temperature,
        "top_k": d.sampling.top_k,
        "top_p": d.sampling.top_p,
        "seed": d.sampling.seed,
        "beam_width": d.beam_width,
        "beam_length": d.beam_length,
        "num_prompts": len(prompts),
        "max_new_tokens": d.max_new_tokens,
        "baseline": base.to_dict(),
        "redraft": red.to_dict(d.beam_length),
        "speedup": round(red.tokens_per_s / base.tokens_per_s, 4) if base.tokens_per_s else None,
        "identical_outputs": identical if greedy else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "per_prompt": rows,
    }
    if cfg.hf_baseline:
        result["baseline_hf"] = hf.to_dict()
        result["speedup_vs_hf"] = round(red.tokens_per_s / hf.tokens_per_s, 4) if hf.tokens_per_s else None
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def warm_up(gen: Generator, ids: list[int], d: DecodeConfig, paths: list[str],
            tick: Callable[[str], None] | None = None) -> None:
    """One short untimed run of each path (at most 16 tokens), so timings skip first-call costs."""
    warm = replace(d, max_new_tokens=min(16, d.max_new_tokens))
    for path in paths:
        _run_path(gen, path, ids, warm)
        if tick is not None:
            tick(f"warm-up {path}")


def _run_path(gen: Generator, path: str, ids: list[int], d: DecodeConfig) -> tuple[list[int], float, Generation | None]:
    if path == "hf":
        tokens, seconds = hf_generate(gen, ids, d)
        return tokens, seconds, None
    g = gen.generate(ids, d, mode=path)
    return g.tokens, g.seconds, g
