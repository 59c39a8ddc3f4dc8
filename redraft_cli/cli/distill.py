"""`redraft distill`: train a drafter for a target from a recipe, resumably."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..distill.pipeline import METRICS_NAME, OUTPUT_NAMES
from ..distill.train import CHECKPOINT
from ..distill.pipeline import distill as run_distill
from ..distill.launch import launched_rank
from ..distill.recipe import check_recipe, load_recipe
from ..errors import BadInputError
from ..files import PACKAGE_DIR, cache_dir, inside_package
from . import options as o
from ._errors import fail, handle_errors, interrupt_code, stop_signals, stopped_word
from .common import counted, model_inputs, check_output_paths, console, err, is_dash, quiet_libraries, shown, write_report


# Words of the collective backends' errors when a peer process is gone (gloo, NCCL, the store).
PEER_LOST = ("Connection reset", "Connection closed", "Broken pipe", "peer", "NCCL", "gloo", "timed out", "Timeout")


@handle_errors
def distill(
    recipe_or_model: Annotated[str, typer.Argument(help="Recipe name (recipes/NAME.yaml), a recipe YAML path, or a model id/path.")],
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: drafters/RECIPE).")] = None,
    data: Annotated[Optional[str], typer.Option(help="Prompts: a file (bench's formats), 'builtin', or hf://owner/dataset/file.json (default: the recipe's data.source).")] = None,
    num_prompts: Annotated[Optional[int], typer.Option(help="Use only the first N conversations (default: the recipe's data.num_prompts).")] = None,
    held_out: Annotated[Optional[int], typer.Option(help="Conversations kept out of training, for agreement and the bench (the first N) (default: the recipe's data.held_out).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Length of the target's answers in the data (default: the recipe's data.max_new_tokens).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop training after N optimiser steps (default: the recipe's train.max_steps).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Training epochs (default: the recipe's train.epochs).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per training step (default: the recipe's train.batch_size).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW, cosine schedule) (default: the recipe's train.lr).")] = None,
    head: Annotated[Optional[str], typer.Option(help="Vocabulary head: own | tied (default: the recipe's drafter.head).")] = None,
    num_layers: Annotated[Optional[int], typer.Option(help="Residual blocks in the drafter (default: the recipe's drafter.num_layers).")] = None,
    predict_tokens: Annotated[Optional[int], typer.Option(help="Tokens the drafter learns to predict (beam length - 1) (default: the recipe's drafter.predict_tokens).")] = None,
    draft_vocab: Annotated[Optional[int], typer.Option(help="Score only the N most frequent tokens of the data (default: the recipe's drafter.draft_vocab_size).")] = None,
    context_window: Annotated[Optional[int], typer.Option(help="Let the drafter attend over the last N positions (0: the plain ReDrafter head) (default: the recipe's drafter.context_window).")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="Start from this drafter's weights (same head, layers and vocabulary) (default: the recipe's drafter.init_from).")] = None,
    sampled_answers: Annotated[Optional[int], typer.Option(help="Sampled answers per training conversation, beside the greedy one (labelled with the target's greedy tokens) (default: the recipe's data.sampled_answers).")] = None,
    written_prompts: Annotated[Optional[int], typer.Option(help="The target also writes N user prompts and answers them (default: the recipe's data.written_prompts).")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout in the drafter while training (default: the recipe's train.dropout).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    no_bench: Annotated[bool, typer.Option("--no-bench", help="Skip the short bench on held-out prompts at the end.")] = False,
    no_generate: Annotated[bool, typer.Option("--no-generate", help="Train on the data generated so far; generate no more (a later run without it resumes generation).")] = False,
    data_only: Annotated[bool, typer.Option("--data-only", help="Make the data (answers, hidden states) and stop; under accelerate launch the processes share it.")] = False,
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps (default: the recipe's target.device)."),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 (default: the recipe's target.dtype)."),
    quantize: Optional[str] = typer.Option(None, help="none | 8bit | 4bit (default: the recipe's target.quantize)."),
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt before every training conversation, in place of a data file's own system turns (\"\": none, the chat template's default); bench, chat and sweep send it by default with the drafter (default: the recipe's data.system).")] = None,
    chat_template: Annotated[Optional[str], typer.Option("--chat-template", help="Render conversations with this chat template: a name (vicuna), a Jinja file or Jinja text, for tokenizers without one (default: the recipe's target.chat_template; the drafter keeps it).")] = None,
    json_path: o.JsonOut = None,
) -> None:
    """Distill a drafter: the target answers prompts (self-distillation), the drafter learns to predict it."""
    quiet_libraries()
    recipe = load_recipe(recipe_or_model)
    overrides = {
        ("data", "source"): data, ("data", "num_prompts"): num_prompts, ("data", "max_new_tokens"): max_new_tokens,
        ("data", "held_out"): held_out,
        ("train", "max_steps"): max_steps, ("train", "epochs"): epochs, ("train", "batch_size"): batch_size,
        ("train", "lr"): lr, ("drafter", "head"): head, ("drafter", "num_layers"): num_layers,
        ("drafter", "predict_tokens"): predict_tokens, ("drafter", "draft_vocab_size"): draft_vocab,
        ("data", "sampled_answers"): sampled_answers, ("data", "written_prompts"): written_prompts,
        ("train", "dropout"): dropout, ("drafter", "context_window"): context_window,
        ("drafter", "init_from"): None if init_from is None else str(init_from),
        ("target", "dtype"): dtype, ("target", "quantize"): quantize, ("target", "chat_template"): chat_template,
        ("data", "system"): system,
    }
    for (section, name), value in overrides.items():
        if value is not None:
            setattr(getattr(recipe, section), name, value)
    if device is not None:
        recipe.target.device = device
    check_recipe(recipe)  # every value, before the model loads (--max-steps 0, --lr nan, --head x, ...)
    out = Path(os.path.expanduser(out or Path("drafters") / recipe.name))  # (--out=~/x comes unexpanded)
    check_out_folder(out, json_path)
    files, folders = model_inputs(recipe.target.model)
    recipe_file = recipe_or_model if recipe_or_model.endswith((".yaml", ".yml")) else None
    source = os.path.expanduser(recipe.data.source)
    check_output_paths({"--json": json_path}, inputs={"data.source": source, "RECIPE": recipe_file, **files},
                       folders={**folders, "--init-from": recipe.drafter.init_from})
    view = _DistillView()
    rank = launched_rank()  # under accelerate launch the main process (rank 0) speaks for all
    try:
        with stop_signals():
            result = run_distill(recipe, out, resume=resume, on_event=view.on_event, bench=not no_bench,
                                 generate=not no_generate, data_only=data_only)
    except KeyboardInterrupt:
        code = interrupt_code()  # (130 for Ctrl-C, 143 for SIGTERM)
        if rank != 0:  # the main process says what was kept
            raise typer.Exit(code) from None
        if view.phase[0] == "bench" and json_path is not None and (out / METRICS_NAME).is_file():
            write_report(json_path, (out / METRICS_NAME).read_text())  # (the report without its bench)
        raise fail(view.interrupted(out).replace("interrupted", stopped_word(), 1), code) from None
    except RuntimeError as exc:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise
        first = escape(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)  # ("[../pair.cc:537]")
        if rank != 0:
            raise fail(f"process {rank} of the launch stopped: another process stopped first (its message says why): "
                       f"{first}", 1) from None
        if not any(sign in str(exc) for sign in PEER_LOST):  # rank 0's own error
            raise
        kept = (f"the last checkpoint in {out} is kept: run the launch again with --resume to continue from it"
                if (out / CHECKPOINT).is_dir() else "run the launch again")
        raise fail(f"another process of the launch stopped (killed, or out of memory?), so this one cannot go on: "
                   f"{first}; {kept}", 1) from None
    finally:
        if view.tasks:  # started with its first bar, so an error before any prints no blank line
            view.progress.stop()
    if not result.main:  # another process of an accelerate launch: the main process prints and reports
        return
    m = result.metrics
    if m.get("data_only"):
        console.print(f"data ready in {escape(str(m['data_dir']))}: the same command without --data-only trains on it "
                      f"(accelerate launch -m redraft_cli distill ... for several GPUs)")
    else:
        console.print(_summary(m))
        console.print(f"drafter written to {escape(str(result.out))} (load it with --drafter {escape(str(result.out))})")
    if json_path is not None:
        write_report(json_path, json.dumps(m, indent=2) + "\n")


def check_out_folder(out: Path, json_path: Path | None) -> None:
    """--out outside the installed package (its drafters are data, not a workspace), and a --json report
    that is not one of the files distill writes there."""
    where = out.resolve()
    if inside_package(where):
        raise BadInputError(f"--out {out} is inside the redraft package ({PACKAGE_DIR}); write the drafter "
                            f"elsewhere (it loads from any folder with --drafter)")
    if json_path is not None and not is_dash(json_path):
        report = Path(json_path).resolve()
        if report == where:
            raise BadInputError(f"--json {json_path} is the --out folder itself; name a file for the report")
        if report.is_relative_to(where) and report.relative_to(where).parts[0] in OUTPUT_NAMES:
            raise BadInputError(f"--json {json_path} is a file distill writes in --out {out}; name another file")
        data = (cache_dir() / "distill-data").resolve()
        if report.is_relative_to(data):
            raise BadInputError(f"--json {json_path} is inside the distillation data ({data}), which distill reads "
                                f"and writes; name a file elsewhere")


class _DistillView:
    """Rich progress for the three phases: data generation, training, bench."""

    def __init__(self) -> None:
        cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        # Without a terminal (nohup, CI logs) the bars do not draw: log a line now and then instead (and
        # no bars at all: Rich would print their last frame into the log, squeezed to its width).
        self.log_lines = not err.is_terminal
        self.progress = Progress(*cols, console=err, disable=self.log_lines)
        self.tasks: dict[str, int] = {}
        self._last_logged: dict[str, int] = {}
        self.phase: tuple[str, str] = ("load", "")  # what runs now, and where its progress is kept

    def interrupted(self, out: Path) -> str:
        """The one-line message for Ctrl-C: what was kept, where, and how to go on."""
        phase, where = self.phase
        if phase == "train":
            return (f"interrupted at training step {where}; the checkpoint is saved in {out}: run the same command "
                    f"with --resume to continue")
        if phase in ("data", "writing", "hidden"):
            what = {"data": "the target's answers", "writing": "the prompts the target wrote",
                    "hidden": "the hidden states (whole batches)"}[phase]
            if phase == "data" and not any(Path(where).glob("shard-*.safetensors")):  # (kept a shard at a time)
                return (f"interrupted before the first shard of answers was finished (data.shard_size conversations "
                        f"each), so none is kept yet in {where}; run the same command to start it again")
            return (f"interrupted; {what} made so far are kept in {where}: run the same command to continue "
                    f"from there")
        if phase == "bench":
            return (f"interrupted during the held-out bench; the trained drafter and its metrics.json are in {out} "
                    f"(run the same command with --resume to finish the bench, or measure it with redraft bench "
                    f"--drafter {out})")
        if (out / CHECKPOINT).is_dir():  # (a --resume stopped while the model loaded)
            return f"interrupted; the checkpoint in {out} is kept: run the same command with --resume to continue"
        return "interrupted before any work was saved; run the same command to start again"

    def _log(self, kind: str, count: int, every: int, line: str) -> None:
        if self.log_lines and count - self._last_logged.get(kind, 0) >= every:
            self._last_logged[kind] = count
            err.print(line)

    def _task(self, name: str, description: str, total: int | None) -> int:
        if not self.tasks:
            self.progress.start()
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(description, total=total, info="")
        return self.tasks[name]

    def on_event(self, e: dict) -> None:
        kind = e["event"]
        if kind in ("data_start", "writing_start", "hidden_start"):
            self.phase = (kind.removesuffix("_start"), e["dir"])
        elif kind in ("start", "step", "interrupted"):
            self.phase = ("train", str(e["step"]))
        elif kind == "bench_start":
            self.phase = ("bench", "")
        if kind == "load":
            err.print(f"loading target {escape(str(e['model']))} ...")
        elif kind == "note":
            err.print(f"note: {escape(e['text'])}")  # (a path or a prompt's text may hold '[...]')
        elif kind == "data":
            which = e.get("set", "greedy")
            label = "self-distillation data" if which == "greedy" else which
            t = self._task(f"data {which}", label, e["total"])
            self.progress.update(t, completed=e["done"], total=e["total"], info=f"{e['tokens']:,} tokens")
            self._log(f"data {which}", e["done"], 64, f"{label}: {e['done']}/{e['total']} conversations, {e['tokens']:,} tokens")
        elif kind == "writing":
            t = self._task("writing", "prompts written by the target", e["total"])
            self.progress.update(t, completed=e["done"], total=e["total"])
            self._log("writing", e["done"], 64, f"prompts written by the target: {e['done']}/{e['total']}")
        elif kind == "hidden":
            t = self._task("hidden", "caching hidden states", e["total"])
            self.progress.update(t, completed=e["done"], total=e["total"])
            self._log("hidden", e["done"], 256, f"hidden states: {e['done']}/{e['total']} conversations")
        elif kind == "data_partial":
            err.print(f"[yellow]note:[/] training on the data generated so far ({e['done']} of {e['total']} "
                      f"conversations in {escape(str(e['dir']))}); a run without --no-generate resumes generating the rest")
        elif kind == "data_done":
            sampled = "".join(f" (+{e[k]} {what})" for k, what in (("sampled", "sampled answers"),
                                                                  ("written", "prompts the target wrote")) if e.get(k))
            err.print(f"data: {e['train']} training{sampled} and {e['held_out']} held-out conversations, "
                      f"{e['train_tokens']:,} target tokens to learn")
        elif kind == "datastore":
            err.print(f"datastore: the {e['tokens']:,} answer tokens of the training data, saved to {escape(str(e['path']))}")
        elif kind == "draft_vocab":
            err.print(f"draft vocabulary: {e['size']} tokens cover {e['coverage']:.1%} of the target's tokens")
        elif kind == "init_from":
            err.print(f"starting from the drafter in {escape(str(e['path']))}")
        elif kind == "freeze":
            err.print(f"training only what it lacked: {e['trainable']:,} parameters")
        elif kind == "start":
            if e["step"] >= e["total_steps"]:  # (the note above says so): no bar of 250/5
                return
            if e["step"]:
                err.print(f"resuming training at step {e['step']} of {e['total_steps']} (from the checkpoint)")
            t = self._task("train", "training", e["total_steps"])
            self.progress.update(t, completed=e["step"])
        elif kind == "step":
            t = self._task("train", "training", e["total_steps"])
            agree = " ".join(f"{a:.2f}" for a in e["train_agreement"])
            self.progress.update(t, completed=e["step"], info=f"loss {e['loss']:.3f} | train top-1 {agree}")
            self._log("step", e["step"], 10, f"step {e['step']}/{e['total_steps']}: loss {e['loss']:.3f}, train top-1 {agree}")
        elif kind == "micro":  # one of a step's train.grad_accum micro-batches
            t = self._task("train", "training", e["total_steps"])
            self.progress.update(t, completed=e["step"] + e["micro"] / e["grad_accum"],
                                 info=f"step {e['step'] + 1}: micro-batch {e['micro']}/{e['grad_accum']}")
        elif kind == "eval" and "agreement" in e:
            agree = " ".join(f"{a:.2f}" for a in e["agreement"])
            err.print(f"step {e['step']}: held-out loss {e['loss']:.3f}, top-1 per position {agree} "
                      f"(mean {e['mean_agreement']:.3f}, best at step {e['best_step']})")
        elif kind == "bench":
            t = self._task("bench", "held-out bench", e["total"])
            self.progress.update(t, completed=e["done"], total=e["total"])
            self._log("bench", e["done"], 1, f"held-out bench: {e['done']}/{e['total']} runs")
        if kind == "bench_start" and self.log_lines:
            err.print(f"held-out bench: {counted(e['prompts'], 'prompt')}, plain decoding and ReDrafter (--no-bench skips it)")


def _summary(m: dict) -> Table:
    what = m["model"] if m["recipe"] == m["model"] else f"{m['recipe']} on {m['model']}"  # (a model, no recipe)
    t = Table(title=f"redraft distill: {what}", title_justify="left")
    t.add_column("step", justify="right")
    t.add_column("train loss", justify="right")
    t.add_column("held-out loss", justify="right")
    t.add_column("top-1 per position", justify="left")
    t.add_column("tokens/step, 1 beam (est.)", justify="right")  # 1 + sum of agreement products; no tree, no lookup
    for row in m["history"]:
        t.add_row(str(row["step"]), f"{row['train_loss']:.3f}", shown(row.get('loss'), '.3f'),
                  " ".join(f"{a:.2f}" for a in row.get("agreement", [])), shown(row.get('est_tokens_per_step'), ".2f"))
    held = m.get("data", {}).get("held_out_conversations", 1)
    caption = (f"best step {m['best_step']} (mean held-out top-1 {m['best_mean_agreement']:.3f})" if held else
               f"best step {m['best_step']} (no held-out conversations: lowest training loss)") + f"; {m['seconds']:.0f} s training"
    if "simulated" in m:
        sim = m["simulated"]
        mean = sim["tokens"] / max(sim["answers"], 1) + 1  # (+ the prefill's token)
        caption += (f" | simulated greedy at the recommended shape: {shown(sim['tokens_per_step'], '.2f')} tokens/step on "
                    f"{counted(sim['answers'], 'held-out answer')} ({mean:.0f} tokens on average, "
                    f"at most {sim['max_new_tokens']})")
    if "bench" in m:
        b = m["bench"]["redraft"]
        caption += (f" | held-out bench: {shown(b['tokens_per_step'], '.2f')} tokens/step, speedup "
                    f"{shown(m['bench']['speedup'], '.2f')}x")
    t.caption = caption
    t.caption_justify = "left"
    return t
