"""Prompt sets: read the common formats, or the project's own built-in sets.

Formats (detected from content, not only the extension):
- JSONL, one object a line, with `turns` (MT-Bench: the first turn, or all of them with bench --turns),
  `prompt`, `text`, `instruction` (with its Alpaca `input` or Dolly `context`
  after a blank line), `question`, `input`, `content`, or ShareGPT `conversations`
  (`from`/`value`) or OpenAI `messages` (`role`/`content`, where `content` may
  also be a list of text parts, joined with newlines);
- a JSON file holding a list of such objects or of strings (ShareGPT dumps);
- a .csv or .tsv file with a header line, one prompt a row, its text in a column named
  as the JSONL fields above (`prompt`, `text`, `instruction`, `question`, `input`, `content`);
- plain text, one prompt a line (blank lines and lines starting with `#` skipped, each
  line's surrounding spaces dropped).

Only user turns are prompts; the target writes its own answers, so assistant turns are not
used. A prompt's system turn (a `system` or `developer` message before its first user turn,
or a `system` / `system_prompt` field beside its text) is read with `systems=` (bench, sweep
and distill send it; `--system` replaces it).
Any of these may be gzip-compressed, and UTF-16 text with its byte-order mark is read
as well as UTF-8. The path `-` reads standard input, in any of these formats (CSV/TSV
when its first line is a header naming a prompt column).

Lines end at \n (or \r\n) only: U+2028, a form feed and the like are text inside a
prompt. A .json / .jsonl file must hold JSON; any other file that starts with `[` or `{`
but does not parse as JSON is text ("[Verse 1] Write a song."). A .yaml / .yml file
is refused: read as text, its every line was a prompt (a recipe passed as prompts).

A record that is not a prompt is an error naming its line (and, in a JSON
array, its record number) and the field; an empty text or a conversation
without user turns is skipped.
"""

from __future__ import annotations

import io
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import PromptError

TEXT_KEYS = ("prompt", "text", "instruction", "question", "input", "content")
INSTRUCTION_INPUTS = ("input", "context")  # what an instruction is about: Alpaca, Dolly
HUMAN_ROLES = ("human", "user")
SYSTEM_ROLES = ("system", "developer")  # (OpenAI's newer name for the system turn)
SYSTEM_KEYS = ("system", "system_prompt")  # a record's system prompt beside its text (Orca-style dumps)
OTHER_ROLES = ("assistant", "gpt", "bot", "model", "chatgpt", "system", "tool", "function", "ipython", "developer")
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
GZIP_MAGIC = b"\x1f\x8b"  # the first bytes of a gzip file


class Conversation(list):
    """A conversation's user turns (a list of str) that begins with a system turn of its own, `system`.

    distill keeps each conversation's system turn this way, so that every list of conversations (sliced
    into held-out and training ones, hashed into data keys) carries it along.

        Conversation(["Name three colours.", "And three more?"], system="Answer in French.")
    """

    def __init__(self, turns: Any = (), system: str | None = None) -> None:
        super().__init__(turns)
        self.system = system

    def __repr__(self) -> str:
        return f"Conversation({list(self)!r}, system={self.system!r})"


def without_systems(conversations: list[list[str]]) -> list[list[str]]:
    """The conversations with their own system turns left out (plain lists of user turns)."""
    return [list(c) if isinstance(c, Conversation) else c for c in conversations]


def _kind(value: Any) -> str:
    """The type of a JSON value, as an error message names it: int, str, list, dict, null..."""
    return "null" if value is None else type(value).__name__


def _message_text(m: dict, role_key: str) -> str:
    """The text of one user message: a string, or an OpenAI list of text parts (joined with newlines).
    ValueError (naming the field) for anything else."""
    key = "value" if "value" in m else "content" if "content" in m else None
    if key is None:
        raise ValueError(f"with '{role_key}' {m[role_key]!r} but neither 'value' nor 'content'")
    text = m[key]
    if isinstance(text, str):
        return text
    if isinstance(text, list):
        parts = []
        for j, part in enumerate(text, 1):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "text":
                raise ValueError(f"whose '{key}' part {j} has 'text' that is not text (got {_kind(part.get('text'))})")
            elif isinstance(part, dict) and "type" in part:
                raise ValueError(f"whose '{key}' part {j} is of type {part['type']!r}, not text")
            else:
                raise ValueError(f"whose '{key}' part {j} is not a text part (got {_kind(part)})")
        return "\n".join(parts)
    raise ValueError(f"whose '{key}' is not text (got {_kind(text)})")


