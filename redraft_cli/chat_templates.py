"""Chat templates for targets whose tokenizer has none (e.g. Vicuna v1.3).

A template is given by name (`NAMED`), as a Jinja file, or as Jinja text:
a recipe's `target.chat_template`, or `--chat-template` on distill, bench,
chat and sweep. A drafter remembers the template it was distilled with (its
`recipe.yaml`), so decoding with it renders prompts the way its training
data was rendered: `template_for_drafter` reads it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import BadInputError

VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions. ' }}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

NAMED = {"vicuna": VICUNA}


def resolve_template(value: str) -> str:
    """A template name, a path to a Jinja file, or Jinja text -> Jinja text (whose syntax is checked)."""
    if not value.strip():
        raise BadInputError("the chat template is empty: give a name, a Jinja file or Jinja text")
    if value in NAMED:
        return NAMED[value]
    if "{{" in value or "{%" in value:
        return _checked(value, "the chat template")
    try:
        path = Path(value).expanduser()
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, RuntimeError, ValueError):  # a name too long for a path, ~user of no such user, a NUL
        is_file = is_dir = False
    if is_dir:
        raise BadInputError(f"chat template {path} is a folder; give a Jinja file, a name ({', '.join(NAMED)}) "
                            f"or Jinja text")
    if is_file:
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInputError(f"cannot read chat template {path}: {exc}") from exc
        if "{{" not in text and "{%" not in text:
            raise BadInputError(f"{path} is not a Jinja chat template (no {{{{ }}}} or {{% %}} in it)")
        return _checked(text, str(path))
    shown = value if len(value) <= 80 else value[:77] + "..."
    raise BadInputError(f"unknown chat template {shown!r}: give a name ({', '.join(NAMED)}), a Jinja file "
                        f"or Jinja text")


def _checked(text: str, what: str) -> str:
    """Jinja text whose syntax compiles as transformers compiles chat templates (where that helper exists)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # another transformers version: rendering checks it later
        return text
    from jinja2 import TemplateSyntaxError

    try:
        _compile_jinja_template(text)
    except TemplateSyntaxError as exc:
        raise BadInputError(f"{what} is not valid Jinja: {exc} (line {exc.lineno})") from exc
    return text


def apply_chat_template(target: Any, value: str | None) -> None:
    """Render the target's conversations with `value` (see `resolve_template`); None: leave its own.
    A template that does not render a one-turn conversation is refused, and the tokenizer keeps its own."""
    if value is None:
        return
    tok = target.tokenizer
    before, tok.chat_template = getattr(tok, "chat_template", None), resolve_template(value)
    probe = "Hello, how are you?"
    try:
        if probe not in render(tok, [{"role": "user", "content": probe}]):
            raise BadInputError("the chat template does not show the user's message (it renders a one-turn "
                                "conversation without it)")
    except BadInputError:
        tok.chat_template = before
        raise


def render(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template applied to `messages`, ready for the assistant's turn; a
    template that fails (Jinja syntax, an undefined name, raise_exception) is a BadInputError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # template code can raise anything: Jinja errors, 1/0, a range too big
        raise BadInputError(f"the chat template does not render: {type(exc).__name__}: {exc}") from exc


def control_strings(tokenizer: Any) -> list[str]:
    """The text of the tokenizer's special tokens ('<|im_end|>', '<s>', ...), longest first."""
    names = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            names.add(str(tok.content))
    return sorted((n for n in names if n), key=len, reverse=True)


def encode_messages(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` rendered by the chat template, ready for the assistant's turn, with
    the messages' text kept literal.

    The template's own control tokens are parsed ('<|im_start|>user'), but a
    message that holds a control token's string ('ignore that <|im_end|>') is
    tokenized with special tokens split, so a user cannot close a turn or open
    a system one by typing it. Conversations without such strings (nearly all)
    are tokenized as one text, exactly as the template renders them. The
    messages are found by rendering them as markers; a template that changes
    such a message's text (trims, escapes it) is a BadInputError, since its
    control tokens could not be told from the template's.
    """
    text = render(tokenizer, messages)
    plain = lambda piece: list(tokenizer(piece, add_special_tokens=False)["input_ids"]) if piece else []  # noqa: E731
    controls = control_strings(tokenizer)
    risky = {i: m["content"] for i, m in enumerate(messages)
             if isinstance(m.get("content"), str) and any(c in m["content"] for c in controls)}
    if not risky:
        return plain(text)
    markers = {i: f"\ue000{i}\ue001" for i in risky}
    marked = render(tokenizer, [{**m, "content": markers[i]} if i in risky else m for i, m in enumerate(messages)])
    restored = marked
    for i, mark in markers.items():
        restored = restored.replace(mark, risky[i])
    if restored != text or any(marked.count(mark) != 1 for mark in markers.values()):
        found = next(c for c in controls if any(c in content for content in risky.values()))
        raise BadInputError(f"a message holds the control token {found!r} and the chat template changes the "
                            f"message's text, so it cannot be kept as plain text: remove it")
    ids, pos = [], 0
    for at, i in sorted((marked.index(mark), i) for i, mark in markers.items()):
        ids += plain(marked[pos:at])
        ids += list(tokenizer(risky[i], add_special_tokens=False, split_special_tokens=True)["input_ids"])
        pos = at + len(markers[i])
    return ids + plain(marked[pos:])


def _saved_text(drafter_dir: str | Path, section: str, name: str) -> str | None:
    """The text field `section.name` of a drafter's saved recipe (`recipe.yaml`, written by distill); None
    when there is no recipe or the field is unset. A recipe that cannot be read, or whose field is not
    text, is a BadInputError."""
    path = Path(drafter_dir) / "recipe.yaml"
    if not path.is_file():
        return None
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BadInputError(f"cannot read {path}: {type(exc).__name__}") from exc
    part = recipe.get(section) if isinstance(recipe, dict) else None
    value = part.get(name) if isinstance(part, dict) else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInputError(f"{path}: {section}.{name} is not text ({value!r})")
    return value


def template_for_drafter(drafter_dir: str | Path) -> str | None:
    """The chat template named in a drafter's saved recipe; None when there is no recipe or it names
    none. A recipe that cannot be read, or whose target.chat_template is not text, is a BadInputError
    (the caller notes it and goes on)."""
    value = _saved_text(drafter_dir, "target", "chat_template")
    return value if value is not None and value.strip() else None


def system_for_drafter(drafter_dir: str | Path) -> str | None:
    """The system prompt a drafter's training conversations began with (its recipe's data.system); None
    when it had none (the template's default), or there is no recipe. Errors as template_for_drafter's."""
    value = _saved_text(drafter_dir, "data", "system")
    return value if value else None


PLAIN_SYSTEM = "You are a helpful assistant."  # what refuses_system tries: no control token, no edge


def refuses_system(target: Any) -> bool:
    """Whether `target`'s chat template fails on a plain system turn but renders the same message without
    one (Gemma's raises 'System role not supported'). A template that fails either way is not refusing a
    system turn: its own error stands; nor is one that fails only on a given system text (a control
    token's string in it, with a template that rewrites messages): that text's own error stands."""
    try:
        target.encode_chat("Hello", system=PLAIN_SYSTEM)
        return False
    except BadInputError:
        pass
    try:
        target.encode_chat("Hello")
    except BadInputError:
        return False
    return True


SYSTEM_REFUSED = "the chat template refuses a system turn"

