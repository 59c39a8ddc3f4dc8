"""`redraft chat`: interactive or one-shot chat, streamed as ReDrafter steps are accepted."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Annotated, Optional

import torch
import typer
from rich.markup import escape
from rich.text import Text

from ..chat import SYSTEM_ROOM, ChatSession
from ..decode import Generator
from ..errors import BadInputError, RedraftError
from ..target import not_utf8, valid_text
from . import options as o
from ._errors import OUT_OF_MEMORY, bug_line, handle_errors
from .common import counted, resolve_system, check_system, check_system_fits, console, decode_config, err, load_models, beams_label, note_past_training, shown, stdout_open, with_drafter_shape

D = o.DEFAULTS
HELP = """commands:
  /reset               start a new conversation
  /stats               session totals
  /set NAME VALUE      change a setting: beam-width, beam-length, nodes, lookup, lookup-length, datastore,
                       max-new-tokens, accept, temperature, top-p, top-k, seed, epsilon, delta, draft on|off,
                       system TEXT (system alone: the template's default; system "": an empty one)
  /help                this help
  /quit                leave (or Ctrl-D, also typed during an answer); Ctrl-C stops the current answer
  //TEXT               send /TEXT as a message (a line that starts with a slash)"""


@handle_errors
def chat(
    model: o.Model = D["model"],
    drafter: o.DrafterOpt = "auto",
    beam_width: o.BeamWidth = None,
    beam_length: o.BeamLength = None,
    lookup: o.Lookup = None,
    lookup_length: o.LookupLength = None,
    datastore: o.DatastoreBeams = None,
    nodes: o.TreeNodes = None,
    temperature: o.Temperature = D["temperature"],
    top_k: o.TopK = D["top_k"],
    top_p: o.TopP = D["top_p"],
    accept: o.Accept = D["accept"],
    seed: o.Seed = D["seed"],
    epsilon: o.Epsilon = D["epsilon"],
    delta: o.Delta = D["delta"],
    system: o.ChatSystem = None,
    max_new_tokens: o.MaxNewTokens = 512,
    no_draft: Annotated[bool, typer.Option("--no-draft", help="Plain decoding, for comparison.")] = False,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Answer this once and exit. Without it, text piped on stdin is one prompt too (all of it, slash commands included); with it, stdin is not read.")] = None,
    show_drafts: Annotated[bool, typer.Option("--show-drafts", help="Highlight tokens that came from accepted drafts.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="One-shot mode: print the answer and its statistics as JSON.")] = False,
    dtype: o.Dtype = D["dtype"],
    device: o.Device = D["device"],
    quantize: o.Quantize = D["quantize"],
    device_map: o.DeviceMap = None,
    chat_template: o.ChatTemplate = None,
) -> None:
    """Talk to a model with ReDrafter decoding (multi-turn, streamed)."""
    cfg = decode_config(max_new_tokens, beam_width, beam_length, accept, temperature, top_k, top_p, seed, epsilon, delta, lookup=lookup, lookup_length=lookup_length, datastore=datastore, nodes=nodes)
    if not stdout_open():
        raise BadInputError("standard output is closed (>&-): the answer would go nowhere")
    if not utf8_output():  # (PYTHONIOENCODING=ascii, a latin-1 terminal): what it cannot show becomes '?'
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="replace")
    stdin = sys.stdin  # None when the shell closed it (<&-): no text to read
    one_shot = prompt is not None or stdin is None or not stdin.isatty()
    if json_out and not one_shot:
        raise BadInputError("--json prints one answer: pass --prompt TEXT or text on stdin (an interactive chat "
                            "prints no JSON)")
    if prompt is not None and not prompt.strip():
        raise BadInputError("--prompt is empty: give it the text to answer")
    if prompt is not None and (bad := not_utf8(prompt)):
        raise BadInputError(f"--prompt is not UTF-8 text ({bad}); give it in UTF-8")
    check_system(system, no_chat_template=False)
    piped = prompt is None and one_shot and stdin is not None
    if piped:
        prompt = _read_stdin(stdin).removeprefix("\ufeff").strip()  # (a BOM is not text)
    if one_shot and not (prompt or "").strip():
        raise BadInputError("no prompt: " + ("standard input holds no text (only spaces, or nothing); " if piped else "")
                            + "pass --prompt TEXT or text on stdin")
    if no_draft and (show_drafts or any(v is not None for v in (beam_width, beam_length, lookup, lookup_length,
                                                                  datastore, nodes))):
        err.print("note: --no-draft decodes plainly, so the drafting options (beam shape, lookup, datastore, nodes, "
                  "--show-drafts) change nothing")
    elif show_drafts and one_shot and (json_out or not console.is_terminal):
        err.print("note: --show-drafts changes nothing with --json" if json_out else
                  "note: --show-drafts marks drafted tokens in colour, which standard output does not show here (not "
                  "a terminal; FORCE_COLOR=1 shows it)")
    drafting_never = no_draft and one_shot  # (interactive, /set draft on may use the drafter later)
    # The drafter loads even so: its chat template and system prompt make the prompt the draft run sends.
    loaded = load_models(model, drafter, dtype, device, quantize, seed, device_map, chat_template,
                         note_untrained=not drafting_never)
    dr = loaded.drafter
    cfg = with_drafter_shape(cfg, dr, beam_width, beam_length, lookup, lookup_length, datastore, nodes)
    if beam_length is not None and not no_draft:
        note_past_training(dr, loaded.drafter_name, [beam_length])
    # (no chat template, or one that fails, or a system prompt that fills the context: now, not at every message)
    sent = resolve_system(loaded, system, raw_option=False)
    check_system_fits(loaded.target, sent, room=SYSTEM_ROOM)
    system = sent.text
    session = ChatSession(Generator(loaded.target, dr), cfg, system=system, draft=not no_draft)
    if one_shot:
        _one_shot(session, prompt or "", json_out, show_drafts, None if drafting_never else loaded.drafter_name,
                  loaded.chat_template)
        return
    err.print(f"[bold]redraft chat[/] - {escape(loaded.target.describe())}, drafter {escape(loaded.drafter_name)}, "
              f"beams {beams_label(vars(cfg))}, {cfg.rule}. /help for commands, Ctrl-D to leave.")
    _interactive(session, show_drafts)


def utf8_output() -> bool:
    """Whether standard output encodes any text (UTF-8); the JSON is then ASCII with \\u escapes."""
    encoding = (getattr(sys.stdout, "encoding", None) or "utf-8").lower().replace("_", "-")
    return encoding in ("utf-8", "utf8", "utf-8-sig")


def _read_stdin(stdin) -> str:
    """All of standard input as text: UTF-8, or UTF-16 after its byte-order mark, as `bench --prompts -`
    reads them; other bytes are refused (the answer to text the model never saw would be worthless)."""
    buffer = getattr(stdin, "buffer", None)
    if buffer is None:  # (a text stream without bytes under it: a test's StringIO)
        text = stdin.read()
    else:
        data = buffer.read()
        utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))  # (as prompt files: Windows tools write it)
        try:
            text = data.decode("utf-16" if utf16 else "utf-8")
        except UnicodeDecodeError as exc:
            raise BadInputError(f"standard input is not {'UTF-16' if utf16 else 'UTF-8'} text (byte "
                                f"0x{exc.object[exc.start]:02x} at offset {exc.start}); give the prompt in UTF-8") from exc
    if bad := not_utf8(text):
        raise BadInputError(f"standard input is not UTF-8 text ({bad}); give the prompt in UTF-8")
    return text.replace("\r\n", "\n")  # (a file saved on Windows: its line ends are not the prompt's text)