def _conversation(conv: Any, key: str) -> list[str] | None:
    """User turns of a ShareGPT `conversations` or OpenAI `messages` list; ValueError naming the message."""
    if not isinstance(conv, list):
        raise ValueError(f"has '{key}' that is not a list (got {_kind(conv)})")
    users = []
    for i, m in enumerate(conv, 1):
        try:
            if not isinstance(m, dict):
                raise ValueError(f"that is not an object (got {_kind(m)})")
            role_key = "from" if "from" in m else "role" if "role" in m else None
            if role_key is None:
                raise ValueError("with neither 'from' nor 'role'")
            if not isinstance(m[role_key], str):
                raise ValueError(f"whose '{role_key}' is not a string (got {_kind(m[role_key])})")
            role = m[role_key].strip().lower()
            if role in HUMAN_ROLES:
                text = _message_text(m, role_key)
                if text.strip():
                    users.append(text)
            elif role not in OTHER_ROLES:  # a typo'd "usr" would leave the conversation without its prompts
                raise ValueError(f"whose '{role_key}' is {m[role_key]!r}: prompts are the messages of role "
                                 f"{' or '.join(HUMAN_ROLES)} (others: {', '.join(OTHER_ROLES)})")
        except ValueError as exc:
            raise ValueError(f"has '{key}' message {i} {exc}") from None
    return users or None


def _record_system(rec: Any) -> str | None:
    """The system turn of a prompt record (one _from_record accepted): the `system` / `developer` messages
    before its first user message (joined with blank lines; an empty one is an empty turn), else a
    non-blank `system` / `system_prompt` field; None when it has none. ValueError naming the field when
    that field is not text."""
    if not isinstance(rec, dict):
        return None
    key = next((k for k in ("conversations", "messages") if k in rec), None)
    if key is not None and "turns" not in rec:
        texts = []
        for i, m in enumerate(rec[key], 1):  # (_conversation checked each message's role)
            role_key = "from" if "from" in m else "role"
            role = m[role_key].strip().lower()
            if role in HUMAN_ROLES and _message_text(m, role_key).strip():  # (a blank one is no prompt: skipped)
                break
            if role in SYSTEM_ROLES:
                try:
                    texts.append(_message_text(m, role_key))
                except ValueError as exc:
                    raise ValueError(f"has '{key}' message {i} {exc}") from None
        if texts:
            return "\n\n".join(texts)
    for key in SYSTEM_KEYS:  # (beside a conversation without system messages too: OpenHermes-style dumps)
        if rec.get(key) is not None:
            if not isinstance(rec[key], str):
                raise ValueError(f"has '{key}' that is not a string (got {_kind(rec[key])})")
            if rec[key].strip():
                return rec[key]
    return None


def _with_input(rec: dict) -> str:
    """An `instruction` record's prompt: the instruction, then its Alpaca `input` (Dolly: `context`), the
    text it is about, after a blank line. ValueError when that field is not text."""
    parts = [rec["instruction"]]
    for key in INSTRUCTION_INPUTS:
        if rec.get(key) is not None:
            if not isinstance(rec[key], str):
                raise ValueError(f"has '{key}' that is not a string (got {_kind(rec[key])})")
            parts.append(rec[key])
    return "\n\n".join(p for p in parts if p.strip())


