"""Benchmark: ReDrafter against plain decoding, same target, same prompts, same process.

Metrics (DESIGN section 7), defined once here and printed everywhere:
- tokens per step   = tokens emitted by decode steps / target verify passes
                      (the prefill pass and its one token are left out of both);
- acceptance rate   = accepted draft tokens / (steps * (beam_length - 1)), the
                      share of the drafted beam accepted; copied beams may be
                      longer than L, so it can pass 100% on repetitive text;
- speedup           = tokens/s of ReDrafter / tokens/s of plain decoding,
                      prefill included in both, paths alternated per prompt
                      (per target pass at batch size > 1) after a warm-up;
- time split        = seconds drafting, in the verify pass, and accepting.

With batch_size B > 1 each path decodes all the prompts, B at a time: plain
and ReDrafter with continuous batching (a finished row's slot goes to the next
prompt at once), their passes interleaved one for one (`BatchRun`: each counts
only its own passes), then HF generate in left-padded groups of B (it cannot
refill a row). tokens/s counts all rows, and tokens per step stays per row.

Multi-turn prompts (`Dialogue`, MT-Bench's protocol): turn k is asked after the path's own answer to
turn k - 1, so every path decodes the conversation it made; at batch size 1 a dialogue's turns run one
after another, at B > 1 every prompt's turn k runs before any turn k + 1. The totals cover every
answer, and `by_turn` splits them by turn.
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .decode import BatchGeneration, BatchRun, DecodeConfig, Generator, check_datastore
from .dialogue import Dialogue, first_turn, turn_counts
from .errors import BadInputError, ContextOverflowError, check_field_types

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
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.decode, DecodeConfig):
            raise BadInputError(f"BenchConfig.decode must be a DecodeConfig, got {type(self.decode).__name__}")
        check_field_types(self)
        if self.batch_size < 1:
            raise BadInputError(f"BenchConfig.batch_size must be a whole number >= 1, got {self.batch_size!r}")


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
    """ReDrafter totals. steps count row-steps (one row in one target pass), so
    tokens_per_step keeps its per-sequence meaning at any batch size; the time
    split sums each batched pass once."""

    steps: int = 0
    passes: int = 0
    step_tokens: int = 0
    accepted: int = 0
    tree_nodes: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    accept_s: float = 0.0
    prefill_s: float = 0.0

    def add(self, gen: BatchGeneration) -> None:
        self.tokens += sum(len(t) for t in gen.tokens)
        self.seconds += gen.seconds
        for row in gen.rows:
            for s in row.decode_steps:
                self.steps += 1
                self.step_tokens += len(s.tokens)
                self.accepted += s.accepted
                self.tree_nodes += s.tree_nodes
        for p in gen.pass_stats:
            if p.prefill:
                self.prefill_s += p.verify_s
            else:
                self.passes += 1
                self.draft_s += p.draft_s
                self.verify_s += p.verify_s
                self.accept_s += p.accept_s

    def to_dict(self, beam_length: int = 2) -> dict[str, Any]:
        """The totals as numbers; a ratio with nothing to divide (no draft step: every answer ended at its
        first token) is None, not 0, so a report never shows 0 tokens per step for a step never taken."""
        steps = self.steps
        split = self.draft_s + self.verify_s + self.accept_s
        return {
            **super().to_dict(),
            "steps": self.steps,
            "passes": self.passes,
            "tokens_per_step": round(self.step_tokens / steps, 4) if steps else None,
            "acceptance_rate": round(self.accepted / (steps * max(beam_length - 1, 1)), 4) if steps else None,
            "mean_tree_nodes": round(self.tree_nodes / steps, 3) if steps else None,
            "draft_s": round(self.draft_s, 4),
            "verify_s": round(self.verify_s, 4),
            "accept_s": round(self.accept_s, 4),
            "prefill_s": round(self.prefill_s, 4),
            "draft_share": round(self.draft_s / split, 4) if split else None,
            "verify_share": round(self.verify_s / split, 4) if split else None,
            "accept_share": round(self.accept_s / split, 4) if split else None,
        }


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def hf_generate(gen: Generator, prompts: list[list[int]], cfg: DecodeConfig) -> tuple[list[list[int]], float]:
    """Plain decoding through Hugging Face `model.generate()` with the same settings, all
    prompts in one left-padded batch. Returns each row's new tokens (cut after EOS) and seconds."""
    t = gen.target
    s = cfg.sampling
    P = max(len(p) for p in prompts)
    # Like redraft's own paths, stop at the context window (generate() would run past it).
    kwargs: dict[str, Any] = {"max_new_tokens": max(1, min(cfg.max_new_tokens, t.max_context - P)), "do_sample": not s.greedy}
    if not s.greedy:
        kwargs.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
        torch.manual_seed(s.seed)
    else:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    eos = sorted(t.eos_ids) if cfg.stop_on_eos and t.eos_ids else None
    pad = eos[0] if eos else 0
    ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = torch.tensor(p)
        attn[b, P - len(p):] = 1
    ids, attn = ids.to(t.device), attn.to(t.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = t.model.generate(ids, attention_mask=attn, eos_token_id=eos, pad_token_id=pad, **kwargs)
    seconds = time.perf_counter() - start
    rows = []
    for row in out[:, P:].tolist():
        for i, tok in enumerate(row):
            if eos and tok in eos:
                row = row[: i + 1]
                break
        rows.append(row)
    return rows, seconds


def output_digest(tokens: list[int]) -> str:
    """A short hash of a token sequence, to compare outputs across runs (e.g. batch sizes) via --json."""
    return hashlib.sha1(",".join(map(str, tokens)).encode()).hexdigest()[:12]


def check_run(what: str, gen: Any, prompts: Any, cfg: Any, kind: type, **callbacks: Any) -> None:
    """BadInputError before any work when `what` (run_bench, run_sweep) is called with other than a
    Generator, a list of prompts, a `kind` config and callables (or None); or asks ReDrafter of a
    Generator that cannot run it (no drafter, datastore beams without a datastore)."""
    if not isinstance(gen, Generator):
        raise BadInputError(f"{what} needs a Generator (Generator(target, drafter)), got {type(gen).__name__}")
    if not isinstance(cfg, kind):
        raise BadInputError(f"{what} needs a {kind.__name__}, got {type(cfg).__name__}")
    if not isinstance(prompts, (list, tuple)):
        raise BadInputError(f"{what}'s prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if not prompts:
        raise BadInputError(f"{what} needs at least one prompt")
    for name, fn in callbacks.items():
        if fn is not None and not callable(fn):
            raise BadInputError(f"{what}'s {name} must be callable or None, got {type(fn).__name__}")
    if gen.proposer is None:
        raise BadInputError(f"{what} times ReDrafter decoding, which needs a drafter: Generator(target, drafter)")
    check_datastore(gen.drafter, cfg.decode.datastore_beams)


def run_bench(gen: Generator, prompts: list[list[int] | Dialogue], cfg: BenchConfig,
              progress: ProgressFn | None = None) -> dict[str, Any]:
    """Time plain, ReDrafter (and HF generate) on the prompts.

    A prompt is token ids (one turn) or a `Dialogue` (dialogue.py), whose user turns are answered in
    order, each path from its own earlier answers (MT-Bench's protocol). At batch size 1 the paths
    alternate answer by answer; at B > 1 each path decodes every prompt's turn k through B slots, turn
    by turn (see the module docstring). A later turn whose prompt does not fit the context, or that
    the chat template cannot render, is left out with the rest of its dialogue (`turns_dropped`); when
    sampling, turn k draws from seed + k - 1.
    Returns the JSON-ready result (see the CLI's --json); one row per answer under `per_prompt`.
    """
    check_run("run_bench", gen, prompts, cfg, BenchConfig, progress=progress)
    d = cfg.decode
    n = len(prompts)
    B = min(cfg.batch_size, n)  # (a batch larger than the prompts runs as many rows as prompts)
    paths = ["plain", "redraft"] + (["hf"] if cfg.hf_baseline else [])
    sizes = turn_counts(prompts)
    tick = Ticker(sum(sizes) * len(paths) + (len(paths) if cfg.warmup else 0), progress)
    answers: list[dict[str, list[list[int]]]] = [{path: [] for path in paths} for _ in prompts]
    stopped: set[int] = set()  # prompts whose later turns were left out
    dropped: list[dict[str, Any]] = []
    short = [0]  # later turns whose answer the context cuts below max_new_tokens
    target = gen.target

    def prompt_for(i: int, path: str) -> list[int]:
        p = prompts[i]
        return p.prompt(target, answers[i][path]) if isinstance(p, Dialogue) else p

    def groups_for(k: int, members: list[int]) -> tuple[dict[str, list[list[int]]], list[int]]:
        """Each path's prompts of turn k for `members`, and the members kept: a later turn that cannot be
        encoded or does not fit the context is left out (turn 1's errors are the caller's)."""
        groups: dict[str, list[list[int]]] = {path: [] for path in paths}
        kept = []
        for i in members:
            try:
                ids = {path: prompt_for(i, path) for path in paths}
                if k > 0:
                    longest = max(map(len, ids.values()))
                    if longest >= target.max_context:  # (the model's own answers made it so: no prompt to shorten)
                        raise ContextOverflowError(
                            f"the conversation up to turn {k + 1} is {longest} tokens, and {target.name}'s context is "
                            f"{target.max_context}{getattr(target, 'context_cap', '')}: lower --max-new-tokens or "
                            f"shorten the turns before it")
                    for p in ids.values():
                        target.check_prompt(p)
                    short[0] += longest + d.max_new_tokens > target.max_context
            except BadInputError as exc:
                if k == 0:
                    raise
                stopped.add(i)
                dropped.append({"prompt": i + 1, "turn": k + 1, "why": str(exc)})
                for _ in range((sizes[i] - k) * len(paths)):
                    tick(f"prompt {i + 1}/{n}: turn {k + 1} left out")
                continue
            kept.append(i)
            for path in paths:
                groups[path].append(ids[path])
        return groups, kept

    def units():  # (turn, prompts) in the order they run: a dialogue's turns one after another
        if B == 1:
            for i in range(n):
                for k in range(sizes[i]):
                    if i not in stopped:
                        yield k, [i]
        else:
            for k in range(max(sizes)):
                yield k, [i for i in range(n) if k < sizes[i] and i not in stopped]

    if cfg.warmup:
        warm_up(gen, [first_turn(target, p) for p in prompts[:B]], d, paths, tick)

    base, hf, red = PathTotals(), PathTotals(), RedraftTotals()
    by_turn: dict[int, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    interrupted = False
    for u, (k, members) in enumerate(units()):
        groups, members = groups_for(k, members)
        if not members:
            continue
        order = paths if u % 2 == 0 else list(reversed(paths))
        finished = range(len(members))  # the rows of the group every path finished
        # Turn k samples from seed + k - 1: with one seed for every turn, a sampled turn drew the same numbers as
        # the one before and could repeat its answer word for word.
        dk = d if k == 0 else replace(d, sampling=replace(d.sampling, seed=d.sampling.seed + k))
        try:
            if B == 1:
                label = f"prompt {members[0] + 1}/{n}" + (f" turn {k + 1}" if sizes[members[0]] > 1 else "")
                runs = _run_paths(gen, order, groups, dk, B, tick, label)
            else:
                runs, finished = _run_interleaved(gen, groups, dk, B, tick)
                if len(finished) < len(members):  # Ctrl-C: the rows both paths finished, at the throughput so far
                    if not finished:  # (nothing of this group counts: HF's totals still match the others')
                        raise KeyboardInterrupt
                    interrupted, paths = True, [p for p in paths if p != "hf"]  # (HF never ran this group)
                elif "hf" in order:
                    try:
                        runs += _run_paths(gen, ["hf"], groups, dk, B, tick, f"{B} slots")
                    except KeyboardInterrupt:  # the two paths' result stands, without the HF baseline
                        interrupted, paths = True, [p for p in paths if p != "hf"]
        except KeyboardInterrupt:  # Ctrl-C: the answers every path finished are the result
            if not rows:
                raise
            interrupted = True
            break
        turn = by_turn.setdefault(k, {"baseline": PathTotals(), "hf": PathTotals(), "redraft": RedraftTotals(),
                                      "identical": 0, "answers": 0})
        outputs: dict[str, list[list[int]]] = {}
        for path, tokens, seconds, generation in runs:
            outputs[path] = tokens
            if path == "redraft":
                red.add(generation)
                turn["redraft"].add(generation)
                red_rows = generation.rows
            else:
                for totals in ((base, turn["baseline"]) if path == "plain" else (hf, turn["hf"])):
                    totals.tokens += sum(map(len, tokens))
                    totals.seconds += seconds
        for r in finished:
            i, plain, fast, row = members[r], outputs["plain"][r], outputs["redraft"][r], red_rows[r]
            steps = row.decode_steps
            turn["answers"] += 1
            turn["identical"] += plain == fast
            rows.append({"prompt": i + 1, "turn": k + 1, "prompt_tokens": len(groups["redraft"][r]),
                         "plain_tokens": len(plain), "redraft_tokens": len(fast),
                         "tokens_per_step": round(sum(len(s.tokens) for s in steps) / len(steps), 4) if steps else None,
                         "identical": plain == fast if d.rule == "greedy" else None,  # (sampling: not compared)
                         "plain_digest": output_digest(plain),
                         "redraft_digest": output_digest(fast)})
            for path, tokens in outputs.items():
                answers[i][path].append(tokens[r])
        if interrupted:
            break

    greedy = d.rule == "greedy"
    result: dict[str, Any] = {
        "accept": d.rule,
        "temperature": d.sampling.temperature,
        "top_k": d.sampling.top_k,
        "top_p": d.sampling.top_p,
        "seed": d.sampling.seed,
        "beam_width": d.beam_width,
        "beam_length": d.beam_length,
        "lookup_beams": d.lookup_beams,
        "lookup_length": d.lookup_length or d.beam_length,
        "datastore_beams": d.datastore_beams,
        "tree_nodes": d.tree_nodes,
        "batch_size": B,
        "num_prompts": len({r["prompt"] for r in rows}),
        "num_answers": len(rows),
        "max_new_tokens": d.max_new_tokens,
        "baseline": base.to_dict(),
        "redraft": red.to_dict(d.beam_length),
        "speedup": _ratio(red, base),
        "identical_outputs": sum(t["identical"] for t in by_turn.values()) if greedy else None,
        "batch_invariant": gen.target.batch_invariant,  # exact greedy identity by construction (lean_llama.py)
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "per_prompt": rows,
    }
    if max(sizes) > 1:  # multi-turn: each turn's own figures (turn 2 on answers the model wrote)
        result["turns"] = max(sizes)
        result["by_turn"] = [{"turn": k + 1, "answers": t["answers"],
                              "tokens_per_step": t["redraft"].to_dict(d.beam_length)["tokens_per_step"],
                              "speedup": _ratio(t["redraft"], t["baseline"]),
                              "identical_outputs": t["identical"] if greedy else None}
                             for k, t in sorted(by_turn.items())]
        result["turns_dropped"] = dropped
        result["turns_cut_short"] = short[0]  # later turns left fewer than max_new_tokens tokens of the context
    if d.rule == "typical":
        result.update(typical_epsilon=d.typical_epsilon, typical_delta=d.typical_delta)
    if interrupted:
        result.update(interrupted=True, prompts_asked=n, answers_asked=sum(sizes))
    if "hf" in paths:
        result["baseline_hf"] = hf.to_dict()
        result["speedup_vs_hf"] = _ratio(red, hf)
    graphs, drafts = gen.target.graphs, getattr(gen.proposer, "graphs", None)
    if graphs is not None or drafts is not None:  # CUDA graphs of the lean pass and the beam search (cuda_graphs.py)
        result["cuda_graphs"] = {
            "target": graphs is not None,  # False: a quantized or generic-path target runs eagerly
            "captured": graphs.captures if graphs else 0, "passes": graphs.passes if graphs else 0,
            "failed": graphs.failed if graphs else None,
            "draft_captured": drafts.captures if drafts else 0, "draft_failed": drafts.failed if drafts else None}
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def _ratio(fast: PathTotals, slow: PathTotals) -> float | None:
    """tokens/s of `fast` over `slow` (None when `slow` has none)."""
    return round(fast.tokens_per_s / slow.tokens_per_s, 4) if slow.tokens_per_s else None


def warm_up(gen: Generator, group: list[list[int]], d: DecodeConfig, paths: list[str],
            tick: Callable[[str], None] | None = None) -> None:
    """One short untimed run of each path on `group` together (at most 16 tokens), so timings
    skip first-call costs. With CUDA graphs the run is as long as the timed ones: its caches then
    have their shapes, and the graphs captured on them are the ones the timed runs replay."""
    warm = d if gen.target.graphs is not None else replace(d, max_new_tokens=min(16, d.max_new_tokens))
    for path in paths:
        _run_path(gen, path, group, warm, len(group))
        if tick is not None:
            tick(f"warm-up {path}")


def _run_paths(gen: Generator, paths: list[str], groups: dict[str, list[list[int]]], d: DecodeConfig, slots: int,
               tick: Callable[[str], None], label: str) -> list[tuple[str, list[list[int]], float, BatchGeneration | None]]:
    """Each path in turn on its group (`groups[path]`); (path, tokens, seconds, generation) per path."""
    return [(path, *_run_path(gen, path, groups[path], d, slots, lambda *_, text=f"{label} {path}": tick(text)))
            for path in paths]


def _run_interleaved(gen: Generator, groups: dict[str, list[list[int]]], d: DecodeConfig, slots: int,
                     tick: Callable[[str], None]
                     ) -> tuple[list[tuple[str, list[list[int]], float, BatchGeneration]], list[int]]:
    """Plain and ReDrafter, each on its group (`groups[path]`, as many rows each) through `slots` rows, one
    pass of one, then one of the other (the one left runs alone at the end); each counts only its own
    passes' seconds. Returns the runs and the rows both finished: all of them, or after a Ctrl-C those
    that had (the runs then hold every token decoded so far, and the seconds of the passes so far)."""
    runs = {path: BatchRun(Generator(gen.target) if path == "plain" else gen, groups[path], d, path, slots,
                           lambda *_, path=path: tick(f"{path}, {slots} slots, passes interleaved"))
            for path in ("plain", "redraft")}
    try:
        while any([run.step() for run in runs.values()]):  # a list: every run steps each round
            pass
    except KeyboardInterrupt:
        pass
    results = {path: run.result() for path, run in runs.items()}
    finished = [r for r in range(len(groups["plain"]))
                if all(g.rows[r].steps and g.rows[r].steps[-1].finished for g in results.values())]
    return [(path, g.tokens, g.seconds, g) for path, g in results.items()], finished


def _run_path(gen: Generator, path: str, group: list[list[int]], d: DecodeConfig, slots: int,
              done: Callable[[int], Any] | None = None) -> tuple[list[list[int]], float, BatchGeneration | None]:
    """Decode `group` on one path, `slots` rows at a time; `done(row)` as each prompt finishes."""
    if path == "hf":
        tokens, seconds = [], 0.0
        for i in range(0, len(group), slots):
            rows, sec = hf_generate(gen, group[i : i + slots], d)
            tokens += rows
            seconds += sec
            for row in range(i, i + len(rows)):
                if done is not None:
                    done(row)
        return tokens, seconds, None
    g = gen.generate_batch(group, d, mode=path, slots=slots, on_row_done=done)
    return g.tokens, g.seconds, g
