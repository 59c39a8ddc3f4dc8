"""`redraft chat`: the session core, one-shot mode through pipes, and an interactive terminal via pexpect."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_chat_llama
from redraft_cli.chat import ChatSession
from redraft_cli.decode import DecodeConfig, Generator
from redraft_cli.drafter import Drafter
from redraft_cli.errors import BadInputError, ContextOverflowError

REDRAFT = str(Path(sys.executable).with_name("redraft"))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    # A long context, so that an answer in the terminal test runs until Ctrl-C stops it.
    return tiny_chat_llama(seed=6, max_positions=1 << 20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, target):
    d = tmp_path_factory.mktemp("chat") / "tiny-model"
    target.model.save_pretrained(d)
    target.tokenizer.save_pretrained(d)
    return d


def typed(lines: list[str]):
    """An `input()` that returns `lines` one by one, then raises EOFError (Ctrl-D)."""
    it = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return fake_input


def session(target, **kw) -> ChatSession:
    gen = Generator(target, Drafter.for_target(target, seed=0))
    return ChatSession(gen, DecodeConfig(max_new_tokens=12, beam_width=2, beam_length=3), **kw)


def test_multi_turn_history_and_stats(target):
    s = session(target)
    first = "".join(c.drafted + c.text for c in s.ask("Hello there"))
    assert s.messages[-1] == {"role": "assistant", "content": first}
    first_prompt = s.last.prompt_tokens
    list(s.ask("And then?"))
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    # The second turn goes on from the first one's KV cache: its prompt and most of its answer are not run again.
    assert first_prompt < s.last.reused_tokens < s.last.prompt_tokens
    assert s.totals.reused_tokens == s.last.reused_tokens and s.totals.summary()["prompt_tokens"] > 2 * first_prompt
    assert s.totals.answers == 2 and s.totals.tokens == 24
    plain = session(target, draft=False)
    assert "".join(c.drafted + c.text for c in plain.ask("Hello there")) == first  # greedy: identical text
    s.reset()
    assert s.messages == []


def test_streamed_text_equals_the_decoded_answer_across_lines_and_split_characters(target):
    """Chunks decode only the current line again; joined they must be the whole answer's text,
    with characters whose bytes span several tokens (and steps) and lines that end mid-step."""
    from redraft_cli.decode import StepStats

    tok = target.tokenizer
    text = "Hi there!\nA caf\u00e9 \u2615 costs 3\u20ac.\n\n  def f(x):\n      return x  # \U0001F600 ok\nEnd"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    s = session(target)
    # Steps of 1 to 4 tokens, the first of them "accepted drafts".
    sizes = [1, 3, 2, 4, 1, 2, 3] * len(ids)
    steps, i = [], 0
    for n in sizes:
        if i >= len(ids):
            break
        steps.append(StepStats(tokens=ids[i : i + n], accepted=max(0, min(n, len(ids) - i) - 1)))
        i += n
    s.gen.redraft = lambda prompt, cfg, reuse_cache: iter(steps)
    chunks = list(s.ask("Say it"))
    assert "".join(c.drafted + c.text for c in chunks) == text
    assert s.messages[-1]["content"] == text
    # A step that ends a line and begins a character of several tokens ("\n\n" then the first bytes of
    # an emoji): the line's end was taken as shown for good, and the character came out as two U+FFFD.
    text = "Here:\n\n\U0001F449\U0001F3FC point\n\u00e9t\u00e9\n"
    ids = tok.encode(text, add_special_tokens=False)
    for cut in range(1, len(ids)):
        for first in (1, cut):
            steps = [StepStats(tokens=ids[a:b], accepted=0) for a, b in ((0, first), (first, cut), (cut, len(ids))) if b > a]
            s = session(target)
            s.gen.redraft = lambda prompt, cfg, reuse_cache: iter(steps)
            assert "".join(c.drafted + c.text for c in s.ask("Say it")) == text, (cut, first)


def test_set_validates(target):
    s = session(target)
    assert s.set("beam-width", "3") == "beam-width = 3" and s.cfg.beam_width == 3
    s.set("temperature", "0.7")
    assert s.cfg.sampling.temperature == 0.7
    s.set("draft", "off")
    assert not s.draft
    assert s.set("epsilon", "0.2") == "epsilon = 0.2" and s.cfg.typical_epsilon == 0.2
    s.set("delta", "0.5")
    assert s.cfg.typical_delta == 0.5
    for name, value in (("beam-width", "0"), ("beam-width", "x"), ("colour", "1"), ("accept", "maybe"), ("draft", "2"),
                        ("epsilon", "0"), ("epsilon", "1.5"), ("delta", "-1"), ("delta", "inf")):
        with pytest.raises(BadInputError):
            s.set(name, value)
    # A node budget that a narrower search cannot fill is dropped, and said so; one that fits is kept.
    s.set("beam-width", "4"), s.set("beam-length", "4"), s.set("nodes", "7")
    assert s.set("beam-width", "3") == "beam-width = 3" and s.cfg.tree_nodes == 7  # 3 x 3 = 9 drafted tokens
    said = s.set("beam-width", "2")
    assert s.cfg.tree_nodes == 0 and "nodes 7 no longer fits a 2x4 search: nodes = 0" in said, said
    # At temperature 0 a sampling setting changes nothing yet, and the answer says so (as the flags' note).
    s.set("temperature", "0")
    assert s.set("accept", "rejection").endswith("decoding is greedy: it applies once temperature is above 0")
    assert s.set("top-k", "5").endswith("once temperature is above 0") and s.set("beam-width", "3") == "beam-width = 3"
    s.set("temperature", "0.7")
    assert s.set("top-p", "0.9") == "top-p = 0.9"


def test_a_turn_the_template_cannot_render_leaves_the_history_as_it_was(target):
    """A template that fails on the second turn: that turn is an error, the first turn stays, and
    the session goes on once the template renders again."""
    s = session(target)
    own = target.tokenizer.chat_template
    target.tokenizer.chat_template = ("{% for m in messages %}{% if 'boom' in m['content'] %}{{ 1/0 }}{% endif %}"
                                      "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    try:
        list(s.ask("Hello there"))
        before = list(s.messages)
        with pytest.raises(BadInputError, match="ZeroDivisionError"):
            list(s.ask("boom"))
        assert s.messages == before
        list(s.ask("And then?"))
        assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    finally:
        target.tokenizer.chat_template = own


def test_history_trimmed_to_context(target):
    s = session(target)
    limit = target.max_context
    target.max_context = 200  # trimming is decided against the Target's limit
    try:
        for i in range(12):
            list(s.ask(f"Tell me something about number {i}, please, in detail."))
        assert s.trimmed >= 1 or len(s.messages) < 24
        assert len(target.encode_chat(s.messages)) <= 200
        kept = list(s.messages)
        with pytest.raises(ContextOverflowError):
            list(s.ask("word " * 400))
        assert s.messages == kept  # the turn that cannot fit leaves the history whole (nothing trimmed for it)
    finally:
        target.max_context = limit


def run_cli(args, stdin: str = ""):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([REDRAFT, *args], input=stdin, capture_output=True, text=True, timeout=240, env=env)


def test_one_shot_from_stdin_and_json(model_dir):
    r = run_cli(["chat", "--model", str(model_dir), "--drafter", "random", "--max-new-tokens", "8"], "Name three colours.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tokens/step" in r.stderr
    j = run_cli(["chat", "--model", str(model_dir), "--drafter", "random", "--max-new-tokens", "8", "--json",
                 "--prompt", "Hi"])
    assert j.returncode == 0, j.stderr
    data = json.loads(j.stdout)
    assert data["tokens"] == 8 and data["prompt"] == "Hi" and "tokens_per_step" in data
    assert data["interrupted"] is False
    # The settings it ran with: the random drafter's defaults, no copied beams.
    assert (data["beam_width"], data["beam_length"], data["lookup_beams"], data["datastore_beams"]) == (4, 5, 0, 0)
    assert "typical_epsilon" not in data  # (greedy: only a typical run names its epsilon and delta)
    typical = run_cli(["chat", "--model", str(model_dir), "--drafter", "random", "--max-new-tokens", "2", "--json",
                       "--prompt", "Hi", "--accept", "typical", "--temperature", "0.7", "--epsilon", "0.2"])
    assert typical.returncode == 0, typical.stderr
    assert (json.loads(typical.stdout)["typical_epsilon"], json.loads(typical.stdout)["typical_delta"]) == (0.2, 0.3)
    bad = run_cli(["chat", "--model", str(model_dir), "--drafter", "random", "--beam-width", "0", "--prompt", "x"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    # --no-draft once: no drafter runs, so none is named, and none is looked for (battery 24).
    plain = run_cli(["chat", "--model", str(model_dir), "--no-draft", "--max-new-tokens", "2", "--json", "-p", "Hi"])
    assert plain.returncode == 0 and json.loads(plain.stdout)["drafter"] is None, plain.stderr
    assert "no trained drafter ships" not in plain.stderr


def test_an_interrupted_one_shot_answer_is_kept_and_exits_130(model_dir):
    import signal

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([REDRAFT, "chat", "--model", str(model_dir), "--drafter", "random", "--max-new-tokens",
                             "100000", "--prompt", "Write a very long story."], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.read(1)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert first and "[interrupted]" in err and "(stopped)" in err and "Traceback" not in err


def spawn_chat(model_dir, max_new_tokens: int):
    """`redraft chat` at a terminal (pexpect), with a random drafter over the tiny model."""
    pexpect = pytest.importorskip("pexpect")
    return pexpect, pexpect.spawn(
        REDRAFT, ["chat", "--model", str(model_dir), "--drafter", "random", "--max-new-tokens", str(max_new_tokens)],
        env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}, encoding="utf-8", timeout=120,
        # (the terminal echoes ^C where it lands: between a character's bytes when a long answer's
        # write was split, which a strict decoder would take for the program's error)
        codec_errors="replace")


def test_interactive_terminal(model_dir):
    pexpect, child = spawn_chat(model_dir, 6)
    try:
        child.expect(">>> ")
        assert "\x1b[?2004h" in child.before  # bracketed paste on: the terminal marks a paste's start and end
        child.sendline("Hello")
        child.expect(r"tokens/step")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect("session: 1 answer,")
        child.expect(r"0 of them reused")
        child.expect("system prompt: the chat template's default")  # (the one in force, battery 25)
        child.expect(">>> ")
        child.sendline("And?")
        child.expect(r"tokens/step")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"session: 2 answers,.* [1-9]\d* of them reused from the KV cache")
        child.expect(">>> ")
        child.send("\x1b[200~A pasted line.\nAnd its second line.\x1b[201~\r")  # one message, not two
        child.expect(r"tokens/step")
        child.expect(">>> ")
        child.sendline("/stats")
        child.expect(r"session: 3 answers,")
        child.expect(">>> ")
        child.sendline("/set max-new-tokens 0")
        child.expect("max-new-tokens must be")  # the /set name, not the flag --max-new-tokens
        assert "--max-new-tokens" not in child.before + child.after
        child.expect(">>> ")
        child.sendline("/reset now")
        child.expect("/reset takes no arguments")
        child.expect(">>> ")
        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect(">>> ")
        child.sendline("/set max-new-tokens 100000")
        child.expect("max-new-tokens = 100000")
        child.expect(">>> ")
        child.sendline("Write a very long story.")
        child.expect("Write a very long story.")  # the echo
        import time

        time.sleep(3)  # let it stream a while, then Ctrl-C stops the answer, not the program
        child.sendintr()
        child.expect(r"interrupted")
        child.expect(">>> ")
        child.sendline("/set beam-width 0")
        child.expect("error")
        child.expect(">>> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_text_that_was_not_utf8_is_encoded(target):
    """Bytes that were not UTF-8 (a Latin-1 terminal) reach Python as lone surrogates; they encode as U+FFFD."""
    assert target.encode_raw("caf\udce9") == target.encode_raw("caf\ufffd")
    # Raw text stays text: a control token's string is characters, not the token.
    eos = target.tokenizer.eos_token
    assert target.tokenizer.convert_tokens_to_ids(eos) not in target.encode_raw(f"hi {eos} there")
    assert target.encode_chat("caf\udce9 \ud800") == target.encode_chat("caf\ufffd \ufffd")


def test_a_system_prompt_that_fills_the_context_is_refused_when_set():
    from redraft_cli.errors import ContextOverflowError

    small = tiny_chat_llama(seed=6, max_positions=64)
    s = session(small)
    with pytest.raises(ContextOverflowError, match="no room for a message"):
        s.set("system", "word " * 80)
    assert s.system is None
    assert s.set("system", "Be brief.") == "system prompt set" and s.system == "Be brief."


def test_a_turn_the_model_cannot_take_leaves_the_history_as_it_was(target):
    """Token ids outside the model's vocabulary (a tokenizer of another model) fail the turn before it
    starts: the message does not stay in the history, where it failed every later turn too."""
    s = session(target)
    list(s.ask("Hello there"))
    before = list(s.messages)
    vocab = target.vocab_size
    target.vocab_size = 100
    try:
        with pytest.raises(BadInputError, match="outside tiny-chat-llama's vocabulary of 100"):
            list(s.ask("And then?"))
    finally:
        target.vocab_size = vocab
    assert s.messages == before and s.totals.answers == 1
    first_prompt = s.last.prompt_tokens
    list(s.ask("And then?"))
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    # The second turn goes on from the first one's KV cache: its prompt and most of its answer are not run again.
    assert first_prompt < s.last.reused_tokens < s.last.prompt_tokens
    assert s.totals.reused_tokens == s.last.reused_tokens and s.totals.summary()["prompt_tokens"] > 2 * first_prompt


def test_an_answer_cut_short_by_the_context_is_marked(target):
    s = session(target)
    limit = target.max_context
    target.max_context = len(target.encode_chat("Hi")) + 5
    try:
        list(s.ask("Hi"))
        assert s.cut and s.last.tokens == 5  # stopped by the context, not by max_new_tokens (12)
        s.reset()
        s.cfg = DecodeConfig(max_new_tokens=3, beam_width=2, beam_length=3)
        list(s.ask("Hi"))
        assert not s.cut
    finally:
        target.max_context = limit


def test_interactive_errors_and_commands_with_brackets_are_printed_as_text(target, monkeypatch, capsys):
    """Rich markup in what the user typed, echoed by a message, must not end the session (and lose the
    conversation) with a MarkupError."""
    from redraft_cli.cli import chat as chat_cli

    s = session(target)
    fake_input = typed(["/set foo[/] 1", "/[/]x", "/reset [/b]", "/set accept [bold]x", "[/] hello", "/set seed 3"])

    def refuse(text):
        raise BadInputError(f"cannot answer {text!r}")

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(s, "ask", refuse)
    chat_cli._interactive(s, show_drafts=False)
    err = capsys.readouterr().err
    assert "unknown setting 'foo[/]'" in err and "unknown command /[/]x" in err and "/reset takes no arguments" in err
    assert "got '[bold]x'" in err and "cannot answer '[/] hello'" in err and "seed = 3" in err


def test_json_needs_a_one_shot_prompt():
    """At a terminal without --prompt, --json used to be ignored: an interactive chat printed no JSON."""
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(REDRAFT, ["chat", "--json", "--model", "/nonexistent"], env={**os.environ, "TERM": "dumb"},
                          encoding="utf-8", timeout=60)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "--json prints one answer: pass --prompt TEXT or text on stdin" in child.before


def test_stdin_and_options_that_are_not_utf8_are_refused_and_a_bom_is_not_text(model_dir):
    """Bytes that were not UTF-8 are refused with a one-line error, as `bench --prompts -` refuses them
    (before, they reached the model as U+FFFD); a byte-order mark (a file from a Windows editor) is not text."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [REDRAFT, "chat", "--model", str(model_dir), "--drafter", "random", "--max-new-tokens", "2", "--json"]
    r = subprocess.run(base, input="\ufeffcafé".encode(), capture_output=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.decode("utf-8"))["prompt"] == "café"
    r = subprocess.run(base, input=b"caf\xe9 au lait", capture_output=True, timeout=240, env=env)
    assert r.returncode == 2 and r.stdout == b""
    assert b"standard input is not UTF-8 text (byte 0xe9 at offset 3)" in r.stderr and b"Traceback" not in r.stderr
    for option in ("--prompt", "--system"):
        args = [*base, option, os.fsdecode(b"caf\xe9")] + (["--prompt", "hi"] if option == "--system" else [])
        r = subprocess.run(args, capture_output=True, timeout=240, env=env)
        assert r.returncode == 2 and f"{option} is not UTF-8 text (byte 0xe9 at character 3)".encode() in r.stderr