def _stream(session: ChatSession, text: str, show_drafts: bool, quiet: bool = False) -> bool | None:
    """Print an answer as it streams; returns True when it finished, False when Ctrl-C stopped it after
    some of it was shown (that part is kept), None when Ctrl-C stopped it before anything was shown.

    Ctrl-C sets a flag that is checked after every target pass (and between
    the passes of a long prompt: `Generator.interrupt`), rather than raising
    wherever the interpreter happens to be: a KeyboardInterrupt raised inside a
    finaliser (tensors are freed all the time while decoding) is swallowed by
    Python, and the answer would then run on.
    """
    stop: list[int] = []
    main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    answer = session.ask(text)  # (a bad message or setting raises here; the answer streams below)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.append(signum)) if main else None
    session.gen.interrupt = lambda: bool(stop)
    noted = shown = False
    try:
        for chunk in answer:
            if stop and chunk.step.prefill:  # stopped in the prompt pass: the message is taken back, nothing shown
                raise KeyboardInterrupt
            if session.trimmed and not noted:  # before the answer, not on its line
                noted = True
                err.print(f"[yellow]note:[/] dropped the {session.trimmed} oldest turn(s) to fit the context window")
            if not quiet:
                if show_drafts and chunk.drafted:
                    console.print(Text(chunk.drafted, style="bold cyan"), end="", soft_wrap=True)
                elif chunk.drafted:
                    console.print(Text(chunk.drafted), end="", soft_wrap=True)
                console.print(Text(chunk.text), end="", soft_wrap=True)
                console.file.flush()
            shown = True
            if stop and not chunk.step.finished:  # after showing the pass: the answer kept is the answer shown
                raise KeyboardInterrupt
        return True  # (a Ctrl-C in or after the last pass stops nothing: the answer is whole)
    except KeyboardInterrupt:
        answer.close()  # the partial answer joins the history
        if shown:  # (stopped in the prompt pass: nothing was shown, and the caller's one line says so)
            if not quiet:  # (--json: the JSON alone goes to stdout)
                console.print()
            err.print("[interrupted]", style="yellow", markup=False)
        return False if shown else None
    finally:
        session.gen.interrupt = None
        if main:
            signal.signal(signal.SIGINT, previous)


