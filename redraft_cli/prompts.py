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
    """All user turns of one record (None if it holds no prompt)."""
    if isinstance(rec, str):
        return [rec] if rec.strip() else None
    if not isinstance(rec, dict):
        return None
    turns = rec.get("turns")
    if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
        return [t for t in turns if t.strip()] or None
    conv = rec.get("conversations") or rec.get("messages")
    if isinstance(conv, list):
        users = [
            m.get("value") or m.get("content")
            for m in conv
            if isinstance(m, dict) and (m.get("from") or m.get("role")) in HUMAN_ROLES
        ]
        users = [u for u in users if isinstance(u, str) and u.strip()]
        return users or None
    for key in TEXT_KEYS:
        if isinstance(rec.get(key), str) and rec[key].strip():
            return [rec[key]]
    return None


def load_conversations(path: str | Path) -> list[list[str]]:
    """Every prompt in the file as its list of user turns."""
    p = Path(path)
    if p.is_dir():
        raise PromptError(f"{p} is a directory, not a prompt file")
    if not p.is_file():
        raise PromptError(f"prompt file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"cannot read prompt file {p}: {exc}") from exc
    stripped = raw.lstrip()
    records: list[Any]
    if stripped.startswith("["):
        try:
            records = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{p} looks like JSON but does not parse: {exc}") from exc
    elif stripped.startswith("{"):
        records = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PromptError(f"{p}:{n} is not a JSON object: {exc.msg}") from exc
    else:
        records = [line for line in raw.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    convs = [c for c in (_from_record(r) for r in records) if c]
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
