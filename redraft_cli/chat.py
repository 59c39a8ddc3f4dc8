"""A multi-turn chat session over the generation loop, streaming text as steps are accepted.

The session keeps the conversation, trims the oldest turns when the prompt
would not leave room for an answer inside the context window, and keeps
per-answer and session statistics. Each turn goes on from the KV cache the
last answer left (`Generator`'s reuse_cache): only the tokens after the part
of the conversation the target has already read are run again. It knows
nothing about terminals: the CLI prints the `Chunk`s it yields.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Iterator

from .chat_templates import SYSTEM_REFUSED, refuses_system
from .decode import DecodeConfig, Generator, StepStats
from .errors import BadInputError, ContextOverflowError


@dataclass
class Chunk:
    """Text produced by one target pass: `drafted` came from accepted drafts, `text` from the target itself."""

    drafted: str
    text: str
    step: StepStats


@dataclass
class Totals:
    answers: int = 0
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    step_tokens: int = 0
    accepted: int = 0
    draftable: int = 0  # steps x (tree depth - 1)
    prompt_tokens: int = 0  # the conversation as the target read it, template included
    reused_tokens: int = 0  # of those, tokens whose KV the previous answer left (not run again)
    prompt_s: float = 0.0  # the prompt pass (part of `seconds`)

    def add(self, other: "Totals", sign: int = 1) -> None:
        for f in ("answers", "tokens", "seconds", "steps", "step_tokens", "accepted", "draftable", "prompt_tokens",
                  "reused_tokens", "prompt_s"):
            setattr(self, f, getattr(self, f) + sign * getattr(other, f))

    def summary(self) -> dict[str, float | None]:
        return {
            "answers": self.answers,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else 0.0,
            "steps": self.steps,
            "tokens_per_step": round(self.step_tokens / self.steps, 3) if self.steps else None,
            "acceptance_rate": round(self.accepted / self.draftable, 4) if self.draftable else None,
            "prompt_tokens": self.prompt_tokens,
            "reused_tokens": self.reused_tokens,
            "prompt_s": round(self.prompt_s, 3),
        }


SYSTEM_ROOM = 16  # tokens a system prompt must leave in the context for a message and its turn markers
SETTABLE = {
    "beam-width": ("beam_width", int),
    "beam-length": ("beam_length", int),
    "nodes": ("tree_nodes", int),
    "lookup": ("lookup_beams", int),
    "lookup-length": ("lookup_length", int),
    "datastore": ("datastore_beams", int),
    "max-new-tokens": ("max_new_tokens", int),
    "accept": ("accept", str),
    "temperature": ("temperature", float),
    "top-p": ("top_p", float),
    "top-k": ("top_k", int),
    "seed": ("seed", int),
    "epsilon": ("typical_epsilon", float),
    "delta": ("typical_delta", float),
}


@dataclass
class ChatSession:
    gen: Generator
    cfg: DecodeConfig
    system: str | None = None
    draft: bool = True
    messages: list[dict[str, str]] = field(default_factory=list)
    totals: Totals = field(default_factory=Totals)
    last: Totals = field(default_factory=Totals)
    trimmed: int = 0  # turns dropped from the start of the history by the last ask()
    _before: list[dict[str, str]] = field(default_factory=list)  # the history before the last ask()
    cut: bool = False  # the last ask()'s answer stopped where the context ends (not at EOS or max_new_tokens)
    _stream: Iterator[Chunk] | None = None  # the answer ask() streams, until it ends or is closed

    def __post_init__(self) -> None:
        if not isinstance(self.gen, Generator) or not isinstance(self.cfg, DecodeConfig):
            raise BadInputError(f"ChatSession needs a Generator and a DecodeConfig, got {type(self.gen).__name__} and "
                                f"{type(self.cfg).__name__}")
        if self.system is not None and not isinstance(self.system, str):
            raise BadInputError(f"the system prompt is text or None, got {type(self.system).__name__}")
        if self.system is not None and not self.system.strip():
            self.system = ""  # `--system ""`: an empty system turn, in place of the template's default one

    def reset(self) -> None:
        self.messages.clear()

    def withdraw(self) -> None:
        """Take the last exchange back (a message stopped before its answer began): the history is again what
        it was before it, turns trimmed to make room for it included; its statistics leave the totals; and
        the next turn reuses only the KV the target held before that message (not the keys of its prompt
        pass, which a pass of another length computes with other rounding)."""
        if len(self.messages) >= 2 and self.messages[-1]["role"] == "assistant":
            self.messages[:] = self._before
            self.trimmed = 0
            self.totals.add(self.last, sign=-1)
            self.gen.limit_reuse(self.gen.last_reused)
            self.last = Totals()

    def set(self, name: str, value: str) -> str:
        """`/set NAME VALUE`: change a decoding option; raises BadInputError on bad names or values."""
        if name == "draft":
            if value not in ("on", "off"):
                raise BadInputError("draft must be on or off")
            if value == "on" and self.gen.proposer is None:
                raise BadInputError("no drafter loaded")
            self.draft = value == "on"
            return f"draft {value}"
        if name == "system":  # TEXT; nothing: the template's default; "" (or ''): an empty one
            target = self.gen.target
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":  # /set system "Be brief."
                value = value[1:-1] if value[1:-1].strip() else '""'
            system = "" if value == '""' else value or None
            if system is not None:
                if refuses_system(target):
                    raise BadInputError(f"{SYSTEM_REFUSED}: /set system alone sends none (the template's default)")
                alone = len(target.encode_chat("", system=system))  # (a template that fails on it otherwise: here)
                if system and alone + SYSTEM_ROOM > target.max_context:
                    raise ContextOverflowError(f"the system prompt leaves no room for a message in the context of "
                                               f"{target.max_context} tokens; shorten it")
            self.system = system
            return ("system prompt set" if system else "system prompt empty (none of the template's either)"
                    if system == "" else "system prompt cleared (the chat template's default, if it has one)")
        if name not in SETTABLE:
            raise BadInputError(f"unknown setting {name!r}; one of: draft, system, {', '.join(SETTABLE)}")
        attr, kind = SETTABLE[name]
        try:
            parsed = kind(value)
        except ValueError:
            noun = {"int": "an integer", "float": "a number"}.get(kind.__name__, f"a {kind.__name__}")
            raise BadInputError(f"{name} needs {noun}, got {value!r}") from None
        changes: dict = {attr: parsed}
        dropped = ""
        if attr in ("beam_width", "beam_length") and parsed >= 1:
            # A node budget (the drafter's recommendation, or /set nodes) that the new search cannot fill.
            width = parsed if attr == "beam_width" else self.cfg.beam_width
            length = parsed if attr == "beam_length" else self.cfg.beam_length
            if self.cfg.tree_nodes > width * max(length - 1, 0):
                changes["tree_nodes"] = 0
                dropped = f"; nodes {self.cfg.tree_nodes} no longer fits a {width}x{length} search: nodes = 0 (every beam)"
        try:
            if attr in ("temperature", "top_p", "top_k", "seed"):
                new = replace(self.cfg, sampling=replace(self.cfg.sampling, **changes))
            else:
                new = replace(self.cfg, **changes)
            self.gen.check(new)
        except BadInputError as exc:  # the checks name command-line flags: name the /set settings instead
            names = set(SETTABLE) | {"draft", "system"}
            raise type(exc)(re.sub(r"--([a-z-]+)", lambda m: m[1] if m[1] in names else m[0], str(exc))) from None
        self.cfg = new
        if new.sampling.temperature == 0 and (attr in ("top_p", "top_k", "typical_epsilon", "typical_delta")
                                              or (attr == "accept" and parsed in ("rejection", "typical"))):
            dropped += "; at temperature 0 decoding is greedy: it applies once temperature is above 0"
        return f"{name} = {parsed}{dropped}"

    def _prompt_ids(self) -> list[int]:
        """Encode the conversation, dropping the oldest turns when the answer would not have room for
        max_new_tokens (or half the context, if that is less). Turns go until a quarter of the context
        is free (or that room), so that the turns after it go on from the KV cache again for a while
        (a trimmed history starts a new prefix, read again whole)."""
        target = self.gen.target
        self.trimmed = 0
        needed = min(self.cfg.max_new_tokens, target.max_context // 2)
        wanted = needed
        while True:
            ids = target.encode_chat(self.messages, system=self.system)
            room = target.max_context - len(ids)
            if room >= wanted or len(self.messages) <= 1:
                break
            wanted = max(needed, target.max_context // 4)  # trimming at all: make room for the next turns too
            # Drop the oldest user turn and the assistant answer after it.
            cut = 2 if len(self.messages) > 2 and self.messages[1]["role"] == "assistant" else 1
            del self.messages[:cut]
            self.trimmed += 1
        if len(ids) >= target.max_context:
            what = "the system prompt and the message are" if self.system else "the message is"
            fix = "shorten the message or the system prompt (--system, /set system)" if self.system else "shorten it"
            raise ContextOverflowError(
                f"{what} {len(ids)} tokens with the chat template; the context is {target.max_context}"
                f"{getattr(target, 'context_cap', '')}: {fix}"
            )
        return ids

    def _cut(self, ids: list[int], answer: list[int]) -> bool:
        """Whether a finished answer stopped only because the context was full."""
        target = self.gen.target
        ended = bool(answer) and answer[-1] in target.eos_ids
        return len(ids) + len(answer) >= target.max_context and len(answer) < self.cfg.max_new_tokens and not ended

    def ask(self, text: str) -> Iterator[Chunk]:
        """Add a user turn and stream the answer; the answer (even a partial one) joins the history.
        The stream of an earlier ask() still open is closed first (its partial answer joins the history
        then, before this turn)."""
        if not isinstance(text, str):
            raise BadInputError(f"a message is text, got {type(text).__name__}")
        if not text.strip():
            raise BadInputError("empty message")
        if self._stream is not None:
            self._stream.close()
            if self.messages and self.messages[-1]["role"] == "user":  # (never iterated: its turn is taken back)
                self.messages[:] = self._before
                self.trimmed = 0
            self._stream = None
        if self.draft:  # (no drafter, or a shape it cannot run: said before the turn joins the history)
            if self.gen.proposer is None:
                raise BadInputError("ReDrafter decoding needs a drafter (draft=False decodes plainly)")
            self.gen.check(self.cfg)
        self._before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._prompt_ids()
            self.gen.target.check_prompt(ids)  # ids outside the model's vocabulary (a tokenizer of another model)
        except BadInputError:  # too long, a template that fails on it, ids the model lacks: the history stays as it was
            self.messages[:] = self._before
            self.trimmed = 0
            raise
        self._stream = self._answer(text, ids)
        return self._stream

    def _answer(self, text: str, ids: list[int]) -> Iterator[Chunk]:
        """The answer to the turn ask() added (`ids`: the conversation's prompt), streamed."""
        tok = self.gen.target.tokenizer
        loop = self.gen.redraft if self.draft else self.gen.plain  # (both go on from the last answer's KV cache)
        answer: list[int] = []
        # Only the answer's current line is decoded again at each step (its text can still change
        # as tokens join it); tokens up to the last line break are shown for good: `line` is their
        # count, `shown` the text shown since. Decoding the whole answer each step was quadratic.
        line, shown = 0, ""
        stats = Totals(answers=1)
        self.cut = False
        start = time.perf_counter()
        try:
            for step in loop(ids, self.cfg, reuse_cache=True):
                if step.prefill:
                    stats.prompt_tokens, stats.reused_tokens, stats.prompt_s = len(ids), step.reused, step.verify_s
                drafted_ids = step.tokens[: step.accepted]
                # A character whose bytes are not all there yet decodes to U+FFFD: held back until they are.
                with_drafts = tok.decode(answer[line:] + drafted_ids, skip_special_tokens=True).rstrip("\ufffd")
                answer.extend(step.tokens)
                raw = tok.decode(answer[line:], skip_special_tokens=True)
                full = raw.rstrip("\ufffd")
                if not step.prefill:
                    stats.steps += 1
                    stats.step_tokens += len(step.tokens)
                    stats.accepted += step.accepted
                    stats.draftable += max(self.cfg.beam_length - 1, 0) if self.draft else 0  # (bench.py's rate)
                drafted = with_drafts[len(shown):] if with_drafts.startswith(shown) and full.startswith(with_drafts) else ""
                yield Chunk(drafted, full[len(shown) + len(drafted):], step)
                shown = full
                if raw.endswith("\n"):  # (not when a character's first bytes follow it: its tokens stay in the line)
                    line, shown = len(answer), ""
            self.cut = self._cut(ids, answer)
        finally:
            stats.tokens = len(answer)
            stats.seconds = time.perf_counter() - start
            self.messages.append({"role": "assistant", "content": tok.decode(answer, skip_special_tokens=True)})
            self.last = stats
            self.totals.add(stats)
            self._stream = None