def _status(session: ChatSession) -> str:
    s = session.last.summary()
    mode = "ReDrafter" if session.draft else "plain"
    # A long prompt pass (a paste; the first turn of a long --system) is named: it is in tokens/s too.
    read = (f"; read {counted(s['prompt_tokens'] - s['reused_tokens'], 'new prompt token')} in {s['prompt_s']:.1f} s"
            if s["prompt_s"] >= 1.0 else "")
    if not s["steps"]:  # one token, from the prompt pass: no decoding step to measure
        return f"[{counted(s['tokens'], 'token')}, {s['tokens_per_s']:.1f} tokens/s, from the prompt pass alone, {mode}{read}]"
    return (f"[{counted(s['tokens'], 'token')}, {s['tokens_per_s']:.1f} tokens/s, {s['tokens_per_step']:.2f} tokens/step, "
            f"acceptance {shown(s['acceptance_rate'], '.0%')}, {mode}{read}]")


def _one_shot(session: ChatSession, prompt: str, json_out: bool, show_drafts: bool, drafter_name: str | None,
              chat_template: str | None = None) -> None:
    """Answer once; a Ctrl-C keeps the partial answer (printed, and marked in the JSON) and exits 130."""
    finished = _stream(session, prompt, show_drafts, quiet=json_out)
    if finished is None:  # stopped in the prompt pass: no answer, no statistics of one
        err.print("(stopped before the answer began: nothing was answered)", style="dim", markup=False)
        raise typer.Exit(130)
    if json_out:
        c = session.cfg
        settings = {"accept": c.rule, "temperature": c.sampling.temperature, "top_k": c.sampling.top_k,
                    "top_p": c.sampling.top_p, "seed": c.sampling.seed,
                    **({"typical_epsilon": c.typical_epsilon, "typical_delta": c.typical_delta}
                       if c.rule == "typical" else {}),  # (as bench: only where that rule ran)
                    "beam_width": c.beam_width,
                    "beam_length": c.beam_length, "lookup_beams": c.lookup_beams,
                    "lookup_length": c.lookup_length or c.beam_length, "datastore_beams": c.datastore_beams, "tree_nodes": c.tree_nodes}
        target = session.gen.target
        settings = {"model": target.name, "drafter": drafter_name, "device": str(target.device),
                    "dtype": str(target.compute_dtype).removeprefix("torch."), "system": session.system,
                    "chat_template": chat_template,
                    "max_new_tokens": c.max_new_tokens, **settings}
        console.print_json(json.dumps({"prompt": valid_text(prompt), "response": session.messages[-1]["content"],
                                       "draft": session.draft, "interrupted": not finished,
                                       "cut_by_context": session.cut, **settings,
                                       **session.last.summary()}), ensure_ascii=not utf8_output())
    else:
        if finished:  # (an interrupted answer's line was ended with its "[interrupted]")
            console.print()
        err.print(_status(session) + ("" if finished else " (stopped)"), style="dim")
    _note_cut(session)
    if not finished:
        raise typer.Exit(130)


def _note_cut(session: ChatSession) -> None:
    """Say so when the last answer stopped only because the context was full."""
    if session.cut:
        err.print(f"[yellow]note:[/] the answer stopped where the model's {session.gen.target.max_context}-token "
                  f"context ends")