def test_an_interactive_line_that_is_not_utf8_is_not_sent(target, monkeypatch, capsys):
    from redraft_cli.cli import chat as chat_cli

    s = session(target)
    monkeypatch.setattr("builtins.input", typed(["caf\udce9", "/set system \udcff"]))
    chat_cli._interactive(s, show_drafts=False)
    err = capsys.readouterr().err
    assert "not UTF-8 text (byte 0xe9 at character 3); nothing was sent" in err and "byte 0xff" in err
    assert s.messages == [] and s.system is None


def test_acceptance_is_benchs_share_of_the_drafted_beam(target):
    """chat's acceptance rate is bench's: accepted tokens / (steps x (beam length - 1)), so a lookup copy
    longer than the drafted beams (15 tokens accepted at a 2x3 shape) takes it past 100%, as bench
    documents, rather than measuring it against a 16-token copy that is rarely there."""
    from redraft_cli.decode import StepStats

    gen = Generator(target, Drafter.for_target(target, seed=0))
    s = ChatSession(gen, DecodeConfig(max_new_tokens=12, beam_width=2, beam_length=3, lookup_beams=1, lookup_length=16))
    s.gen.redraft = lambda prompt, cfg, reuse_cache: iter([StepStats(tokens=[42], prefill=True),
                                              StepStats(tokens=[43] * 11, accepted=10)])
    list(s.ask("Say it"))
    assert s.last.summary()["acceptance_rate"] == round(10 / 2, 4)


