"""Prompt sets: read the common formats, or the project's own built-in sets.

Formats (detected from content, not only the extension):
- JSONL, one object a line, with `turns` (MT-Bench: the first turn is used),
  `prompt`, `text`, `instruction`, `question`, or ShareGPT `conversations`;
- a JSON file holding a list of such objects or of strings (ShareGPT dumps);
- plain text, one prompt a line (blank lines and lines starting with `#` skipped).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PromptError

TEXT_KEYS = ("prompt", "text", "instruction", "question", "input", "content")
HUMAN_ROLES = ("human", "user")


def _from_record(rec: Any) -> list[str] | None:
    """All user turns of one record; None when it is a prompt record that holds nothing (an empty
    text or a conversation without user turns, common in ShareGPT dumps). ValueError (saying why)
    when it is not a prompt record at all: a number, a typo'd key, turns that are not strings."""
    if isinstance(rec, str):
        return [rec] if rec.strip() else None
    if not isinstance(rec, dict):
        raise ValueError(f"is a JSON {type(rec).__name__}, not an object or a string")
    if "turns" in rec:
        turns = rec["turns"]
        if not (isinstance(turns, list) and all(isinstance(t, str) for t in turns)):
            raise ValueError("has 'turns' that is not a list of strings")
        return [t for t in turns if t.strip()] or None
    for key in ("conversations", "messages"):
        if key in rec:
            conv = rec[key]
            if not isinstance(conv, list):
                raise ValueError(f"has '{key}' that is not a list")
            users = [
                m.get("value") or m.get("content")
                for m in conv
                if isinstance(m, dict) and (m.get("from") or m.get("role")) in HUMAN_ROLES
            ]
            users = [u for u in users if isinstance(u, str) and u.strip()]
            return users or None
    for key in TEXT_KEYS:
        if key in rec:
            if not isinstance(rec[key], str):
                raise ValueError(f"has '{key}' that is not a string")
            return [rec[key]] if rec[key].strip() else None
    raise ValueError(f"has none of the keys turns, conversations, messages, {', '.join(TEXT_KEYS)}")


def load_conversations(path: str | Path) -> list[list[str]]:
    """Every prompt in the file as its list of user turns."""
    p = Path(path)
    if p.is_dir():
        raise PromptError(f"{p} is a directory, not a prompt file")
    if p.exists() and not p.is_file():
        raise PromptError(f"{p} is not a regular file (a pipe or a device?); give a prompt file")
    if not p.is_file():
        raise PromptError(f"prompt file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not text
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read prompt file {p}: {exc}") from exc
    stripped = raw.lstrip()
    records: list[tuple[str, Any]]  # (where, record)
    if stripped.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{p} looks like JSON but does not parse: {exc}") from exc
        records = [(f"{p} item {i}", r) for i, r in enumerate(items)]
    elif stripped.startswith("{"):
        try:
            records = [(str(p), json.loads(raw))]  # one object, pretty-printed or not
        except json.JSONDecodeError:
            records = []
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append((f"{p}:{n}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise PromptError(f"{p}:{n} is not a JSON object: {exc.msg}") from exc
    else:
        records = [(str(p), line) for line in raw.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    convs = []
    for where, rec in records:
        try:
            conv = _from_record(rec)
        except ValueError as exc:
            raise PromptError(f"{where} {exc}") from exc
        if conv:
            convs.append(conv)
    if not convs:
        raise PromptError(f"{p} holds no prompts (expected JSONL with turns/prompt/text, ShareGPT JSON or text lines)")
    return convs


def load_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """First user turns from `path`, or the built-in benchmark set when path is None."""
    convs = load_conversations(path) if path is not None else builtin_conversations("bench")
    prompts = [c[0] for c in convs]
    if limit is not None:
        if limit < 1:
            raise PromptError(f"--num-prompts must be >= 1, got {limit}")
        prompts = prompts[:limit]
    return prompts


def builtin_conversations(name: str = "bench") -> list[list[str]]:
    """The project's own prompt sets: 'bench' (held out) or 'distill' (training)."""
    ref = resources.files("redraft_cli") / "data" / f"{name}_prompts.jsonl"
    with resources.as_file(ref) as path:
        return load_conversations(path)