def _from_record(rec: Any) -> list[str] | None:
    """All user turns of one record; None when it is a prompt record that holds nothing (an empty
    text or a conversation without user turns, common in ShareGPT dumps). ValueError (saying why,
    naming the field) when it is not a prompt record at all: a number, a typo'd key, turns that are
    not strings, a message whose text is a number or null."""
    if isinstance(rec, str):
        return [rec] if rec.strip() else None
    if not isinstance(rec, dict):
        raise ValueError(f"is a JSON {_kind(rec)}, not an object or a string")
    if "turns" in rec:
        turns = rec["turns"]
        if not isinstance(turns, list):
            raise ValueError(f"has 'turns' that is not a list of strings (got {_kind(turns)})")
        for i, t in enumerate(turns, 1):
            if not isinstance(t, str):
                raise ValueError(f"has 'turns' that is not a list of strings (item {i} is {_kind(t)})")
        return [t for t in turns if t.strip()] or None
    for key in ("conversations", "messages"):
        if key in rec:
            return _conversation(rec[key], key)
    role_key = "role" if "role" in rec else "from" if "from" in rec else None
    if role_key and isinstance(rec[role_key], str) and rec[role_key].strip().lower() in HUMAN_ROLES + OTHER_ROLES:
        # (a file of one message a line: its system and assistant messages would each have been a prompt)
        raise ValueError(f"is one message ('{role_key}' {rec[role_key]!r}), not a prompt: put a conversation's "
                         f"messages in one record's 'messages' (or 'conversations') list")
    for key in TEXT_KEYS:
        if key in rec:
            if not isinstance(rec[key], str):
                raise ValueError(f"has '{key}' that is not a string (got {_kind(rec[key])})")
            text = _with_input(rec) if key == "instruction" else rec[key]
            return [text] if text.strip() else None
    found = ", ".join(repr(k) for k in list(rec)[:5]) + (", ..." if len(rec) > 5 else "")
    raise ValueError(f"has none of the keys turns, conversations, messages, {', '.join(TEXT_KEYS)} "
                     f"(its keys: {found or 'none'})")


def _line_at(raw: str, pos: int) -> int:
    return raw.count("\n", 0, pos) + 1


def _array_item_line(raw: str, index: int) -> int:
    """Line where item `index` of the (valid) JSON array in `raw` starts. Walks the items again, so it
    is only called for the one item an error names."""
    decoder = json.JSONDecoder()
    pos = _WS.match(raw, 0).end() + 1  # past '['
    for _ in range(index):
        _, pos = decoder.raw_decode(raw, _WS.match(raw, pos).end())
        pos = _WS.match(raw, pos).end() + 1  # past ','
    return _line_at(raw, _WS.match(raw, pos).end())


def _parses(text: str) -> bool:
    """Whether text is JSON: one document, or JSON lines (its first non-blank line)."""
    try:
        json.loads(text)
        return True
    except (ValueError, RecursionError):
        pass
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        json.loads(first)
        return True
    except (ValueError, RecursionError):
        return False


def load_conversations(path: str | Path, skipped: list[str] | None = None,
                       systems: list[str | None] | None = None) -> list[list[str]]:
    """Every prompt in the file (or, for '-', standard input) as its list of user turns. A record
    that is not a prompt is a PromptError, or, when a `skipped` list is given (large community
    dumps), left out and its one-line reason appended there. A `systems` list receives each
    returned conversation's system turn, in order (None where it has none; one that is not text
    is its record's error)."""
    raw, p, suffix = _read_source(path)
    return _parse(raw, p, suffix, skipped, systems)


def _read_source(path: str | Path) -> tuple[str, str, str]:
    """(text, name for messages, lower-case extension) of a prompt file, or of standard input for
    '-' (its format is told from its content, as for a file without a known extension)."""
    if not str(path).strip():
        raise PromptError("the prompt file path is empty; give a prompt file")
    if str(path) == "-":
        import sys

        if sys.stdin is None or sys.stdin.closed:
            raise PromptError("--prompts - reads standard input, but there is none")
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        return _decoded(data, "standard input"), "<stdin>", ""
    p = Path(path)
    if str(path) == ".":  # (what the command line makes of an empty --prompts "")
        raise PromptError("the prompt file path is empty (or '.', a folder); give a prompt file")
    if p.is_dir():
        raise PromptError(f"{p} is a directory, not a prompt file")
    if p.exists() and not p.is_file():
        raise PromptError(f"{p} is not a regular file (a pipe or a device?); give a prompt file, or - for "
                          f"standard input")
    if not p.is_file():
        raise PromptError(f"prompt file not found: {p}")
    if p.suffix.lower() in (".yaml", ".yml"):  # read as text, each line ("name: ...", "- ...") became a prompt
        raise PromptError(f"{p} is a YAML file, not prompts (JSONL, JSON, CSV or text lines); a distillation recipe is "
                          f"distill's first argument")
    try:  # (bytes: read_text's universal newlines would end a line at a lone \r too)
        data = p.read_bytes()
    except OSError as exc:
        raise PromptError(f"cannot read prompt file {p}: {exc}") from exc
    suffix = p.suffix.lower()
    if suffix == ".gz" or data[:2] == GZIP_MAGIC:
        suffix = Path(p.stem).suffix.lower() if suffix == ".gz" else suffix  # prompts.jsonl.gz: JSONL
    return _decoded(data, f"prompt file {p}"), str(p), suffix