@contextlib.contextmanager
def _typed_ahead_kept():
    """While an answer streams at a terminal, keys typed ahead wait, unechoed, for the next prompt.

    In the terminal's line mode a Ctrl-D typed during the answer was taken as an end of input by no
    reader and lost, and typed text was echoed into the answer. Here the terminal delivers keys as bytes
    (no ICANON) without echo until the answer ends, so the next prompt's line editor reads them as typed:
    a Ctrl-D then leaves, and a line typed ahead is the next message. Ctrl-C still interrupts (ISIG stays)."""
    try:
        import termios
    except ImportError:  # (Windows)
        yield
        return
    try:
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError, AttributeError):  # (not a terminal, a closed or replaced stdin)
        yield
        return
    quiet = termios.tcgetattr(fd)
    quiet[3] &= ~(termios.ICANON | termios.ECHO)
    quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
    try:
        termios.tcsetattr(fd, termios.TCSANOW, quiet)  # (TCSANOW: keys already typed stay unread)
    except termios.error:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSANOW, saved)


def _interactive(session: ChatSession, show_drafts: bool) -> None:
    try:  # line editing and history; without it a terminal cuts a typed line at 4,095 bytes
        import readline

        if "libedit" not in (readline.__doc__ or ""):
            # A paste of several lines is one message (the terminal marks where it starts and ends;
            # Python turns this off), not one message per line.
            readline.parse_and_bind("set enable-bracketed-paste on")
    except ImportError:  # (Windows)
        pass
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print()
            continue
        line = line.strip()
        if not line:
            continue
        if bad := not_utf8(line):  # (the terminal's encoding is not UTF-8, or a paste held other bytes)
            err.print(f"[bold red]error:[/] that line is not UTF-8 text ({bad}); nothing was sent")
            continue
        if line.startswith("//"):  # a message that starts with a slash ("//usr/bin/env": "/usr/bin/env")
            line = line[1:]
        elif line.startswith("/"):
            if _command(session, line):
                return
            continue
        try:
            with _typed_ahead_kept():
                finished = _stream(session, line, show_drafts)
        except RedraftError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}")
            continue
        except Exception as exc:  # out of memory, a bug: the conversation so far is not lost with it
            if os.environ.get("REDRAFT_DEBUG"):
                raise
            console.print()
            what = OUT_OF_MEMORY if isinstance(exc, torch.OutOfMemoryError) else bug_line(exc)
            err.print(f"[bold red]error:[/] {escape(what)}; the conversation so far is kept (a partial answer too): "
                      f"go on, /reset, or Ctrl-D")
            continue
        if finished is None:  # stopped in the prompt pass: nothing answered yet
            session.withdraw()
            err.print("(stopped before the answer began: the message is not kept)", style="dim", markup=False)
            continue
        if finished:  # (an interrupted answer's line was ended with its "[interrupted]")
            console.print()
        err.print(_status(session) + ("" if finished else " (stopped)"), style="dim")
        _note_cut(session)


def _system_label(system: str | None) -> str:
    """The system prompt in force, for /stats: its text (cut at 60 characters), empty, or the template's default."""
    if system is None:
        return "the chat template's default"
    if not system:
        return "empty"
    return escape(repr(system if len(system) <= 60 else system[:57] + "..."))


def _command(session: ChatSession, line: str) -> bool:
    """Run a slash command; True means leave."""
    name, _, rest = line[1:].partition(" ")
    if rest.strip() and name in ("quit", "exit", "q", "reset", "stats", "help"):
        err.print(f"[bold red]error:[/] /{escape(name)} takes no arguments")
        return False
    if name in ("quit", "exit", "q"):
        return True
    if name == "reset":
        session.reset()
        err.print("conversation cleared")
    elif name == "stats":
        s = session.totals.summary()
        err.print(f"session: {counted(s['answers'], 'answer')}, {s['tokens']} tokens in {s['seconds']:.1f} s "
                  f"({s['tokens_per_s']:.1f} tokens/s), {shown(s['tokens_per_step'], '.2f')} tokens/step, "
                  f"acceptance {shown(s['acceptance_rate'], '.0%')}, beams {beams_label(vars(session.cfg))}; "
                  f"prompts {s['prompt_tokens']} tokens, {s['reused_tokens']} of them reused from the KV cache")
        err.print(f"system prompt: {_system_label(session.system)}")
    elif name == "set":
        key, _, value = rest.strip().partition(" ")
        if not key:
            err.print("usage: /set NAME VALUE (/help lists the names)")
            return False
        try:
            err.print(session.set(key, value.strip()), markup=False)
        except RedraftError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}")
    elif name == "help":
        err.print(HELP, markup=False)
    else:
        err.print(f"unknown command /{name}; /help lists them (//{name} sends /{name} as a message)", markup=False)
    return False
