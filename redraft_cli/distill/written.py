"""Prompts written by the target itself: more varied training conversations for free.

An instruction-tuned model has learnt what users ask. Given its chat template
cut right where a user's message begins, and sampling, it writes one
(the "Magpie" method). For SmolLM2 the prefix is

    <|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...<|im_end|>\\n<|im_start|>user\\n

and the target continues it up to its end-of-turn token. Complete messages of
at least `min_words` words, not seen before (case and spacing ignored), are
kept. The target then answers them like any other prompt (pipeline.py).

On disk (`out_dir`): `prompts.jsonl` (one `{"turns": [text]}` per prompt,
the format bench and distill read) and `state.json` (batches done, settings),
both rewritten atomically after every batch: an interrupted run resumes at
the next batch, and batch b is always sampled with the same seed, so the
file is the same however often it was interrupted.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import BadInputError, ChatTemplateError
from .data import GenerationConfig, generate_batch

SENTINEL = "\x00redraft-user-message\x00"
PROMPTS = "prompts.jsonl"
STATE = "state.json"


@dataclass
class WritingConfig:
    """How the target writes prompts."""

    count: int  # prompts wanted
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 96  # longest message; longer ones are cut, so dropped
    batch_size: int = 32
    seed: int = 0
    min_words: int = 4
    system: str | None = None

    def __post_init__(self) -> None:
        if self.count < 1 or self.max_tokens < 1 or self.batch_size < 1:
            raise BadInputError("written prompts: count, max_tokens and batch_size must be >= 1")
        if not self.temperature > 0:
            raise BadInputError(f"written prompts need sampling: temperature must be > 0, got {self.temperature}")

    def fingerprint(self) -> dict[str, Any]:
        """Settings that must match to resume (count may grow: batch b's prompts never change)."""
        return {k: v for k, v in asdict(self).items() if k != "count"}


def user_turn_prefix(target: Any, system: str | None = None) -> list[int]:
    """Token ids of the chat template up to where a user's message text begins."""
    tok = target.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ChatTemplateError(f"{target.name} has no chat template; it cannot write user prompts")
    messages = [{"role": "user", "content": SENTINEL}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if SENTINEL not in text:
        raise ChatTemplateError(f"{target.name}'s chat template does not show the user's message verbatim")
    return list(tok(text.split(SENTINEL)[0], add_special_tokens=False)["input_ids"])


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def write_prompts(target: Any, out_dir: str | Path, cfg: WritingConfig,
                  progress: Callable[[int, int], None] | None = None) -> list[str]:
    """Have the target write cfg.count user prompts (or resume doing so); returns the first count.

    Batch b is sampled with seed (seed, b) and all its usable messages are kept, so the list
    depends only on the settings: an interrupted run, or one asked later for a larger count,
    continues the same list.
    progress(kept, wanted) is called after every batch.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path, prompts_path = out / STATE, out / PROMPTS
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {"batches": 0, "config": cfg.fingerprint()}
        prompts = [json.loads(line)["turns"][0] for line in prompts_path.read_text().splitlines()] if prompts_path.is_file() else []
        if (not isinstance(state, dict) or not isinstance(state.get("batches"), int) or state["batches"] < 0
                or not all(isinstance(p, str) for p in prompts)):
            raise ValueError("unexpected contents")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise BadInputError(f"the written prompts in {out} are damaged ({exc}); delete that folder to write them again")
    if state.get("config") != cfg.fingerprint():
        raise BadInputError(f"{out} holds prompts written with other settings; use another data directory")
    prompts = prompts[: state.get("kept", len(prompts))]
    seen = {_key(p) for p in prompts}
    prefix = user_turn_prefix(target, cfg.system)
    eos = {int(e) for e in target.eos_ids}
    gen = GenerationConfig(max_new_tokens=cfg.max_tokens, batch_size=cfg.batch_size, temperature=cfg.temperature,
                           top_p=cfg.top_p, seed=cfg.seed)
    # A model that rarely finishes a usable message must not loop for ever.
    max_batches = state["batches"] + 20 * (-(-(cfg.count - len(prompts)) // cfg.batch_size)) + 5
    while len(prompts) < cfg.count:
        if state["batches"] >= max_batches:
            raise BadInputError(f"{target.name} wrote only {len(prompts)} usable prompts of {cfg.count} in "
                                f"{state['batches']} batches; lower the count or raise the temperature")
        b = state["batches"]
        responses = generate_batch(target, [prefix] * cfg.batch_size, gen, seed=cfg.seed * 1_000_003 + b)
        for r in responses:
            if not r or r[-1] not in eos:
                continue  # cut at max_tokens: not a whole message
            text = target.tokenizer.decode(r[:-1], skip_special_tokens=True).strip()
            if len(text.split()) < cfg.min_words or _key(text) in seen:
                continue  # (a whole batch is kept, even past count: a later, larger count extends the same list)
            seen.add(_key(text))
            prompts.append(text)
        state["batches"], state["kept"] = b + 1, len(prompts)
        _atomic_write(prompts_path, "".join(json.dumps({"turns": [p]}) + "\n" for p in prompts))
        _atomic_write(state_path, json.dumps(state))
        if progress is not None:
            progress(len(prompts), cfg.count)
    return prompts[: cfg.count]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