def _decoded(data: bytes, what: str) -> str:
    """The text of a prompt file's bytes: gunzipped when gzip-compressed, UTF-16 when it starts with
    UTF-16's byte-order mark, else UTF-8 (a UTF-8 byte-order mark dropped). PromptError otherwise."""
    import codecs
    import gzip
    import zlib

    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise PromptError(f"cannot read {what}: it is gzip-compressed but does not decompress ({exc})") from exc
    try:
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            return data.decode("utf-16")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptError(f"cannot read {what}: it is not UTF-8 (nor UTF-16 with a byte-order mark) text: byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start}") from exc


def _parse(raw: str, p: str, suffix: str, skipped: list[str] | None,
           systems: list[str | None] | None = None) -> list[list[str]]:
    """The conversations in `raw`, the text of the source named `p` whose extension is `suffix`."""
    stripped = raw.lstrip()
    records: list[tuple[Any, Any]]  # (where: a line number, or a JSON array index; record)
    lines = [line.removesuffix("\r") for line in raw.split("\n")]  # (not splitlines: U+2028 and friends are text)
    if p == "<stdin>" and not suffix:
        suffix = _table_suffix(lines)
    json_file = suffix in (".json", ".jsonl")
    if stripped.startswith(("[", "{")) and not json_file and not _parses(stripped):
        stripped = ""  # a text file whose first prompt starts with a bracket: "[Verse 1] ...", "{name} ..."
    if suffix in (".csv", ".tsv"):
        records = _table_records(p, suffix, raw, skipped)
    elif stripped.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{p}:{exc.lineno}: looks like a JSON array but does not parse "
                              f"({exc.msg}, column {exc.colno})") from exc
        except (ValueError, RecursionError) as exc:  # a 5,000-digit number, nesting past Python's stack
            raise PromptError(f"{p}: cannot read its JSON ({type(exc).__name__}: {str(exc)[:80]})") from exc
        records = [(("item", i), r) for i, r in enumerate(items)]
    elif stripped.startswith("{"):
        try:  # one object, pretty-printed or not: it starts on the line of its '{'
            records = [(("line", _line_at(raw, len(raw) - len(raw.lstrip()))), json.loads(raw))]
        except (ValueError, RecursionError):
            records = []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    records.append((("line", n), json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise PromptError(f"{p}:{n}: is not a JSON object ({exc.msg}, column {exc.colno})") from exc
                except (ValueError, RecursionError) as exc:
                    raise PromptError(f"{p}:{n}: cannot read its JSON ({type(exc).__name__}: {str(exc)[:80]})") from exc
    else:
        if json_file and stripped:  # JSON that is not prompts: not a text file either
            raise PromptError(f"{p} is a {suffix} file but holds no JSON object or array of prompts "
                              f"(it starts with {stripped[:20]!r})")
        if "\x00" in raw:
            raise PromptError(f"{p} holds NUL bytes: a binary file, not prompts")
        records = [(None, line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    def at(where: tuple[str, int]) -> str:
        if where[0] == "item":
            return f"{p}:{_array_item_line(raw, where[1])}: record {where[1] + 1}"
        return f"{p}:{where[1]}: record"

    convs = []
    found: list[str | None] = []  # each kept conversation's system turn
    for where, rec in records:
        try:
            conv = _from_record(rec)
            system = _record_system(rec) if conv and systems is not None else None
        except ValueError as exc:
            if skipped is None:
                raise PromptError(f"{at(where)} {exc}") from exc
            skipped.append(f"{at(where)} {exc}")
            continue
        if conv:
            convs.append(conv)
            found.append(system)
        elif skipped is not None and where:  # an empty prompt (common in dumps): left out, and counted
            skipped.append(f"{at(where)} holds no prompt text")
    if not convs and skipped:  # every record was left out: say why the first was
        raise PromptError(f"{p} holds no prompts: every record was skipped; the first, {skipped[0]}")
    if not convs:
        raise PromptError(f"{p} holds no prompts (expected JSONL with turns/prompt/text, ShareGPT JSON, CSV with a "
                          f"prompt column, or text lines)")
    if systems is not None:
        systems.extend(found)
    return convs


def _table_suffix(lines: list[str]) -> str:
    """".tsv" or ".csv" when the first non-blank line is a header naming a prompt column (standard input,
    which has no extension to say so), else ""."""
    first = next((line for line in lines if line.strip()), "")
    for delimiter, suffix in (("\t", ".tsv"), (",", ".csv")):
        columns = [c.strip().strip('"') for c in first.split(delimiter)]
        if len(columns) >= 2 and set(columns) & set(TEXT_KEYS):
            return suffix
    return ""


def _table_records(p: str, suffix: str, raw: str, skipped: list[str] | None = None) -> list[tuple[Any, Any]]:
    """The rows of a .csv / .tsv file with a header line, as records keyed by its column names (a
    column named as a JSONL text field: TEXT_KEYS): (("line", n), row) each, n the line where the
    row starts. A row with fewer fields than the header is an error (or, with `skipped`, left out)."""
    import csv

    kind = suffix[1:].upper()
    # strict: a quote left open swallowed the rest of the file into one prompt
    reader = csv.DictReader(io.StringIO(raw, newline=""), delimiter="\t" if suffix == ".tsv" else ",", strict=True)
    rows = []
    end = 0  # the last line read: a row starts on the next one
    try:
        names = reader.fieldnames
        end = reader.line_num
        for row in reader:
            where = ("line", end + 1)
            end = reader.line_num
            if None in row.values():  # (DictReader's filler for fields the row lacks)
                why = (f"{p}:{where[1]}: record has {sum(v is not None for v in row.values())} field(s) where the "
                       f"header names {len(names)}")
                if skipped is None:
                    raise PromptError(why)
                skipped.append(why)
                continue
            rows.append((where, {k: v for k, v in row.items() if k is not None}))
    except csv.Error as exc:
        raise PromptError(f"{p}:{end + 1}: cannot read it as {kind} ({exc})") from exc
    if not names:
        raise PromptError(f"{p} holds no prompts (a {kind} file needs a header line naming its "
                          f"prompt column: {', '.join(TEXT_KEYS)})")
    if not set(TEXT_KEYS) & set(names):
        columns = ", ".join(repr(c) for c in names[:8]) + (", ..." if len(names) > 8 else "")
        raise PromptError(f"{p}:1: the header names no prompt column (one of {', '.join(TEXT_KEYS)}; "
                          f"its columns: {columns})")
    twice = sorted({c for c in names if names.count(c) > 1 and c in TEXT_KEYS + SYSTEM_KEYS})
    if twice:
        holds = "system prompts" if twice[0] in SYSTEM_KEYS else "prompts"
        raise PromptError(f"{p}:1: the header names the column {twice[0]!r} twice; which one holds the {holds}?")
    return rows


def load_prompt_conversations(path: str | Path | None = None, limit: int | None = None,
                              systems: list[str | None] | None = None) -> list[list[str]]:
    """The user turns of each prompt in `path` (the first `limit`), or of the built-in benchmark set when
    path is None; a `systems` list receives each one's system turn (None where it has none; the built-in
    set has none)."""
    if limit is not None and limit < 1:
        raise PromptError(f"--num-prompts must be >= 1, got {limit}")
    found: list[str | None] | None = None if systems is None else []
    convs = (load_conversations(path, systems=found) if path is not None else builtin_conversations("bench"))[:limit]
    if systems is not None:
        systems.extend((found or [None] * len(convs))[: len(convs)])
    return convs


def load_prompts(path: str | Path | None = None, limit: int | None = None,
                 systems: list[str | None] | None = None) -> list[str]:
    """First user turns from `path`, or the built-in benchmark set when path is None; a `systems` list
    receives each prompt's system turn (None where it has none; the built-in set has none)."""
    return [c[0] for c in load_prompt_conversations(path, limit, systems)]


def builtin_conversations(name: str = "bench") -> list[list[str]]:
    """The project's own prompt sets: 'bench' (held out) or 'distill' (training)."""
    ref = resources.files("redraft_cli") / "data" / f"{name}_prompts.jsonl"
    with resources.as_file(ref) as path:
        return load_conversations(path)
