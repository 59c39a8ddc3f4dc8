"""Prompt files in every supported format, the built-in sets, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from redraft_cli.errors import PromptError
from redraft_cli.prompts import builtin_conversations, load_conversations, load_prompts


def test_formats(tmp_path):
    mt = tmp_path / "mt.jsonl"
    mt.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "turns": ["first a", "second a"]},
        {"prompt": "p b"},
        {"text": "t c"},
        {"conversations": [{"from": "human", "value": "share d"}, {"from": "gpt", "value": "x"}]},
    ]) + "\n\n")
    assert load_prompts(mt) == ["first a", "p b", "t c", "share d"]
    assert load_conversations(mt)[0] == ["first a", "second a"]
    sharegpt = tmp_path / "sg.json"
    sharegpt.write_text(json.dumps([
        {"id": "x", "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                      {"from": "human", "value": "q2"}]},
        {"id": "y", "conversations": [{"from": "gpt", "value": "only a model turn"}]},
        {"messages": [{"role": "user", "content": "m1"}]},
    ]))
    assert load_conversations(sharegpt) == [["q1", "q2"], ["m1"]]
    text = tmp_path / "p.txt"
    text.write_text("# comment\nline one\n\nline two\n")
    assert load_prompts(text) == ["line one", "line two"]
    assert load_prompts(text, limit=1) == ["line one"]
    # A byte-order mark (files saved by Windows editors) is not part of the first prompt, in any format.
    for name, body in (("bom.jsonl", mt.read_text()), ("bom.json", sharegpt.read_text()), ("bom.txt", text.read_text())):
        bom = tmp_path / name
        bom.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert load_conversations(bom) == load_conversations(tmp_path / {"bom.jsonl": "mt.jsonl", "bom.json": "sg.json",
                                                                         "bom.txt": "p.txt"}[name])


def test_bad_files(tmp_path):
    with pytest.raises(PromptError, match="not found"):
        load_prompts(tmp_path / "nope.jsonl")
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts(empty)
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(PromptError, match=":2"):
        load_prompts(broken)
    js = tmp_path / "b.json"
    js.write_text("[1, 2")
    with pytest.raises(PromptError):
        load_prompts(js)
    with pytest.raises(PromptError):
        load_prompts(None, limit=0)


def test_builtin_sets_are_disjoint_and_varied():
    bench = builtin_conversations("bench")
    distill = builtin_conversations("distill")
    assert len(bench) == 80 and len(distill) >= 2000
    assert not {c[0] for c in bench} & {c[0] for c in distill}
    assert len({c[0] for c in distill}) == len(distill)
    assert load_prompts(limit=5) == [c[0] for c in bench[:5]]


@pytest.mark.parametrize("lines, where, why", [
    (['{"prompt": "ok"}', '{"promt": "typo"}'], ":2", "none of the keys"),
    (['{"prompt": "ok"}', "7"], ":2", "JSON int"),
    (['{"prompt": "ok"}', '{"turns": [1, 2]}'], ":2", "'turns' that is not a list of strings"),
    (['{"text": ["a"]}', '{"prompt": "ok"}'], ":1", "'text' that is not a string"),
])
def test_records_that_are_not_prompts_are_errors_not_skipped(tmp_path, lines, where, why):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptError, match=why) as exc:
        load_conversations(f)
    assert f"p.jsonl{where}" in str(exc.value)


def test_empty_records_are_skipped_and_odd_files_load_or_fail_clearly(tmp_path):
    import os

    dump = tmp_path / "sharegpt.json"  # a dump with an empty conversation: skipped, as real dumps have them
    dump.write_text(json.dumps([{"conversations": []}, {"conversations": [{"from": "human", "value": "Hi"}]}]))
    assert load_conversations(dump) == [["Hi"]]
    pretty = tmp_path / "one.json"
    pretty.write_text('{\n  "prompt": "Hello there"\n}\n')
    assert load_prompts(pretty) == ["Hello there"]
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(PromptError, match="not a regular file"):
        load_conversations(fifo)


def _sharegpt(*last):
    """A JSON array whose first two records are good and the bad one(s) come third."""
    good = {"conversations": [{"from": "human", "value": "hi"}]}
    return [good, good, *last]


@pytest.mark.parametrize("records, indent, where, why", [
    (_sharegpt({"conversations": [{"from": "human", "value": 5}]}), None, ":1: record 3 ",
     "'conversations' message 1 whose 'value' is not text (got int)"),
    (_sharegpt({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": None}]}), 2,
     ":18: record 3 ", "'conversations' message 2 whose 'value' is not text (got null)"),
    (_sharegpt({"messages": [{"role": "user", "content": None}]}), None, ":1: record 3 ",
     "'messages' message 1 whose 'content' is not text (got null)"),
    (_sharegpt({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
     None, ":1: record 3 ", "'messages' message 1 whose 'content' part 1 is of type 'image_url', not text"),
    (_sharegpt({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}]}),
     None, ":1: record 3 ", "'messages' message 1 whose 'content' part 1 has 'text' that is not text (got int)"),
    (_sharegpt({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]}),
     None, ":1: record 3 ", "'messages' message 1 whose 'content' part 2 is not a text part (got str)"),
    (_sharegpt({"messages": [{"role": "user", "content": {"text": "a"}}]}), None, ":1: record 3 ",
     "'messages' message 1 whose 'content' is not text (got dict)"),
    (_sharegpt({"conversations": None}), None, ":1: record 3 ", "'conversations' that is not a list (got null)"),
    (_sharegpt({"conversations": [None]}), None, ":1: record 3 ",
     "'conversations' message 1 that is not an object (got null)"),
    (_sharegpt({"conversations": [{"speaker": "human", "value": "x"}]}), None, ":1: record 3 ",
     "'conversations' message 1 with neither 'from' nor 'role'"),
    (_sharegpt({"messages": [{"role": None, "content": "x"}]}), None, ":1: record 3 ",
     "'messages' message 1 whose 'role' is not a string (got null)"),
    (_sharegpt({"conversations": [{"from": "human", "text": "x"}]}), None, ":1: record 3 ",
     "'conversations' message 1 with 'from' 'human' but neither 'value' nor 'content'"),
    (_sharegpt(None), 1, ":18: record 3 ", "is a JSON null, not an object or a string"),
    (_sharegpt({"prompt": 5}), None, ":1: record 3 ", "'prompt' that is not a string (got int)"),
])
def test_json_array_errors_name_record_line_and_field(tmp_path, records, indent, where, why):
    f = tmp_path / "prompts.json"
    f.write_text(json.dumps(records, indent=indent))
    with pytest.raises(PromptError) as exc:
        load_conversations(f)
    assert f"prompts.json{where}" in str(exc.value) and why in str(exc.value), str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("lines, where, why", [
    (['{"prompt": 5}'], ":1:", "'prompt' that is not a string (got int)"),  # one line: still named
    (['', '{"prompt": null}'], ":2:", "'prompt' that is not a string (got null)"),
    (['{"turns": ["a", null]}'], ":1:", "'turns' that is not a list of strings (item 2 is null)"),
    (['{"prompt": "ok"}', '{"turns": "hello"}'], ":2:", "'turns' that is not a list of strings (got str)"),
    (['{"prompt": "ok"}', '{"conversations": [{"from": "human", "value": 5}]}'], ":2:",
     "'conversations' message 1 whose 'value' is not text (got int)"),
    (['{"messages": [{"role": "user", "content": null}]}'], ":1:",
     "'messages' message 1 whose 'content' is not text (got null)"),
    (['{"promt": "typo"}'], ":1:", "none of the keys turns, conversations"),
    (['{"prompt": "ok"}', '{"prompt": '], ":2:", "is not a JSON object"),
])
def test_jsonl_errors_name_line_and_field(tmp_path, lines, where, why):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(PromptError) as exc:
        load_conversations(f)
    assert f"p.jsonl{where}" in str(exc.value) and why in str(exc.value), str(exc.value)


def test_json_object_file_and_broken_array_name_line(tmp_path):
    wrapped = tmp_path / "w.json"  # an object wrapping the list, not a list: its keys are named
    wrapped.write_text('\n{\n  "data": [{"prompt": "x"}]\n}\n')
    with pytest.raises(PromptError, match=r"w\.json:2: record has none of the keys .*its keys: 'data'"):
        load_conversations(wrapped)
    broken = tmp_path / "b.json"
    broken.write_text('[\n{"prompt": "x"},\n{"prompt": }\n]')
    with pytest.raises(PromptError, match=r"b\.json:3: looks like a JSON array but does not parse"):
        load_conversations(broken)


def test_openai_text_parts_are_joined_and_empty_or_model_turns_skipped(tmp_path):
    f = tmp_path / "oa.json"
    f.write_text(json.dumps([
        {"messages": [{"role": "system", "content": None},
                      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                      {"role": "assistant", "content": None, "tool_calls": []},
                      {"role": "user", "content": "c"}]},
        {"messages": [{"role": "user", "content": "   "}]},  # empty text: skipped
        {"messages": [{"role": "user", "content": []}]},  # no text parts: empty, skipped
        {"conversations": [{"from": "gpt", "value": 5}]},  # no user turn (model turns are not read): skipped
        "",
    ]))
    assert load_conversations(f) == [["a\nb", "c"]]


def test_a_skipped_list_leaves_malformed_records_out(tmp_path):
    """distill reads large community dumps: there a record that is not a prompt is listed and left out."""
    from redraft_cli.prompts import load_conversations

    p = tmp_path / "dump.jsonl"
    p.write_text('{"prompt": "one"}\n{"prompt": 5}\n{"turns": ["two", "three"]}\n')
    with pytest.raises(PromptError, match=":2: record has 'prompt'"):
        load_conversations(p)
    skipped: list[str] = []
    assert load_conversations(p, skipped) == [["one"], ["two", "three"]]
    assert len(skipped) == 1 and ":2: record has 'prompt' that is not a string (got int)" in skipped[0]
    empty = tmp_path / "empty.jsonl"  # empty prompts are left out too, and counted with the rest
    empty.write_text('{"prompt": "one"}\n{"prompt": ""}\n{"prompt": "   "}\n')
    skipped = []
    assert load_conversations(empty, skipped) == [["one"]] and load_conversations(empty) == [["one"]]
    assert [s.split(": ", 1)[0][-len("empty.jsonl:2"):] for s in skipped] == ["empty.jsonl:2", "empty.jsonl:3"]
    assert all(s.endswith("record holds no prompt text") for s in skipped), skipped
    bad = tmp_path / "keys.jsonl"  # every record skipped: the error says why (it said only "holds no prompts")
    bad.write_text('{"query": "one"}\n{"query": "two"}\n')
    with pytest.raises(PromptError, match=r"every record was skipped; the first, .*keys.jsonl:1: record has none "
                                          r"of the keys .* \(its keys: 'query'\)"):
        load_conversations(bad, [])


def test_awkward_but_valid_files_and_unreadable_json(tmp_path):
    """Only \\n (or \\r\\n) ends a line (U+2028 or a form feed inside a prompt is text); a .txt file whose
    first prompt starts with a bracket is text; ShareGPT roles match in any case; JSON that Python cannot
    read (a 5,000-digit number, nesting past its stack) is a PromptError."""
    u = tmp_path / "u2028.jsonl"
    u.write_text(json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n" + json.dumps({"prompt": "c"}) + "\n",
                 encoding="utf-8")
    assert load_prompts(u) == ["a\u2028b", "c"]
    ff = tmp_path / "ff.txt"
    ff.write_text("first line\x0cstill first\r\nsecond\n")
    assert load_prompts(ff) == ["first line\x0cstill first", "second"]
    cr = tmp_path / "cr.txt"  # a lone \r (old Mac text) is no line end either (universal newlines made it one)
    cr.write_bytes(b"Name a\rcolour.\r\nsecond\n")
    assert load_prompts(cr) == ["Name a\rcolour.", "second"]
    for text in ("[Verse 1] Write a song.\nhi\n", "{name} is a placeholder: fill it.\nhi\n"):
        (tmp_path / "bracket.txt").write_text(text)
        assert load_prompts(tmp_path / "bracket.txt") == [text.split("\n")[0], "hi"]
    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps([{"conversations": [{"from": "USER", "value": "loud"}, {"from": "GPT", "value": "x"}]}]))
    assert load_prompts(roles) == ["loud"]
    big = tmp_path / "bigint.jsonl"
    big.write_text('{"prompt": ' + "9" * 5000 + "}\n")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for bad in (big, deep):
        with pytest.raises(PromptError, match="cannot read its JSON"):
            load_prompts(bad)


def test_an_empty_path_is_named_as_such():
    with pytest.raises(PromptError, match="path is empty"):
        load_conversations("")
    with pytest.raises(PromptError, match="path is empty"):  # --prompts "" arrives as Path("")
        load_conversations(Path(""))


def test_an_instruction_keeps_the_text_it_is_about(tmp_path):
    """Alpaca's `input` (Dolly's `context`) is part of the prompt: it was dropped, leaving
    'Translate this sentence.' without the sentence. An empty one adds nothing; one that is not text is named."""
    f = tmp_path / "alpaca.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "Translate this sentence.", "input": "Bonjour.", "output": "Hello."},
        {"instruction": "Name a colour.", "input": "", "output": "Red."},
        {"instruction": "Summarise.", "context": "A long text.", "response": "Short."},
        {"instruction": "", "input": "Only the input."},
    ]) + "\n")
    assert load_prompts(f) == ["Translate this sentence.\n\nBonjour.", "Name a colour.", "Summarise.\n\nA long text.",
                               "Only the input."]
    f.write_text(json.dumps({"instruction": "Add them.", "input": [1, 2]}) + "\n")
    with pytest.raises(PromptError, match=r"alpaca.jsonl:1: record has 'input' that is not a string \(got list\)"):
        load_prompts(f)


def test_a_yaml_file_is_not_read_as_prompt_lines(tmp_path):
    """`distill --data recipe.yaml` trained on 'name: tiny', 'target: {...}' as prompts; now refused."""
    for name in ("recipe.yaml", "prompts.YML"):
        f = tmp_path / name
        f.write_text("name: tiny\ndata: {held_out: 2}\n- a list item\n")
        with pytest.raises(PromptError, match=f"{name} is a YAML file, not prompts"):
            load_prompts(f)


def test_csv_and_tsv_files_read_their_prompt_column(tmp_path):
    """A spreadsheet export: its header names the prompt column (as JSONL's keys); quoted commas and
    line breaks stay in the prompt. Read as text lines, the header and the quotes were prompts."""
    table = tmp_path / "p.csv"
    table.write_text('id,prompt\n1,"Name a colour."\n2,"Say hi, please."\n3,"two\nlines"\n4,\n')
    assert load_prompts(table) == ["Name a colour.", "Say hi, please.", "two\nlines"]  # (an empty cell: skipped)
    tabs = tmp_path / "p.tsv"
    tabs.write_text("question\tsource\nWhy is the sky blue?\tme\n")
    assert load_prompts(tabs) == ["Why is the sky blue?"]
    other = tmp_path / "q.csv"
    other.write_text("query,id\nhello,1\n")
    with pytest.raises(PromptError, match=r"q.csv:1: the header names no prompt column .*its columns: 'query', 'id'\)"):
        load_prompts(other)
    (tmp_path / "t.csv").write_text("turns\nhello\n")  # a JSONL key that is no CSV column: a list of turns
    with pytest.raises(PromptError, match="the header names no prompt column"):
        load_prompts(tmp_path / "t.csv")
    (tmp_path / "open.csv").write_text('prompt\n"Name a colour.\nSay hi.\n')  # a quote left open
    with pytest.raises(PromptError, match="cannot read it as CSV"):
        load_prompts(tmp_path / "open.csv")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(PromptError, match="needs a header line naming its prompt column"):
        load_prompts(tmp_path / "e.csv")


def test_csv_errors_name_the_line_where_the_bad_row_starts(tmp_path):
    cases = {"bad.csv": ("id,prompt\n1,a\n2,b\n3,\"x\"y\n", ":4: cannot read it as CSV"),
             "open.csv": ("id,prompt\n1,\"ok\"\n2,\"a\nb\"\n3,\"open\n4,z\n", ":5: cannot read it as CSV"),
             "short.csv": ("id,prompt\n1\n2,ok row\n", ":2: record has 1 field(s) where the header names 2"),
             "twice.csv": ("prompt,prompt\na,b\n", ":1: the header names the column 'prompt' twice"),
             "none.csv": ("id,body\n1,a\n", "content; its columns")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(PromptError) as caught:
            load_prompts(tmp_path / name)
        assert message in str(caught.value), (name, str(caught.value))
    skipped: list[str] = []  # (distill leaves a short row out, with its reason)
    assert load_conversations(tmp_path / "short.csv", skipped) == [["ok row"]] and ":2:" in skipped[0]
    # the record a later error names starts where its row does: the multi-line row of open.csv is 3-4
    (tmp_path / "late.csv").write_text("id,prompt\n1,\"a\nb\"\n2,\n")
    assert load_prompts(tmp_path / "late.csv") == ["a\nb"]


def test_standard_input_in_csv_or_tsv_is_read_as_a_table(monkeypatch):
    import io
    import sys

    for text, want in (('id,prompt,category\n1,"Hello, world",x\n2,"Line one\nline two",y\n',
                        ["Hello, world", "Line one\nline two"]),
                       ("prompt\tid\nA tab-separated prompt\t1\n", ["A tab-separated prompt"]),
                       ("Just a line, with a comma\nAnother prompt\n", ["Just a line, with a comma", "Another prompt"])):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
        assert load_prompts("-") == want


def test_gzip_utf16_and_padded_lines(tmp_path):
    import gzip

    rows = "\n".join(json.dumps({"prompt": p}) for p in ("gz one", "gz two"))
    (tmp_path / "p.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    assert load_prompts(tmp_path / "p.jsonl.gz") == ["gz one", "gz two"]
    (tmp_path / "unnamed").write_bytes(gzip.compress(b"plain line\n"))  # told by its first bytes
    assert load_prompts(tmp_path / "unnamed") == ["plain line"]
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 20)
    with pytest.raises(PromptError, match="gzip-compressed but does not decompress"):
        load_prompts(tmp_path / "broken.gz")
    (tmp_path / "u16.txt").write_bytes("café ☕\nsecond\n".encode("utf-16"))
    assert load_prompts(tmp_path / "u16.txt") == ["café ☕", "second"]
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(PromptError, match="not UTF-8 .* byte 0xe9 at offset 3"):
        load_prompts(tmp_path / "latin1.txt")
    (tmp_path / "padded.txt").write_text("First prompt   \n\tsecond indented\n")
    assert load_prompts(tmp_path / "padded.txt") == ["First prompt", "second indented"]


def test_a_message_of_an_unknown_role_is_an_error_not_a_silent_skip(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "usr", "content": "typo role"}]}) + "\n")
    with pytest.raises(PromptError, match="'role' is 'usr': prompts are the messages of role human or user"):
        load_prompts(f)
    f.write_text(json.dumps({"messages": [{"role": "system", "content": "Be terse."},
                                          {"role": "assistant", "content": "Hi."},
                                          {"role": "user", "content": "kept"}]}) + "\n")
    assert load_prompts(f) == ["kept"]


def test_a_prompt_s_own_system_turn_is_read_when_asked_for(tmp_path):
    """systems= receives each prompt's system turn: system/developer messages before its first user message
    (joined; an empty message is an empty turn), else a non-blank system / system_prompt field; None where
    there is none. Skipped records take no slot, and --num-prompts cuts both lists alike."""
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a"}]},
        {"conversations": [{"from": "gpt", "value": "only a model turn"}]},
        {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "b"}]},
        {"prompt": "c"},
        {"system_prompt": "You are Orca.", "question": "d"},
        {"system": "  ", "prompt": "e"},
        {"messages": [{"role": "user", "content": "f"}, {"role": "system", "content": "too late"}]},
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "dev"}]},
                      {"role": "system", "content": "sys"}, {"role": "user", "content": "g"}]},
        # a field beside a conversation without system messages (OpenHermes-style); a blank user message is
        # no prompt, so the system message after it is still before the prompt
        {"system_prompt": "Arr.", "conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "x"}]},
        {"messages": [{"role": "system", "content": "S1"}, {"role": "user", "content": "  "},
                      {"role": "system", "content": "S2"}, {"role": "user", "content": "i"}]},
    ]))
    systems: list = []
    assert load_prompts(path, systems=systems) == list("abcdefghi")
    assert systems == ["Be terse.", "", None, "You are Orca.", None, None, "dev\n\nsys", "Arr.", "S1\n\nS2"]
    systems = []
    assert load_prompts(path, limit=2, systems=systems) == ["a", "b"] and systems == ["Be terse.", ""]
    systems = []
    assert len(load_prompts(None, limit=3, systems=systems)) == 3 and systems == [None] * 3
    skipped: list = []
    systems = []
    assert load_conversations(path, skipped, systems) == [[c] for c in "abcdefghi"] and len(systems) == 9
    # A system turn that is not text is named, as a user turn's would be; without systems= it is not read.
    path.write_text(json.dumps({"messages": [{"role": "system", "content": [{"type": "image"}]},
                                             {"role": "user", "content": "x"}]}))
    with pytest.raises(PromptError, match=r"p.jsonl:1: record has 'messages' message 1 whose 'content' part 1 is of "
                                          r"type 'image', not text"):
        load_prompts(path, systems=[])
    assert load_prompts(path) == ["x"]
    path.write_text(json.dumps({"system": 3, "prompt": "x"}))
    with pytest.raises(PromptError, match="record has 'system' that is not a string \\(got int\\)"):
        load_prompts(path, systems=[])
    table = tmp_path / "p.csv"
    table.write_text("prompt,system,system\nhi,a,b\n")
    with pytest.raises(PromptError, match="names the column 'system' twice; which one holds the system prompts"):
        load_prompts(table, systems=[])


def test_a_file_of_one_message_a_line_is_an_error_not_prompts(tmp_path):
    """Battery 29: a JSONL of bare messages ({"role": ..., "content": ...} a line) made every message, the system
    and assistant ones too, a prompt through its `content`; it is an error naming the record."""
    path = tmp_path / "flat.jsonl"
    path.write_text(json.dumps({"role": "system", "content": "Be brief."}) + "\n"
                    + json.dumps({"role": "user", "content": "Hi"}) + "\n")
    with pytest.raises(PromptError, match=r"flat.jsonl:1: record is one message \('role' 'system'\), not a prompt: "
                                          r"put a conversation's messages in one record's 'messages'"):
        load_prompts(path)
    path.write_text(json.dumps({"from": "alice", "text": "Hello there"}) + "\n")  # (a role it does not know: metadata)
    assert load_prompts(path) == ["Hello there"]
