"""Prompt files in every supported format, the built-in sets, and bad files."""

from __future__ import annotations

import json

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