def test_a_closed_stdin_is_no_prompt():
    """`redraft chat <&-`: sys.stdin is None, which was an AttributeError reported as a bug."""
    r = subprocess.run([REDRAFT, "chat", "--model", "/nonexistent"], preexec_fn=lambda: os.close(0),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 2 and "no prompt: pass --prompt TEXT or text on stdin" in r.stderr, r.stderr
    # Battery 18: text on stdin that holds only spaces is named as such ("pass text on stdin" alone misled).
    r = subprocess.run([REDRAFT, "chat", "--model", "/nonexistent"], input=" \n\t\n", capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "no prompt: standard input holds no text" in r.stderr, r.stderr
    # --show-drafts where its colour cannot show (not a terminal, or --json) says so before the model loads.
    for extra, said in (([], "standard output does not show here"), (["--json"], "changes nothing with --json")):
        r = subprocess.run([REDRAFT, "chat", "--model", "/nonexistent", "-p", "Hi", "--show-drafts", *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and said in " ".join(r.stderr.split()), r.stderr


def test_an_interactive_chat_without_a_usable_template_fails_at_the_start(model_dir, tmp_path):
    """It started, then failed every message with the same error; only a restart could help."""
    import shutil

    pexpect = pytest.importorskip("pexpect")
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    (bare / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    child = pexpect.spawn(REDRAFT, ["chat", "--model", str(bare), "--drafter", "random"],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}, encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2 and "has no chat template" in child.before and ">>>" not in child.before
    # Battery 24: what to pass, in the command line's words (chat has no --no-chat-template; no Python hints).
    said = " ".join(child.before.split())
    assert "give it one with --chat-template (a name such as vicuna, a Jinja file or Jinja text)" in said, said
    assert "--no-chat-template" not in said and "encode_raw" not in said
    # A template that refuses a system turn is named as such, with --system (bench and sweep alike).
    (tmp_path / "nosys.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{{ 'assistant: ' }}")
    for command in (["chat", "-p", "Hi"], ["bench", "--num-prompts", "1", "--max-new-tokens", "2"]):
        r = subprocess.run([REDRAFT, *command, "--model", str(bare), "--drafter", "random", "--chat-template",
                            str(tmp_path / "nosys.jinja"), "--system", "Be brief."], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 2 and "the chat template refuses a system turn" in r.stderr, r.stderr
    raw = subprocess.run([REDRAFT, "bench", "--model", str(bare), "--drafter", "random", "--num-prompts", "1"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert raw.returncode == 2 and "or send prompts as raw text with --no-chat-template" in raw.stderr, raw.stderr


def test_an_unexpected_error_mid_answer_keeps_the_interactive_conversation(target, monkeypatch, capsys):
    """Out of memory (or a bug) halfway through an answer ends neither the session nor its history:
    the partial answer is kept, the error is one line, and the next message is answered in context."""
    import torch

    from redraft_cli.cli import chat as chat_cli

    s = session(target)
    fake_input = typed(["first question", "second question"])
    real_redraft = s.gen.redraft
    calls = []

    def failing_once(ids, cfg, reuse_cache):
        calls.append(len(ids))
        for n, step in enumerate(real_redraft(ids, cfg, reuse_cache)):
            if len(calls) == 1 and n == 2:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            yield step

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(s.gen, "redraft", failing_once)
    chat_cli._interactive(s, show_drafts=False)
    err = capsys.readouterr().err
    assert "out of memory" in err and "the conversation so far is kept" in err and "Traceback" not in err
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.messages[1]["content"] and len(calls) == 2 and calls[1] > calls[0]  # the partial answer is context


def test_one_shot_json_records_the_model_drafter_and_system_prompt(model_dir):
    j = run_cli(["chat", "--model", str(model_dir), "--drafter", "random", "--max-new-tokens", "4", "--json",
                 "--system", "Be brief.", "--prompt", "Hi"])
    assert j.returncode == 0, j.stderr
    data = json.loads(j.stdout)
    assert data["model"] == str(model_dir) and data["drafter"].startswith("random") and data["system"] == "Be brief."
    assert data["max_new_tokens"] == 4 and data["device"] == "cpu" and data["dtype"] in ("float32", "bfloat16")


def test_an_empty_system_prompt_replaces_the_templates_default(target):
    """`--system ""` (or blank) and `/set system ""` send an empty system turn: SmolLM2's template otherwise adds
    its own ("You are a helpful AI assistant named SmolLM..."); `/set system` alone brings that default back."""
    decode = target.tokenizer.decode
    blank = session(target, system="   ")
    assert blank.system == ""
    assert "SmolLM" in decode(target.encode_chat("Hi")) and "SmolLM" not in decode(target.encode_chat("Hi", system=""))
    s = session(target, system="Be brief.")
    assert "empty" in s.set("system", '""') and s.system == ""
    list(s.ask("Hi"))
    assert "SmolLM" not in decode(target.encode_chat(s.messages, system=s.system))
    assert "default" in s.set("system", "") and s.system is None


def test_an_empty_prompt_option_is_named_and_no_draft_notes_the_options_it_ignores():
    """`chat -p ""` said "pass --prompt TEXT" to a user who had; --no-draft took beam options silently."""
    empty = subprocess.run([REDRAFT, "chat", "-p", " ", "--model", "/nonexistent"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert empty.returncode == 2 and empty.stderr.strip() == "error: --prompt is empty: give it the text to answer"
    noted = subprocess.run([REDRAFT, "chat", "-p", "hi", "--no-draft", "-w", "8", "--model", "/nonexistent"],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=60)
    assert noted.returncode == 2 and noted.stderr.startswith("note: --no-draft decodes plainly"), noted.stderr


def test_a_message_stopped_in_its_prompt_pass_is_not_kept_and_double_slash_sends_a_slash(target, monkeypatch,
                                                                                          capsys):
    """Ctrl-C while the prompt is read (a long paste on a CPU takes many seconds) takes the message back:
    kept with a one-token answer, every later turn paid for it. `//x` sends the message `/x`."""
    import signal

    from redraft_cli.cli import chat as chat_cli

    s = session(target)
    fake_input = typed(["a very long paste", "//usr/bin/env is what?"])
    real_redraft = s.gen.redraft

    def ctrl_c_in_prefill(ids, cfg, reuse_cache):
        for step in real_redraft(ids, cfg, reuse_cache):
            if step.prefill and "very long" in target.tokenizer.decode(ids):
                os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends; _stream's handler takes it
            yield step

    monkeypatch.setattr("builtins.input", fake_input)
    monkeypatch.setattr(s.gen, "redraft", ctrl_c_in_prefill)
    chat_cli._interactive(s, show_drafts=False)
    err = capsys.readouterr().err
    assert "stopped before the answer began" in err, err
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert s.messages[0]["content"] == "/usr/bin/env is what?" and "unknown command" not in err


def test_a_withdrawn_message_leaves_history_totals_and_cache_as_they_were(target):
    """A message stopped in its prompt pass (Ctrl-C) is taken back whole: the turns trimmed to make room for it
    come back, its statistics leave the totals, and the next turn reuses only the KV held before it."""
    s = session(target)
    limit = target.max_context
    target.max_context = 200
    try:
        for i in range(3):
            list(s.ask(f"Tell me about {i}."))
        before, answers, tokens = list(s.messages), s.totals.answers, s.totals.tokens
        stream = s.ask("word " * 110)  # too long for the whole history: the oldest turns are trimmed for it
        next(stream)  # its prompt pass
        stream.close()
        assert s.trimmed >= 1 and s.last.steps == 0
        reused = s.last.reused_tokens
        s.withdraw()
        assert s.messages == before and (s.totals.answers, s.totals.tokens) == (answers, tokens)
        assert s.gen._held[1].get_seq_length() == reused  # (the cache the withdrawn prompt pass left)
        list(s.ask("Hi"))
        assert s.last.reused_tokens <= reused
    finally:
        target.max_context = limit


def test_set_system_takes_quoted_text(target):
    s = session(target)
    s.set("system", '"Be brief."')
    assert s.system == "Be brief."
    s.set("system", "'  '")
    assert s.system == ""
    s.set("system", 'Say "hi"')
    assert s.system == 'Say "hi"'


def test_ctrl_c_during_a_long_paste_stops_between_its_passes(target, monkeypatch, capsys):
    """A paste of thousands of tokens is read in passes of PREFILL_CHUNK: a Ctrl-C stops it after the pass it
    falls in, not at the end of the whole paste, and the message is taken back."""
    import signal

    from redraft_cli.cli import chat as chat_cli
    from redraft_cli.decode import PREFILL_CHUNK

    s = session(target)
    passes = []
    real_forward = target.forward_tree

    def forward(ids, *args, **kw):
        passes.append(ids.shape[1])
        if len(passes) == 1 and ids.shape[1] == PREFILL_CHUNK:
            os.kill(os.getpid(), signal.SIGINT)  # during the paste's first pass
        return real_forward(ids, *args, **kw)

    monkeypatch.setattr("builtins.input", typed(["word " * (3 * PREFILL_CHUNK)]))
    monkeypatch.setattr(target, "forward_tree", forward)
    chat_cli._interactive(s, show_drafts=False)
    out, err = capsys.readouterr()
    assert "stopped before the answer began" in err and "Traceback" not in err, err
    assert passes == [PREFILL_CHUNK] and s.messages == [] and s.totals.answers == 0
    # One line says so (battery 18: an empty line on standard output and "[interrupted]" came with it).
    assert out == "" and "[interrupted]" not in err, (out, err)


def test_an_answer_stopped_by_ctrl_c_keeps_what_was_shown(target, monkeypatch, capsys):
    """The pass a Ctrl-C falls in is shown before the answer stops: the answer kept in the conversation is the
    text on the screen. A Ctrl-C in the last pass stops nothing: the answer is whole."""
    import signal

    from redraft_cli.cli import chat as chat_cli

    for at, whole in ((3, False), (None, True)):
        s = session(target)
        real_redraft = s.gen.redraft

        def ctrl_c_at(ids, cfg, reuse_cache, at=at):
            steps = list(real_redraft(ids, cfg, reuse_cache))
            for n, step in enumerate(steps):
                if n == (len(steps) - 1 if at is None else at):
                    os.kill(os.getpid(), signal.SIGINT)
                yield step

        monkeypatch.setattr(s.gen, "redraft", ctrl_c_at)
        finished = chat_cli._stream(s, "Hello there", show_drafts=False)
        shown = capsys.readouterr().out
        assert finished == whole and shown.strip() == s.messages[-1]["content"].strip() != ""


def test_a_ctrl_c_just_after_the_first_token_keeps_it(target, monkeypatch, capsys):
    """A Ctrl-C that lands once the prompt pass's token is on the screen, before any decoding step, keeps that
    token as the answer, as any text shown is kept: the one-shot ends with its status line and "(stopped)",
    not "nothing was answered" (seen with a loaded CPU, where the window is wide)."""
    import signal
    import sys

    import typer

    from redraft_cli.cli import chat as chat_cli

    class Flushed:  # the Ctrl-C arrives as the first chunk (the prompt pass's token) is flushed
        def __init__(self, file):
            self.file, self.flushes = file, 0

        def write(self, text):
            return self.file.write(text)

        def flush(self):
            self.flushes += 1
            if self.flushes == 1:
                os.kill(os.getpid(), signal.SIGINT)
            self.file.flush()

    s = session(target)
    monkeypatch.setattr(chat_cli.console, "file", Flushed(sys.stdout))
    with pytest.raises(typer.Exit) as stopped:
        chat_cli._one_shot(s, "Hello there", json_out=False, show_drafts=False, drafter_name=None)
    out, err = capsys.readouterr()
    assert stopped.value.exit_code == 130 and s.last.steps == 0 and s.last.tokens == 1
    assert "[interrupted]" in err and "(stopped)" in err and "nothing was answered" not in err, err
    assert out.strip() == s.messages[-1]["content"].strip() != ""


def test_the_status_line_names_a_long_prompt_pass(target):
    """tokens/s counts the prompt pass: when it took a second or more, the status line says so."""
    from redraft_cli.chat import Totals
    from redraft_cli.cli import chat as chat_cli

    s = session(target)
    s.last = Totals(answers=1, tokens=20, seconds=3.0, steps=8, step_tokens=19, prompt_tokens=2600,
                    reused_tokens=65, prompt_s=2.5)
    assert chat_cli._status(s).endswith("ReDrafter; read 2535 new prompt tokens in 2.5 s]")
    s.last.prompt_s = 0.2
    assert "read" not in chat_cli._status(s)
    assert s.last.summary()["prompt_s"] == 0.2


def test_one_shot_stopped_in_the_prompt_pass_answers_nothing(target, monkeypatch):
    """Ctrl-C while a long --prompt is still being read: exit 130 and a line saying nothing was answered;
    no status line claiming a token "from the prompt pass", no JSON of an answer with 0 prompt tokens."""
    import signal

    import typer

    from redraft_cli.cli import chat as chat_cli

    s = session(target)
    real = target.forward_tree

    def forward(*args, **kwargs):  # the first pass of the prompt gets a Ctrl-C; the next check stops it
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, "forward_tree", forward)
    printed = []
    monkeypatch.setattr(chat_cli.err, "print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    monkeypatch.setattr(chat_cli.console, "print_json", lambda *a, **k: printed.append("JSON"))
    prompt = " ".join(f"w{i}" for i in range(700))  # over 512 tokens: read in passes, Ctrl-C asked between
    with pytest.raises(typer.Exit) as stopped:
        chat_cli._one_shot(s, prompt, json_out=True, show_drafts=False, drafter_name="random")
    assert stopped.value.exit_code == 130
    assert any("stopped before the answer began" in line for line in printed), printed
    assert "JSON" not in printed and not any("prompt pass alone" in line for line in printed), printed


def test_a_prompt_from_standard_input_loses_windows_line_ends():
    import io

    from redraft_cli.cli.chat import _read_stdin

    assert _read_stdin(io.TextIOWrapper(io.BytesIO(b"Line one\r\nLine two\r\n"))) == "Line one\nLine two\n"


def test_a_prompt_from_standard_input_may_be_utf16_with_its_byte_order_mark():
    """Battery 18: chat refused what `bench --prompts -` reads (a file saved as UTF-16 by a Windows tool)."""
    import codecs
    import io

    from redraft_cli.cli.chat import _read_stdin
    from redraft_cli.errors import BadInputError

    for bom, encoding in ((codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be")):
        data = bom + "Grüße,\r\nwörld".encode(encoding)
        assert _read_stdin(io.TextIOWrapper(io.BytesIO(data))) == "Grüße,\nwörld"
    with pytest.raises(BadInputError, match="not UTF-16 text"):
        _read_stdin(io.TextIOWrapper(io.BytesIO(codecs.BOM_UTF16_LE + b"a\x00\x00\xd8")))  # a lone surrogate


def test_a_turn_that_cannot_be_decoded_or_a_second_open_stream_leaves_the_history_in_order(target):
    """Battery 21: a session whose Generator has no drafter (or a shape it cannot run) kept the user turn and an
    empty answer; and a second ask() while the first answer's stream was open answered two user turns in a row,
    then added the first, partial answer after the second."""
    bare = ChatSession(Generator(target), DecodeConfig(max_new_tokens=8))
    with pytest.raises(BadInputError, match="needs a drafter"):
        bare.ask("Hello")
    no_store = ChatSession(Generator(target, Drafter.for_target(target, seed=0)),
                           DecodeConfig(max_new_tokens=8, datastore_beams=1))
    with pytest.raises(BadInputError, match="--datastore needs a drafter saved with a datastore"):
        no_store.ask("Hello")
    assert bare.messages == no_store.messages == [] and bare.totals.answers == no_store.totals.answers == 0
    for bad, kind in ((None, "NoneType"), (123, "int")):
        with pytest.raises(BadInputError, match=f"a message is text, got {kind}"):
            bare.ask(bad)
    with pytest.raises(BadInputError, match="ChatSession needs a Generator and a DecodeConfig"):
        ChatSession(Generator(target), None)
    s = session(target)
    first = s.ask("Tell me a story about a cat.")
    next(first)
    list(s.ask("What is 5 + 5?"))
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    assert s.messages[2]["content"] == "What is 5 + 5?" and s.totals.answers == 2
    assert next(first, None) is None  # (closed: the partial answer is kept where it was)
    s.ask("Never read.")  # a stream never iterated: its turn is taken back when the next one starts
    list(s.ask("And now?"))
    assert [m["content"] for m in s.messages if m["role"] == "user"][-2:] == ["What is 5 + 5?", "And now?"]
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 3


def test_keys_typed_while_an_answer_streams_wait_for_the_next_prompt(model_dir):
    """A line typed during an answer is the next message, and a Ctrl-D typed during that one leaves after it
    (in the terminal's line mode the Ctrl-D was lost, and typed text was echoed into the answer)."""
    pexpect, child = spawn_chat(model_dir, 400)
    try:
        child.expect(">>> ")
        child.sendline("Hello")
        child.expect("Hello")  # the echo of the line typed at the prompt
        child.send("Typed ahead\r")  # while the first answer streams
        child.expect(r"tokens/step")
        assert "Typed ahead" not in child.before  # not echoed into the answer
        child.expect(">>> Typed ahead")  # the next prompt reads it as typed
        child.send("\x04")  # Ctrl-D while the second answer streams
        child.expect(r"tokens/step")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_set_system_on_a_template_that_refuses_system_turns_says_so():
    """Battery 25: `/set system X` on such a template printed the Jinja error ('TemplateError: ...'), not what it
    means; the session keeps its system prompt."""
    from redraft_cli.chat_templates import apply_chat_template

    target = tiny_chat_llama(seed=7)
    apply_chat_template(target, "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                                "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}{{ 'assistant: ' }}")
    s = session(target)
    for value in ("Be brief.", '""'):
        with pytest.raises(BadInputError, match="the chat template refuses a system turn: /set system alone sends none"):
            s.set("system", value)
    assert s.system is None and s.set("system", "").startswith("system prompt cleared")
