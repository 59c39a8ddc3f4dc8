"""Multi-turn prompts, answered as MT-Bench answers them: each user turn after the first is asked
after the model's own answer to the turn before.

A `Dialogue` holds the user turns (text) and an optional system turn. Turn k's prompt is the chat
template's rendering of the system turn, user turns 1..k and one path's own answers to turns
1..k-1, ready for the assistant. Each decoding path (plain, ReDrafter, HF generate) answers from its
own earlier answers, so a path that answered differently is measured on the conversation it made.

    d = Dialogue(["Name three colours.", "And three more?"], system=None)
    d.prompt(target, [])        # turn 1: [system] user 1 | assistant turn opened
    d.prompt(target, [answer])  # turn 2: [system] user 1 | assistant `answer` (token ids, decoded) | user 2 | ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BadInputError


@dataclass
class Dialogue:
    """A prompt of `turns` user turns (a non-empty list of text) with its `system` turn (None: the chat
    template's default; "" an empty one)."""

    turns: list[str]
    system: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.turns, (list, tuple)) or not self.turns or not all(isinstance(t, str) for t in self.turns):
            raise BadInputError(f"a Dialogue's turns are a non-empty list of user turns (text), got {self.turns!r:.80}")
        if self.system is not None and not isinstance(self.system, str):
            raise BadInputError(f"a Dialogue's system turn is a text or None, got {type(self.system).__name__}")
        self.turns = list(self.turns)

    def __len__(self) -> int:
        return len(self.turns)

    def messages(self, answers: list[str]) -> list[dict[str, str]]:
        """The messages of turn len(answers) + 1: the user turns so far with `answers` (text) between them."""
        if len(answers) >= len(self.turns):
            raise BadInputError(f"a Dialogue of {len(self.turns)} turn(s) has no turn {len(answers) + 1}")
        out: list[dict[str, str]] = []
        for user, answer in zip(self.turns, answers):
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return out + [{"role": "user", "content": self.turns[len(answers)]}]

    def prompt(self, target: Any, answers: list[list[int]]) -> list[int]:
        """Token ids of turn len(answers) + 1 through `target`'s chat template, `answers` being one path's
        answers to the turns before (token ids; their special tokens, such as the end of turn, are left
        out of the text, as a chat client shows them)."""
        if getattr(target, "tokenizer", None) is None:
            raise BadInputError(f"a Dialogue is rendered by a target's tokenizer and chat template, and "
                                f"{getattr(target, 'name', 'this target')} has no tokenizer: pass token ids instead")
        texts = [target.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        return target.encode_chat(self.messages(texts), system=self.system)


def turn_counts(prompts: list[list[int] | Dialogue]) -> list[int]:
    """Each prompt's user turns: a Dialogue's, or 1 for token ids."""
    return [len(p) if isinstance(p, Dialogue) else 1 for p in prompts]


def first_turn(target: Any, prompt: list[int] | Dialogue) -> list[int]:
    """A prompt's first turn as token ids (token ids are their own first turn)."""
    return prompt.prompt(target, []) if isinstance(prompt, Dialogue) else prompt
