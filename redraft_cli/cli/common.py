"""What the commands share: loading the target and drafter from their options, quiet third-party
logging, input checks before any work (output paths, prompts that fit), the notes they print,
and the report options' '-' (standard output)."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import typer
from rich.console import Console
from rich.markup import escape

from ..chat_templates import NAMED as NAMED_TEMPLATES
from ..chat_templates import (SYSTEM_REFUSED, apply_chat_template, refuses_system, render, resolve_template, system_for_drafter,
                              template_for_drafter)
from ..decode import DecodeConfig, check_datastore
from ..dialogue import Dialogue
from ..drafter import Drafter, made_for_another
from ..entry import startup_done
from ..env import env_flag
from ..errors import BadInputError, ChatTemplateError, ContextOverflowError
from ._errors import STDERR
from ..files import cache_dir, write_text
from ..lean_llama import lean_supported
from ..loading import EMBEDDED, TargetSpec, load_target
from ..prompts import load_prompt_conversations
from ..sampling import SamplingConfig
from ..shipped import shipped_drafter_dir
from ..target import Target, not_utf8

console = Console(highlight=False)
err = Console(file=STDERR, highlight=False)


def report_to_stdout(path: Path | str | None) -> Path | str | None:
    """The callback of --json and sweep's --csv: with '-' the report is standard output's only content,
    so the tables and messages go to standard error (`redraft bench --json - | jq .speedup`). (The app's
    root callback sends them back to standard output before each command's options are read.)"""
    if is_dash(path):
        if not stdout_open():
            raise typer.BadParameter("'-' writes the report to standard output, which is closed here; name a file")
        console.file = STDERR
        fit_width(console)
    return path


MIN_FILE_WIDTH = 80


def fit_width(c: Console) -> None:
    """The width of what `c` writes to now: its terminal's, and at least MIN_FILE_WIDTH for a file or
    a pipe (a narrow COLUMNS inherited from a terminal cut a saved table's numbers to "0.…")."""
    c.width = None  # (back to what the file and the environment say)
    if not c.is_terminal and c.width < MIN_FILE_WIDTH:
        c.width = MIN_FILE_WIDTH


def stdout_open() -> bool:
    """Whether standard output can be written (`cmd >&-` leaves Python's sys.stdout None)."""
    return sys.stdout is not None and not getattr(sys.stdout, "closed", False)


def is_dash(path: Path | str | None) -> bool:
    """Whether a path option is '-': standard output for a report, standard input for --prompts."""
    return path is not None and str(path) == "-"


def write_report(path: Path | str, text: str) -> str | None:
    """Write a result file, or to standard output for '-'; the path written, None for standard output."""
    if is_dash(path):
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:  # (`--json - | head -c 10`): quietly, exit 1, as Rich ends a table's closed pipe
            console.on_broken_pipe()
        return None
    return str(write_text(path, text))


def read_conversations(path: Path | None, limit: int, systems: list[str | None] | None = None) -> list[list[str]]:
    """--prompts (a file, '-' for standard input, None for the built-in set) as each prompt's user turns (and
    into `systems`, each one's own system turn or None); at a terminal, '-' first says what it waits for (a
    blank screen looked hung)."""
    if is_dash(path) and sys.stdin is not None and sys.stdin.isatty():
        err.print("reading prompts from standard input, one a line (or JSONL); end with Ctrl-D")
    return load_prompt_conversations(path, limit=limit, systems=systems)


def parse_turns(value: str, no_chat_template: bool = False) -> int | None:
    """--turns as a number of user turns per prompt: a whole number >= 1, or None for 'all'. Later turns go
    in the chat template's turns, so with --no-chat-template only 1 is taken."""
    text = str(value).strip().lower()
    if text != "all" and (not re.fullmatch(r"[0-9]+", text) or int(text) < 1):
        raise BadInputError(f"--turns takes a whole number >= 1 or 'all', got {value!r}")
    turns = None if text == "all" else int(text)
    if turns != 1 and no_chat_template:
        raise BadInputError(f"--turns {text} asks each later turn after the model's answer, in the chat template's "
                            f"turns, and --no-chat-template sends raw text: drop one of them")
    return turns


def _template_keeps_history(target: Target) -> bool:
    """Whether the chat template renders a later turn's prompt with the first user turn and the answer to it
    (True when it cannot render one at all: those turns are left out, each with its own note)."""
    mark_user, mark_answer = "\ue000q\ue001", "\ue000a\ue001"
    try:
        text = render(target.tokenizer, [{"role": "user", "content": mark_user},
                                         {"role": "assistant", "content": mark_answer},
                                         {"role": "user", "content": "Go on."}])
    except BadInputError:
        return True
    return mark_user in text and mark_answer in text


def turns_label(measured: int) -> str:
    """How far a multi-turn run got, for a title: 'up to 3 turns', or 'first turns only'."""
    return f"up to {measured} turns" if measured > 1 else "first turns only"


def note_dropped_turns(result: dict) -> None:
    """A note for each later turn bench or sweep left out (`turns_dropped`: past the context, or not renderable),
    and one for the later turns the context left too little room (`turns_cut_short`)."""
    if short := result.get("turns_cut_short"):
        err.print(f"note: {short} later turn{'s' if short > 1 else ''} left fewer than --max-new-tokens "
                  f"{result['max_new_tokens']} tokens of the context; {'their answers stop' if short > 1 else 'its answer stops'} "
                  f"where the context ends")
    dropped = result.get("turns_dropped") or []
    for drop in dropped[:3]:
        err.print(f"note: prompt {drop['prompt']}'s turn {drop['turn']} was left out, with the turns after it: "
                  f"{escape(drop['why'])}")
    if len(dropped) > 3:
        err.print(f"note: ... and {len(dropped) - 3} more prompts' later turns (--json lists them)")


def as_dialogues(target: Target, convs: list[list[str]], systems: list[str | None], max_turns: int | None,
                  source: Path | None) -> list[Dialogue]:
    """Each prompt's first `max_turns` user turns (None: all) as a Dialogue with the system turn its first
    turn was encoded with (`systems`, from encode_prompts), and a note of how many answers that makes (and
    one when `target`'s chat template leaves the earlier turns out of a later one)."""
    where = "" if source is None else " from standard input" if is_dash(source) else f" in {source}"
    out = [Dialogue(c[:max_turns], system=s) for c, s in zip(convs, systems)]
    later = sum(len(d) > 1 for d in out)
    asked = "all" if max_turns is None else max_turns
    if not later:
        err.print(f"note: --turns {asked}, but no prompt{escape(where)} has a second user turn: each answers one")
    else:
        if not _template_keeps_history(target):
            err.print("note: the chat template leaves the earlier turns out of a later turn's prompt (it does not "
                      "render them), so later turns are not asked after the model's answers")
        err.print(f"note: --turns {asked}: {later} of {counted(len(out), 'prompt')}{escape(where)} "
                  f"go{'es' if later == 1 else ''} on past {'its' if later == 1 else 'their'} "
                  f"first turn, {sum(map(len, out))} answers in all; each later turn is asked after the model's own "
                  f"answer, on every path")
    return out


def counted(n: int, noun: str) -> str:
    """'1 prompt', '2 prompts': a count and its noun, for the lines the commands print."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def shown(value: float | None, spec: str) -> str:
    """A measured ratio in a table or line ('2.78', '35.0%'); '-' where it is undefined (None: no draft step)."""
    return "-" if value is None else format(value, spec)


def quiet_libraries() -> None:
    """No progress bars or deprecation chatter from transformers/hub on our output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # bitsandbytes logs at import (optional CPU kernels) and on every 8-bit matmul of a bfloat16 input.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    disable_progress_bars()


@dataclass
class Loaded:
    target: Target
    drafter: Drafter
    drafter_name: str
    chat_template: str | None = None  # the template given (--chat-template) or the drafter's; None: the model's own


def load_models(model: str, drafter: str, dtype: str, device: str, quantize: str, seed: int,
                device_map: str | None = None, chat_template: str | None = None,
                templated: bool = True, note_untrained: bool = True) -> Loaded:
    """Target from the options, then the drafter: a path, 'random', or 'auto'. Prompts are
    rendered with `chat_template` when given; else with the tokenizer's own template; else, when
    `templated`, with the one the drafter was distilled with (its recipe.yaml), if it names one."""
    quiet_libraries()
    if not model.strip():
        raise BadInputError("--model needs a hub id, a folder, a .gguf file or smollm2-135m; got an empty one")
    if not drafter.strip():
        raise BadInputError("--drafter needs a folder, auto or random; got an empty one")
    if chat_template and not templated:
        raise BadInputError("--chat-template and --no-chat-template exclude each other")
    if chat_template is not None:
        resolve_template(chat_template)  # a bad name fails before the model loads
    spec = TargetSpec(model=model, dtype=dtype, device=device, quantize=quantize, device_map=device_map)
    if device_map and not torch.cuda.is_available():
        err.print(f"note: --device-map {device_map}: no CUDA GPU here, so accelerate places every layer on the CPU")
    with err.status(f"Loading {escape(model)} ..."):
        target = load_target(spec)
    if target.device.type == "cpu" and not target.batch_invariant:
        dtype = str(target.compute_dtype).replace("torch.", "")
        why = (f"this CPU's {dtype} matmuls round differently for every row count tried" if target.lean
               else "REDRAFT_GENERIC=1 puts it on the generic Hugging Face path"
               if env_flag("REDRAFT_GENERIC", False) and lean_supported(target.model) and not target.spread
               else f"{target.config.model_type} models run the generic Hugging Face path")
        err.print(f"note: {why}, so a tree pass can round differently from a one-token pass and greedy ReDrafter "
                  "output can differ from plain decoding at near-ties (README, Performance)")
    loaded = Loaded(target, *resolve_drafter(target, drafter, seed, note_untrained))
    if chat_template is not None:
        apply_chat_template(target, chat_template)
        loaded.chat_template = chat_template
    elif templated and Path(loaded.drafter_name).is_dir():  # the template the drafter's data was rendered with
        own = getattr(target.tokenizer, "chat_template", None)
        try:
            saved = template_for_drafter(loaded.drafter_name)
            if saved is not None and resolve_template(saved) == own:
                saved = None  # (the model's own)
            apply_chat_template(target, saved)
        except BadInputError as exc:  # e.g. a Jinja file named by a path that was relative elsewhere
            saved = None
            err.print(f"note: the drafter's chat template (its recipe.yaml) cannot be used here ({escape(str(exc))})"
                      + (f"; prompts use {escape(target.name)}'s own" if own else ""))
        else:
            loaded.chat_template = saved
            if saved:
                label = saved if saved in NAMED_TEMPLATES else "from its recipe.yaml"
                err.print(f"note: {escape(target.name)} has no chat template; prompts use the one its drafter was "
                          f"distilled with ({label})" if not own else
                          f"note: prompts use the chat template its drafter was distilled with ({label}), not "
                          f"{escape(target.name)}'s own (--chat-template overrides)")
    startup_done()  # a Ctrl-C a library swallowed while loading stops here; later ones reach the command
    return loaded


def converted_alias(model: str) -> str | None:
    """The embedded default's alias when `model` is the folder its conversion is cached in
    (`<cache>/models/smollm2-135m`, given as --model): its shipped drafter is the alias's."""
    try:
        path = Path(os.path.expanduser(model)).resolve()
        models = (cache_dir() / "models").resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return path.name if path.parent == models and path.name in EMBEDDED else None


def resolve_drafter(target: Target, drafter: str, seed: int, note_untrained: bool = True) -> tuple[Drafter, str]:
    """The drafter of --drafter (a folder, 'random' or 'auto') and its name; 'auto' without a shipped drafter
    is an untrained one, with a note (note_untrained=False: none, where no drafter will run)."""
    if drafter == "auto":
        shipped = shipped_drafter_dir(target.name) or shipped_drafter_dir(converted_alias(target.name))
        if shipped is None and note_untrained:
            err.print(f"[yellow]note:[/] no trained drafter ships for {escape(target.name)}; using an untrained one (--drafter random)")
        drafter = "random" if shipped is None else str(shipped)
    if drafter == "random":
        return Drafter.for_target(target, seed=seed), f"random (seed {seed})"
    drafter = os.path.expanduser(drafter)  # a quoted or --drafter=~/x
    if Path(drafter).is_file():
        raise BadInputError(f"--drafter {drafter} is a file; pass the drafter's folder ({Path(drafter).parent})")
    loaded = Drafter.load(drafter, map_location=target.device)
    loaded.check_target(target.hidden_size, target.vocab_size, target.name)
    made_for = loaded.config.target_model
    if made_for_another(made_for, target.name):
        err.print(f"note: this drafter was distilled for {escape(str(made_for))}, not {escape(target.name)}; its shapes match, but "
                  f"it predicts another model's tokens unless both name the same weights")
    return loaded.to(dtype=drafter_dtype(loaded, target)).attach(target.embed_weight, target.lm_head_weight), drafter


def drafter_dtype(drafter: Drafter, target: Target) -> torch.dtype:
    """A 16-bit drafter runs as stored (half the memory traffic per draft step; the target still
    verifies every token, so output does not depend on it); a float32 one takes the target's
    dtype. float16 on CPU, where its matmuls are slow, becomes the target's dtype too."""
    stored = drafter.rnn_w.weight.dtype
    if stored == torch.bfloat16 or (stored == torch.float16 and target.device.type != "cpu"):
        return stored
    return target.compute_dtype


def decode_config(max_new_tokens: int, beam_width: int | None, beam_length: int | None, accept: str,
                  temperature: float, top_k: int, top_p: float, seed: int,
                  epsilon: float = DecodeConfig.typical_epsilon, delta: float = DecodeConfig.typical_delta,
                  lookup: int | None = None, lookup_length: int | None = None,
                  datastore: int | None = None, nodes: int | None = None) -> DecodeConfig:
    """Validate the decoding options before any model loads (unset beam sizes take the core defaults for now;
    a node budget is checked against the beam shape once that is known, see `with_drafter_shape`)."""
    if nodes is not None and nodes < 0:
        raise BadInputError(f"--nodes must be >= 0, got {nodes}")
    if beam_width is None or beam_length is None:
        nodes = None  # the shape comes (in part) from the drafter: checked in with_drafter_shape
    cfg = DecodeConfig(  # (every range checked before any note about what an option changes)
        max_new_tokens=max_new_tokens,
        beam_width=beam_width if beam_width is not None else DecodeConfig.beam_width,
        beam_length=beam_length if beam_length is not None else DecodeConfig.beam_length,
        accept=accept,
        sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        typical_epsilon=epsilon,
        typical_delta=delta,
        lookup_beams=lookup or 0,
        lookup_length=lookup_length or 0,
        datastore_beams=datastore or 0,
        tree_nodes=nodes or 0,
    )
    unused = [o for o, v, off in (("--top-k", top_k, 0), ("--top-p", top_p, 1.0)) if v != off]
    if temperature == 0 and (unused or accept in ("rejection", "typical")):
        what = " and ".join(unused + ([f"--accept {accept}"] if accept in ("rejection", "typical") else []))
        err.print(f"note: at --temperature 0 decoding is greedy, so {what} "
                  f"{'changes' if len(unused) + (accept in ('rejection', 'typical')) == 1 else 'change'} nothing")
    typical = [o for o, v, off in (("--epsilon", epsilon, DecodeConfig.typical_epsilon),
                                   ("--delta", delta, DecodeConfig.typical_delta)) if v != off]
    if typical and accept != "typical":
        one = len(typical) == 1
        err.print(f"note: with --accept {accept}, {' and '.join(typical)} change{'s' if one else ''} nothing "
                  f"({'it tunes' if one else 'they tune'} --accept typical only)")
    return cfg


def with_drafter_shape(cfg: DecodeConfig, drafter: Drafter, beam_width: int | None, beam_length: int | None,
                       lookup: int | None = None, lookup_length: int | None = None,
                       datastore: int | None = None, nodes: int | None = None, batch_size: int = 1) -> DecodeConfig:
    """Beam sizes (and copied beams) the user did not set come from the drafter's recommendation
    for batches of `batch_size` rows (datastore beams only when the drafter has a datastore; its
    node budget only with its own beam shape, which the budget was chosen for)."""
    rec = drafter.recommended_shape(batch_size)
    if datastore is None:
        datastore = rec["datastore_beams"]
    check_datastore(drafter, datastore)
    width = beam_width if beam_width is not None else rec["beam_width"]
    length = beam_length if beam_length is not None else rec["beam_length"]
    if nodes is None:  # (-w/-l that restate the recommended shape keep its budget)
        nodes = rec["tree_nodes"] if (width, length) == (rec["beam_width"], rec["beam_length"]) else 0
    try:
        return replace(
            cfg,
            beam_width=width,
            beam_length=length,
            lookup_beams=lookup if lookup is not None else rec["lookup_beams"],
            lookup_length=lookup_length if lookup_length is not None else rec["lookup_length"],
            datastore_beams=datastore,
            tree_nodes=nodes,
        )
    except BadInputError as exc:  # the options alone were checked before: with the recommended values, out of range
        taken = [f"{flag} {rec[key]}" for flag, key, given in (
            ("--beam-width", "beam_width", beam_width), ("--beam-length", "beam_length", beam_length),
            ("--lookup", "lookup_beams", lookup), ("--lookup-length", "lookup_length", lookup_length)) if given is None]
        if not taken:
            raise
        raise BadInputError(f"{exc} (with {', '.join(taken)} as the drafter's config.json recommends; set those "
                            f"options to override them)") from exc


def note_past_training(drafter: Drafter, drafter_name: str, lengths: list[int], flag: str = "--beam-length") -> None:
    """A note when a beam length asked for drafts more tokens than the drafter learned to predict
    (predict_tokens = its training's beam length - 1): those later drafts are its own untrained steps."""
    deepest, trained = max(lengths, default=0), drafter.config.predict_tokens
    if deepest - 1 > trained and not drafter_name.startswith("random"):
        asked = f"{deepest} drafts" if len(lengths) == 1 else f"up to {deepest} draft up to"
        err.print(f"note: {flag} {asked} {deepest - 1} tokens a beam, but this drafter learned to "
                  f"predict {trained} (a beam length of {trained + 1}; distill --predict-tokens): drafts past that "
                  f"are rarely accepted, though the target still checks every one")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise BadInputError(f"--batch-size must be >= 1, got {batch_size}")


def fit_batch_size(batch_size: int, num_prompts: int) -> int:
    """The rows that decode at once: --batch-size, or as many as there are prompts when fewer (noted),
    which is also the batch whose recommended shape applies and the batch the report names."""
    if batch_size <= num_prompts:
        return batch_size
    err.print(f"note: --batch-size {batch_size} with {counted(num_prompts, 'prompt')}: "
              f"{'one prompt at a time' if num_prompts == 1 else f'batches of {num_prompts}'}")
    return num_prompts


def check_output_paths(outputs: dict, inputs: dict | None = None, folders: dict | None = None) -> None:
    """Fail before any work when an output file ({option: path}) cannot be written (missing folder, a
    directory), when two outputs are the same file, when an output is one of the `inputs`, or when
    it is a file inside one of the `folders` ({option: folder} the run reads: a model, a drafter)."""
    from ..errors import BadInputError

    seen: dict[Path, str] = {}
    for option, q in (inputs or {}).items():
        if q is not None and str(q) and Path(q).exists():
            seen[Path(q).resolve()] = option
    read = [(option, Path(f).resolve()) for option, f in (folders or {}).items()
            if f is not None and str(f) and Path(f).is_dir()]
    for option, p in outputs.items():
        if p is None or (option in ("--json", "--csv") and is_dash(p)):
            continue
        p = Path(p)
        if p == Path("."):  # what an empty argument becomes
            raise BadInputError(f"{option} needs a file path, got {str(p)!r} or an empty one")
        key = p.resolve()
        if key in seen:
            raise BadInputError(f"{seen[key]} and {option} both name {p}: writing {option} would overwrite it")
        if key.is_file() and key.stat().st_nlink > 1:  # a hard link: writing it changes its other names too
            raise BadInputError(f"{option} {p} is a hard link to another file, which writing it would change too; "
                                f"name a new file")
        for reader, folder in read:
            if key.is_file() and key.is_relative_to(folder):
                raise BadInputError(f"{option} {p} is a file of the {reader} folder {folder}: writing it would "
                                    f"overwrite it; name a new file")
        seen[key] = option
        if p.is_dir():
            raise BadInputError(f"output {p} is a directory, expected a file path")
        if p.is_fifo():  # opening a pipe nobody reads would block below, for ever
            try:
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                raise BadInputError(f"output {p} is a named pipe that no process reads; start its reader first "
                                    f"or name a file") from None
        if not p.parent.is_dir():
            above = next((a for a in p.parents if a.exists()), None)
            if above is not None and not above.is_dir():
                raise BadInputError(f"cannot write {p}: {above} is a file, not a folder")
            raise BadInputError(f"cannot write {p}: folder {p.parent} does not exist")
        existed = p.exists()
        try:  # the file system may still refuse (read-only, /proc): find out now, not after the run
            with open(p, "a"):
                pass
        except OSError as exc:
            raise BadInputError(f"cannot write {p}: {exc.strerror or exc}") from None
        if not existed:
            p.unlink(missing_ok=True)


def model_inputs(model: str, drafter: str | None = None, chat_template: str | None = None) -> tuple[dict, dict]:
    """What a run reads, for check_output_paths: (files, folders) keyed by option. A model folder or
    .gguf file, the embedded model's cached conversion, a drafter folder (the shipped one for auto),
    a --chat-template file, and the package's data folder (the built-in prompts bench and sweep read)."""
    files, folders = {}, {}
    try:  # (a template given as Jinja text is no path: too long a name, or none that exists)
        if chat_template and Path(chat_template).expanduser().is_file():
            files["--chat-template"] = Path(chat_template).expanduser()
    except (OSError, ValueError):
        pass
    path = Path(model).expanduser()
    if path.is_file():
        files["--model"] = path
    elif path.is_dir():
        folders["--model"] = path
    elif model in EMBEDDED:  # an alias: its conversion in the cache
        folders["--model"] = cache_dir() / "models" / model
    if drafter == "auto":
        folders["--drafter"] = shipped_drafter_dir(model)
    elif drafter not in (None, "random"):
        folders["--drafter"] = os.path.expanduser(drafter)
    # The package's own data (built-in prompts, shipped drafters and distillation data, recipes): every run may read it.
    folders["built-in data"] = Path(__file__).resolve().parent.parent / "data"
    return files, folders


def lookup_label(r: dict) -> str:
    """' + 2 lookup', ' + 2 lookup up to 8 + 2 datastore up to 8' (copies as long as their match, up to the
    length when set apart from the beam length), for titles."""
    n, ds = r.get("lookup_beams") or 0, r.get("datastore_beams") or 0
    length = r.get("lookup_length")
    size = f" up to {length}" if length and length != r.get("beam_length") else ""
    return (f" + {n} lookup" + size if n else "") + (f" + {ds} datastore" + size if ds else "")


def beams_label(r: dict) -> str:
    """'4x4 best 7 nodes + 1 lookup up to 32': the whole tree of one decoding setting, for titles."""
    nodes = r.get("tree_nodes") or 0
    return f"{r['beam_width']}x{r['beam_length']}" + (f" best {nodes} nodes" if nodes else "") + lookup_label(r)


def note_no_warmup(warmup: bool) -> None:
    """What --no-warmup costs the measurement: the one-time start-up falls on the first timed runs."""
    if not warmup:
        err.print("note: --no-warmup: the first timed runs include one-time start-up costs (plain decoding runs "
                  "first, so its speed reads low and the speedup high); leave it out to compare speeds")


def precision_label(r: dict) -> str:
    """' (cpu bfloat16)', ' (cuda float16 8bit)', ' (cuda, device map auto, bfloat16)': where and how the target
    ran, for titles after the model's name; '' for a result that does not say (written by an older redraft)."""
    if not r.get("device") or not r.get("dtype"):
        return ""
    where = f"{r['device']}, device map {r['device_map']}," if r.get("device_map") else r["device"]
    quant = r.get("quantize")
    return f" ({where} {r['dtype']}" + (f" {quant})" if quant and quant != "none" else ")")


def note_short_prompt_set(texts: list[str], num_prompts: int, default: int) -> None:
    """Say so when an explicit --num-prompts (not the command's default) asks for more prompts than the
    file holds (the run uses them all)."""
    if num_prompts != default and num_prompts > len(texts):
        err.print(f"note: --num-prompts {num_prompts}, but the prompts hold {len(texts)}; using {len(texts)}")


def encode_prompts(loaded: Loaded, texts: list[str], own: list[str | None], system: str | None,
                   no_chat_template: bool, max_new_tokens: int, source: Path | None
                   ) -> tuple[list[list[int]], SystemPrompt, int, list[str | None]]:
    """Bench's and sweep's prompts as token ids, each with its system turn, checked against the context.
    `own` holds each prompt's system turn from the prompt file (None: it has none). --system, when given,
    is every prompt's; else a prompt's own system turn, else the run's (resolve_system: the drafter's, or
    the template's default). Returns (ids, the run's SystemPrompt, how many prompts send their own, each
    prompt's system text as sent)."""
    target = loaded.target
    n, mine = len(texts), sum(s is not None for s in own)
    where = "from standard input" if is_dash(source) else f"in {source}"
    turns = f"system turn{'' if mine == 1 else 's'} of {mine} of {counted(n, 'prompt')} {escape(where)}"
    sent = resolve_system(loaded, system, templated=not no_chat_template,
                          drafter_note=not (mine and system is None and not no_chat_template))
    systems = [sent] * n
    if mine and system is not None:
        err.print(f"note: --system replaces the {turns}")
        mine = 0
    elif mine and no_chat_template:
        err.print(f"note: the {turns} {'is' if mine == 1 else 'are'} not sent: raw text (--no-chat-template) has "
                  f"no turns")
        mine = 0
    elif mine and refuses_system(target):
        err.print(f"note: the {turns} {'is' if mine == 1 else 'are'} left out: {SYSTEM_REFUSED}")
        mine = 0
    elif mine:
        systems = [sent if s is None else SystemPrompt(s, f"prompt {i + 1}'s system turn {where}",
                                                       "shorten that system turn", of_prompt=True)
                   for i, s in enumerate(own)]
    ids = []
    for i, (text, s) in enumerate(zip(texts, systems)):
        try:
            ids.append(target.encode_raw(text) if no_chat_template else target.encode_chat(text, system=s.text))
        except BadInputError as exc:  # (a control token's string, with a template that rewrites messages)
            raise type(exc)(f"prompt {i + 1} of {n}" + ("" if source is None else f" {where}")
                            + (" (or its system turn)" if s.of_prompt else "") + f": {exc}") from None
    check_prompts_fit(target, ids, max_new_tokens, source, systems)
    if mine:
        rest = n - mine
        others = "the chat template's default" if sent.text is None else (
            f"the system prompt the drafter was distilled with ({escape(repr(_clipped(sent.text)))})")
        err.print(f"note: {mine} of {counted(n, 'prompt')} {escape(where)} send{'s' if mine == 1 else ''} "
                  f"{'its' if mine == 1 else 'their'} own system turn"
                  + (f"; the other {rest} send{'s' if rest == 1 else ''} {others}" if rest else "")
                  + " (--system overrides)")
    return ids, sent, mine, [s.text for s in systems]


def _clipped(text: str, width: int = 60) -> str:
    """A system prompt as a note quotes it: its first `width` characters."""
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass
class SystemPrompt:
    """The system prompt bench, sweep and chat send: `text` (None: the chat template's default) and where it
    came from, for messages: 'the --system prompt', or 'the drafter's system prompt (DIR/recipe.yaml data.system)'."""

    text: str | None
    origin: str = "the --system prompt"
    remedy: str | None = None  # what to do when it is too long (None: the --system / drafter one)
    of_prompt: bool = False  # a prompt's own system turn from the prompt file

    @property
    def fix(self) -> str:
        """What to do when it is too long."""
        if self.remedy is not None:
            return self.remedy
        return ("shorten --system" if self.origin == "the --system prompt" else
                "give --system TEXT in its place, or --system '' for an empty one")


def resolve_system(loaded: Loaded, system: str | None, templated: bool = True, raw_option: bool = True,
                   drafter_note: bool = True) -> SystemPrompt:
    """The system prompt to send: --system when given, else (through the chat template) the one the drafter's
    training conversations began with (its recipe's data.system, with a note), else None.
    One message is rendered with it first: a target without a chat template is one line saying what to pass
    (raw_option: the command takes --no-chat-template); a template that refuses a system turn refuses --system,
    and the drafter's system prompt is then left out with a note."""
    chosen = SystemPrompt(system)
    saved = None
    if system is None and Path(loaded.drafter_name).is_dir():
        try:
            saved = system_for_drafter(loaded.drafter_name)
        except BadInputError as exc:
            err.print(f"note: the drafter's system prompt cannot be read ({escape(str(exc))}); prompts use the chat "
                      f"template's default")
    if saved is not None and not templated:
        err.print("note: the drafter was distilled with a system prompt (its recipe's data.system), which raw text "
                  "(--no-chat-template) does not carry")
    elif saved is not None:
        chosen = SystemPrompt(saved, f"the drafter's system prompt ({Path(loaded.drafter_name) / 'recipe.yaml'} data.system)")
    if not templated:
        return chosen
    target = loaded.target
    try:
        target.encode_chat("Hello", system=chosen.text)
    except ChatTemplateError:
        raise ChatTemplateError(f"{target.name} has no chat template: give it one with --chat-template (a name such as "
                                f"vicuna, a Jinja file or Jinja text)"
                                + (", or send prompts as raw text with --no-chat-template" if raw_option else "")) from None
    except BadInputError as exc:
        if chosen.text is None:
            raise
        if not refuses_system(target):  # it takes system turns, but not this text (a control token's string)
            raise BadInputError(f"{chosen.origin}: {exc}") from None
        if saved is None:
            raise BadInputError(f"{SYSTEM_REFUSED}: leave out --system, or give a --chat-template that takes one") from None
        err.print(f"note: the drafter was distilled with a system prompt, but {SYSTEM_REFUSED}, so prompts go without "
                  f"one")
        return SystemPrompt(None)
    if saved is not None and drafter_note:  # (not when every prompt sends its own: encode_prompts)
        err.print(f"note: prompts begin with the system prompt the drafter was distilled with ({escape(repr(_clipped(saved)))}, "
                  f"its recipe's data.system); --system overrides it")
    return chosen


def check_system(system: str | None, no_chat_template: bool) -> None:
    """Refuse a --system that could not be sent: with --no-chat-template (raw text has no turns), or not UTF-8."""
    if system is None:
        return
    if no_chat_template:
        raise BadInputError("--system is a turn of the chat template, and --no-chat-template sends prompts as raw "
                            "text: put the system text in the prompts, or drop --no-chat-template")
    if bad := not_utf8(system):
        raise BadInputError(f"--system is not UTF-8 text ({bad}); give it in UTF-8")


def check_system_fits(target: Target, system: SystemPrompt | None, room: int = 1) -> int:
    """The system prompt's tokens in the chat template (0 for none); a ContextOverflowError naming where it came
    from and what to pass when it leaves fewer than `room` tokens of the context."""
    if system is None or not system.text:
        return 0
    alone = len(target.encode_chat("", system=system.text))
    if alone + room > target.max_context:
        raise ContextOverflowError(f"{system.origin} is {alone} tokens in the chat template, and {target.name}'s "
                                   f"context is {target.max_context}{target.context_cap}: it leaves no room for a "
                                   f"{'prompt' if room == 1 else 'message'}; {system.fix}")
    return alone


def check_prompts_fit(target: Target, ids: list[list[int]], max_new_tokens: int, source: str | None = None,
                      system: SystemPrompt | list[SystemPrompt] | None = None) -> None:
    """Refuse a prompt longer than the context, naming it and its --prompts `source` (None: the built-in
    set), or the system prompt (one for all, or each prompt's) when that alone fills it; note prompts whose
    answer the context will cut short."""
    systems = system if isinstance(system, list) else [system] * len(ids)
    alone = {}  # system text -> its tokens
    for s in systems:
        if s is not None and s.text not in alone:
            alone[s.text] = check_system_fits(target, s)
    where = "" if source is None else " from standard input" if is_dash(source) else f" in {source}"
    for i, p in enumerate(ids):
        try:
            target.check_prompt(p)
        except ContextOverflowError as exc:  # which prompt of the file (the run measures them all, or none)
            system = systems[i]
            with_system = system is not None and bool(system.text)
            if len(ids) == 1 and not where and not with_system:
                raise
            left_out = " (or leave it out of the prompt file)" if len(ids) > 1 and source is not None else ""
            if with_system:
                raise ContextOverflowError(f"prompt {i + 1} of {len(ids)}{where} is {len(p)} tokens, {alone[system.text]} of them "
                                           f"{'its system turn' if system.of_prompt else system.origin}, and {target.name}'s context is "
                                           f"{target.max_context}{target.context_cap}: shorten the prompt, or "
                                           f"{system.fix}{left_out}") from None
            raise ContextOverflowError(f"prompt {i + 1} of {len(ids)}{where}: {exc}{left_out}") from None
    cut = sum(len(p) + max_new_tokens > target.max_context for p in ids)
    if cut:
        err.print(f"note: {cut} prompt(s) leave fewer than --max-new-tokens {max_new_tokens} tokens of the "
                  f"{target.max_context}-token context; their answers stop where the context ends")


SHORT_ANSWER_STEPS = 4  # decode steps per answer under which slower_note blames the answers' length


def slower_note(speedup: float | None, tokens_per_step: float | None, batch_size: int, drafter_name: str,
                subject: str = "ReDrafter", graphed: bool = False, swept: bool = False,
                beam_length: int = 2, steps_per_answer: float | None = None) -> str | None:
    """Why ReDrafter ran slower than plain decoding, and what to try; None when it did not.
    graphed: the target's passes replayed CUDA graphs (cuda_graphs.py). swept: the note ends a sweep,
    so it advises smaller trees, not the sweep that has just run. beam_length: the shape's (1 drafts nothing).
    steps_per_answer: decode steps per answer (a few: the answers ended early, so drafting had no room)."""
    if speedup is None or speedup >= 1.0:
        return None
    head = f"note: {subject} ran at {speedup:.2f}x of plain decoding here: "
    if tokens_per_step is None:  # no decode step at all
        steps_per_answer = 0.0
    if steps_per_answer is not None and steps_per_answer < SHORT_ANSWER_STEPS:
        return head + (f"its answers took only {steps_per_answer:.1f} decode steps each (short answers: "
                       "--max-new-tokens, the end of the text or of the context), too few to pay back the prompt pass "
                       "and the first drafts; compare on longer answers")
    if beam_length == 1 and tokens_per_step < 1.5:
        return head + "beams of length 1 (g0 alone) draft nothing, so only lookup beams propose; a beam length of " \
                      "2 or more lets the drafter propose"
    if drafter_name.startswith("random") and tokens_per_step < 1.5:
        return head + "the drafter is untrained (--drafter random), so it pays for drafts that are never accepted"
    if tokens_per_step < 1.5:
        return head + (f"its drafter rarely predicts this text ({tokens_per_step:.2f} tokens per step); "
                       "a drafter distilled for this target on this kind of prompt, with more data or steps, helps "
                       "(redraft distill; its held-out agreement is in the drafter's metrics.json)")
    smaller = "smaller trees (node budgets: --nodes 1,2,3) may pay, else decode plainly"
    if batch_size > 1:
        return head + "a batched tree costs compute in every row; " + (smaller if swept else (
            f"`redraft sweep --batch-size {batch_size} --save-best` with small node budgets (--nodes 1,2,3) finds "
            "the cheapest tree, or decode plainly"))
    if graphed:
        return head + ("with CUDA graphs a pass of this target costs only a few ms, about what the drafter's "
                       "step (not graphed) costs, so plain decoding wins on a target this small"
                       + ("" if swept else "; wider trees cost little here (`redraft sweep --save-best`)"))
    return head + "a tree pass costs more than its extra tokens save on this machine; " + (
        smaller if swept else "`redraft sweep --save-best` finds the shape that pays")
