"""The whole distillation: recipe -> data (self-distilled, resumable) -> training -> final drafter -> short bench.

Output directory layout:

    (data: ~/.cache/redraft/distill-data/RECIPE-KEY/, shared by all runs of the same data settings:
     shards + manifest of the target's own answers, resumable; sampled-KEY/ the sampled answers;
     hidden-DTYPE/ the cached hidden states)
    out/checkpoint/      latest training state (for --resume)
    out/best/            best drafter so far by held-out agreement
    out/config.json      the final drafter (= best), interoperable format,
    out/model.safetensors
    out/datastore.safetensors  the target's answers in the training data, for datastore beams
    out/recipe.yaml      the recipe actually used (flags applied)
    out/metrics.json     training history, evaluation, bench report
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from ..chat_templates import NAMED as NAMED_TEMPLATES
from ..chat_templates import SYSTEM_REFUSED, apply_chat_template, refuses_system
from ..datastore import DATASTORE_NAME, Datastore
from ..drafter import CONFIG_NAME, WEIGHTS_NAME, Drafter, DrafterConfig, made_for_another, write_beam_shape
from ..errors import BadInputError, ChatTemplateError, ModelLoadError, PromptError
from ..prompts import Conversation, builtin_conversations, load_conversations, without_systems
from ..files import atomic_write, remove_temporaries, writable_dir
from ..files import cache_dir
from ..loading import TargetSpec, _hub_reachable, load_target, resolve_device
from ..target import Target
from .hidden_cache import DamagedChunk, attach_hidden, build_hidden_cache
from .launch import Launch, launched_processes, launched_rank, start_launch
from .data import (GenerationConfig, conversations_sha256, drop_damaged_shards, generate_dataset,
                   load_dataset, read_manifest)
from .recipe import Recipe, builtin_recipes, check_recipe
from .seeding import default_data_dir, reused_note, seed_from_earlier, seed_from_package, settings_key, shipped_data
from .warm_start import freeze_copied, warm_start
from .written import PROMPTS as WRITTEN_PROMPTS, STATE as WRITTEN_STATE, WritingConfig, write_prompts
from .train import (CHECKPOINT, check_resumable, check_same_held_out_key, checkpoint_held_out_key, recover_checkpoint,
                    train_drafter)

EventFn = Callable[[dict[str, Any]], None]
RECIPE_NAME, METRICS_NAME = "recipe.yaml", "metrics.json"
# The first line of the recipe.yaml a run writes in --out: a recipe.yaml without it is the user's own.
RECIPE_HEADER = "# The recipe of this drafter as `redraft distill` ran it (flags applied).\n"
# Everything distill writes in --out (a --json report must not take one of these names).
OUTPUT_NAMES = (CONFIG_NAME, WEIGHTS_NAME, DATASTORE_NAME, RECIPE_NAME, METRICS_NAME, CHECKPOINT)


@dataclass
class DistillResult:
    out: Path
    metrics: dict[str, Any]
    main: bool = True  # False in the other processes of a launch: the main process reports


def resolve_conversations(source: str, num_prompts: int | None, skipped: list[str] | None = None
                          ) -> list[list[str]]:
    """'builtin', a local prompt file, or hf://owner/dataset/path/in/repo.json (downloaded with huggingface_hub).
    With a `skipped` list, records that are not prompts are left out and listed there (prompts.load_conversations).
    A conversation that begins with a system turn of its own is a prompts.Conversation holding it."""
    found: list[str | None] = []
    if source == "builtin":
        convs = builtin_conversations("distill")
    elif source.startswith("hf://"):
        convs = load_conversations(_download_dataset_file(source), skipped, found)
    else:
        convs = load_conversations(os.path.expanduser(source), skipped, found)
    convs = [c if s is None else Conversation(c, s) for c, s in zip(convs, found or [None] * len(convs))]
    return convs[:num_prompts] if num_prompts else convs


def _check_same_held_out(out: Path, recipe: Recipe) -> None:
    """For a checkpoint from before held-out keys were kept: --resume keeps the held-out conversations
    of the run it continues (its recipe.yaml in out): with
    another data.source or data.held_out, the checkpoint would go on training on conversations it is
    evaluated on, and the best one would be chosen by them. (Other data settings may change: more
    prompts, longer answers.)"""
    try:
        before = yaml.safe_load((out / RECIPE_NAME).read_text()).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return
    for key in ("source", "held_out"):
        old, new = before.get(key), getattr(recipe.data, key)
        if key == "source" and isinstance(old, str) and isinstance(new, str) and not new.startswith("hf://"):
            same = old == new or os.path.abspath(os.path.expanduser(old)) == os.path.abspath(os.path.expanduser(new))
        else:
            same = old == new
        if old is not None and not same:
            raise BadInputError(f"cannot resume {out}: its run had data.{key} {old!r}, this one {new!r}, so other "
                                f"conversations would be held out (some already trained on); resume with {old!r} or "
                                f"use another --out")


def _download_dataset_file(source: str) -> str:
    parts = source[len("hf://"):].split("/", 2)
    if len(parts) != 3:
        raise BadInputError(f"dataset source must look like hf://owner/name/file.json, got {source!r}")
    repo_id, filename = f"{parts[0]}/{parts[1]}", parts[2]
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, repo_type="dataset", local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss in the local cache means: try the network
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"the data set {repo_id} ({filename}) is not in the local Hugging Face cache and the hub cannot be "
            "reached (no network); pass --data with a local prompt file instead"
        )
    try:
        return hf_hub_download(repo_id, filename, repo_type="dataset")
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; report them in one line
        raise ModelLoadError(f"cannot download {filename} from data set {repo_id}: {str(exc).splitlines()[0]}") from exc


def check_offline_needs(recipe: Recipe) -> None:
    """Fail early, naming everything that needs the network, when the hub is unreachable."""
    needs = []
    model = recipe.target.model
    from ..loading import EMBEDDED

    local = model.startswith(("/", "./", "../", "~")) or model.endswith(".gguf")  # a path, not a hub id
    if model not in EMBEDDED and local and not Path(model).expanduser().exists():
        raise ModelLoadError(f"recipe {recipe.name!r}: target model path not found: {model}")
    if model not in EMBEDDED and not Path(model).expanduser().exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
        except Exception:  # noqa: BLE001 - an invalid repo id is simply "not cached"
            cached = False
        if not cached:
            needs.append(f"the model {model}")
    if recipe.data.source.startswith("hf://"):
        if len([part for part in recipe.data.source[5:].split("/", 2) if part]) != 3:
            raise BadInputError(f"dataset source must look like hf://owner/name/file.json, got {recipe.data.source!r}")
        needs.append(f"the data set {recipe.data.source[5:]}")
    if needs and not _hub_reachable():
        if needs[0] == f"the model {model}" and recipe.name == model and "/" not in model:
            # the argument was neither a recipe nor a local path
            raise ModelLoadError(
                f"{model!r} is not a recipe ({', '.join(sorted(builtin_recipes()))}, or a .yaml file), not a local "
                "model, and the Hugging Face hub cannot be reached (no network) to look it up as a model id"
            )
        given_model = recipe.name == Path(model).name  # the argument was a model id, not a recipe
        what = f"distilling for {model}" if given_model else f"recipe {recipe.name!r}"
        local = []  # what to pass instead, for each thing needed
        if needs[0] == f"the model {model}":
            local.append("the model's directory" + ("" if given_model else
                                                    " as target.model in a copy of the recipe (a .yaml path)"))
        if recipe.data.source.startswith("hf://"):
            local.append("--data FILE (a prompt file)")
        raise ModelLoadError(
            f"{what} needs {' and '.join(needs)} from the Hugging Face hub, which cannot be reached "
            f"(no network); download {'them' if len(needs) > 1 else 'it'} where there is network (hf download "
            f"..., which fills the Hugging Face cache) or pass {' and '.join(local)}"
        )


def distill(recipe: Recipe, out: Path, resume: bool = False, on_event: EventFn | None = None,
            data_dir: Path | None = None, bench: bool = True, target: Target | None = None,
            generate: bool = True, data_only: bool = False) -> DistillResult:
    """Run the recipe end to end (or continue it). Returns the output directory and the metrics.

    generate=False trains on the data generated so far (none: an error) without generating more;
    a later run with generate=True resumes generation where it stopped. data_only=True makes the
    data (answers, and hidden states where the recipe caches them) and stops before training.
    Under `accelerate launch` with several processes they split the data and train data parallel
    (launch.py); the others return main=False and only the main process writes the drafter."""
    emit = on_event or (lambda e: None)
    if data_only and not generate:
        raise BadInputError("--data-only generates the data; it cannot be combined with --no-generate")
    out = Path(os.path.expanduser(out))  # (--out=~/x comes unexpanded: not a folder named ~ in the cwd)
    check_recipe(recipe)
    if out.exists() and not out.is_dir():
        raise BadInputError(f"--out {out} is a file; give a directory for the drafter")
    # A folder that exists is held from here (a second run into it is told another one writes it, before
    # any check of what it holds); a new one once it is made, below.
    early = out.is_dir() and not data_only and launched_rank() == 0
    made = _missing_folders(out)  # (out and the parents this run may create: drafters/ of drafters/NAME)
    try:
        with _holding(out, hold=early):
            return _checked(recipe, out, resume, emit, data_dir, bench, target, generate, data_only, held=early)
    except BaseException:  # (an error or a Ctrl-C before anything was written: no empty --out left behind)
        for folder in made:
            if not folder.is_dir() or any(folder.iterdir()):
                break
            folder.rmdir()
        raise


def _missing_folders(out: Path) -> list[Path]:
    """The folders of `out`'s path that do not exist yet, deepest first (out itself first; [] when it exists)."""
    missing = []
    folder = out.absolute()
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _checked(recipe: Recipe, out: Path, resume: bool, emit: EventFn, data_dir: Path | None, bench: bool,
             target: Target | None, generate: bool, data_only: bool, held: bool) -> DistillResult:
    """`distill`'s checks of --out, the recipe and the prompts (before the model loads), then the run."""
    if out.is_dir() and not held:  # (a held folder was recovered when it was taken)
        recover_checkpoint(out)
    if (out / CHECKPOINT).exists() and not resume and not data_only:
        raise BadInputError(f"{out} already holds a training checkpoint; pass --resume to continue it or use another --out")
    if (out / CHECKPOINT).exists() and resume and not data_only and not checkpoint_held_out_key(out):
        _check_same_held_out(out, recipe)  # (a checkpoint that names its held-out conversations is checked by them)
    # A run that failed before training (no model, no chat template, no network) leaves only recipe.yaml,
    # one killed before its first checkpoint also best/ or a half-written checkpoint: still ours to retry in.
    if (not data_only and out.is_dir() and not (out / CHECKPOINT).exists()
            and any(not _left_by_a_run(p) for p in out.iterdir())):
        mine = _left_by_a_run(out / RECIPE_NAME) or not (out / RECIPE_NAME).is_file()
        raise BadInputError(f"--out {out} already holds files and no training checkpoint; the drafter's files would "
                            f"replace them{'' if mine else f' ({RECIPE_NAME} among them, a recipe redraft did not write)'}"
                            f": use a new or empty directory")
    if target is None:
        try:  # (no CUDA here: said now, by the recipe's field, not after the model's download)
            resolve_device(recipe.target.device)
        except BadInputError as exc:
            raise BadInputError(str(exc).replace("--device", "target.device (--device)", 1)) from exc
    check_offline_needs(recipe)
    if recipe.drafter.init_from and not Path(recipe.drafter.init_from).expanduser().is_dir():
        raise BadInputError(f"drafter.init_from (--init-from) {recipe.drafter.init_from} is not a drafter directory")
    if recipe.drafter.init_from:  # a drafter that cannot load fails now, not after hours of data generation
        Drafter.load(Path(recipe.drafter.init_from).expanduser())
    fitted = recipe.beam.fit_to(recipe.drafter.predict_tokens, recipe.drafter.context_window)
    if fitted:
        emit({"event": "note", "text": fitted})
    if resume and not data_only and not (out / CHECKPOINT).exists():
        emit({"event": "note", "text": f"--resume: {out} holds no checkpoint yet; starting a new run there"})
    # The prompts first: a missing file or too few prompts fails before the model loads.
    d = recipe.data
    skipped: list[str] = []  # a data set of thousands of conversations keeps going past a malformed one
    try:
        convs = resolve_conversations(d.source, d.num_prompts, skipped)
    except PromptError as exc:  # name the field and where a relative path was looked for
        where = "" if os.path.isabs(os.path.expanduser(d.source)) or "://" in d.source else \
            f" (a relative path: looked for in the current folder {os.getcwd()}, and beside the recipe file " \
            f"for a recipe's own data.source)"
        raise PromptError(f"data.source (--data): {exc}{where if 'not found' in str(exc) else ''}") from exc
    if skipped:
        emit({"event": "note", "text": f"skipped {len(skipped)} record(s) that are not prompts or hold no text; the first: {skipped[0]}"})
    if mine := sum(isinstance(c, Conversation) for c in convs):
        turns = f"system turn{'' if mine == 1 else 's'} of {mine} of {len(convs)} conversations in {d.source}"
        if d.system:  # (as --system in bench: one for all)
            convs = without_systems(convs)
            emit({"event": "note", "text": f"data.system (--system) replaces the {turns}"})
        else:
            rest = len(convs) - mine
            emit({"event": "note", "text": f"{mine} of {len(convs)} conversations in {d.source} begin"
                                           f"{'s' if mine == 1 else ''} with {'its' if mine == 1 else 'their'} own "
                                           f"system turn" + (f"; the other {rest} with the chat template's default"
                                                             if rest else "") + " (data.system, --system, overrides)"})
    if d.num_prompts and len(convs) < d.num_prompts:
        emit({"event": "note", "text": f"data.num_prompts is {d.num_prompts}, but {d.source} holds "
                                       f"{len(convs)} conversations: all of them are used"})
    if len(convs) <= d.held_out:
        raise BadInputError(f"{len(convs)} conversations but held_out is {d.held_out}: nothing left to train on "
                            f"(give more prompts, or fewer with --held-out)")
    if (out / CHECKPOINT).exists() and resume and not data_only:  # the same held-out prompts, by content
        check_same_held_out_key(out, checkpoint_held_out_key(out), held_out_key(convs, d.held_out))
    leaked = _held_out_in_training(convs, d.held_out)
    if leaked:
        emit({"event": "note", "text": f"{leaked} of the {d.held_out} held-out conversations "
                                       f"{'is' if leaked == 1 else 'are'} also among the training "
                                       f"conversations (duplicates in the data): held-out agreement and the bench "
                                       f"overstate the drafter on new prompts; deduplicate the prompts"})
    for note in _shape_notes(recipe, bench and not data_only):
        emit({"event": "note", "text": note})
    # Where it will write, before the model loads.
    if not data_only:  # a data-only run writes nothing in --out
        _check_writable(out, f"cannot write the drafter to --out {out}")
    _check_writable(Path(data_dir) if data_dir else cache_dir() / "distill-data",
                    "cannot write the distillation data in {path}", "; set REDRAFT_CACHE to a writable folder")
    with _holding(out, hold=not held and not data_only and launched_rank() == 0):  # (a launch's main process
        return _distill(recipe, out, convs, resume, emit, data_dir, bench, target, generate, data_only)  # holds it)


def held_out_key(convs: list[list[str]], held_out: int) -> str:
    """What identifies a run's held-out conversations (the first `held_out`), kept in its checkpoint: their
    user turns (a system turn the chat template refuses is left out once the target has loaded)."""
    return conversations_sha256([list(c) for c in convs[:held_out]])


def _distill(recipe: Recipe, out: Path, convs: list[list[str]], resume: bool, emit: EventFn, data_dir: Path | None,
             bench: bool, target: Target | None, generate: bool, data_only: bool) -> DistillResult:
    """`distill` past its checks of the recipe, the prompts and --out, while it holds --out."""
    if data_only and recipe.train.max_steps is not None:  # all of the data, not what max_steps would visit
        recipe = replace(recipe, train=replace(recipe.train, max_steps=None))
    d = recipe.data
    # Several processes (accelerate launch): they split the data and train data parallel (launch.py).
    if launched_processes() > 1 and launched_rank() == 0:  # (it waits until every process has joined)
        emit({"event": "note", "text": f"joining a launch of {launched_processes()} processes at "
                                       f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"})
    launch = start_launch(recipe.target.device)
    if not launch.is_main:  # the main process reports for all
        emit = lambda e: None  # noqa: E731
    if target is None:
        t = recipe.target
        emit({"event": "load", "model": t.model})
        spec = TargetSpec(model=t.model, dtype=t.dtype, device=launch.device(t.device), quantize=t.quantize)
        # The main process first: it downloads or converts the model once, the others then load that.
        target = launch.main_first(lambda: load_target(spec))
    if recipe.drafter.draft_vocab_size and recipe.drafter.draft_vocab_size > target.vocab_size:
        raise BadInputError(f"drafter.draft_vocab_size (--draft-vocab) {recipe.drafter.draft_vocab_size} is larger than {target.name}'s vocabulary "
                            f"of {target.vocab_size} tokens")
    apply_chat_template(target, recipe.target.chat_template)
    if recipe.data.system and refuses_system(target):
        raise BadInputError(f"{SYSTEM_REFUSED}: data.system (--system) cannot be sent; leave it out, or give a "
                            f"target.chat_template (--chat-template) that takes one")
    if (mine := sum(isinstance(c, Conversation) for c in convs)) and refuses_system(target):
        convs = without_systems(convs)
        emit({"event": "note", "text": f"the system turn{'' if mine == 1 else 's'} of {mine} of {len(convs)} "
                                       f"conversations in {recipe.data.source} {'is' if mine == 1 else 'are'} left "
                                       f"out: {SYSTEM_REFUSED}"})
    if recipe.data.system:  # (a template that takes system turns may still fail on this one's text)
        try:
            target.encode_chat("Hello", system=recipe.data.system)
        except ChatTemplateError:  # (none at all: data generation says so, in distill's words)
            pass
        except BadInputError as exc:
            raise BadInputError(f"data.system (--system): {exc}") from None
    dr = recipe.drafter
    drafter = Drafter.for_target(target, seed=recipe.train.seed, head=dr.head, num_draft_layers=dr.num_layers,
                                 predict_tokens=dr.predict_tokens, draft_vocab_size=dr.draft_vocab_size,
                                 beam_width=recipe.beam.width, beam_length=recipe.beam.length,
                                 lookup_beams=recipe.beam.lookup, lookup_length=recipe.beam.lookup_length,
                                 datastore_beams=recipe.beam.datastore, tree_nodes=recipe.beam.nodes,
                                 context_window=dr.context_window)
    drafter.config.target_model = target.name
    if dr.init_from:  # its shape fits this drafter's: found now, not after the data is made
        init = Path(dr.init_from).expanduser()
        warm_start(drafter, init, copy=False)  # (which read its config.json: it parses)
        made_for = DrafterConfig.from_json_dict(json.loads((init / CONFIG_NAME).read_text())).target_model
        if made_for_another(made_for, target.name):
            emit({"event": "note", "text": f"drafter.init_from {dr.init_from} was distilled for {made_for}, not "
                                           f"{target.name}: its shapes match, but it learnt another model's tokens"})
    resumed = None  # the checkpointed drafter a resume continues
    if resume and not data_only and (out / CHECKPOINT).exists():
        resumed = check_resumable(out, drafter)  # before this run's recipe.yaml replaces the one of the run that wrote it
    if not data_only and launch.is_main:
        out.mkdir(parents=True, exist_ok=True)
        saved = recipe.to_dict()
        if target.tokenizer.chat_template and recipe.target.chat_template not in (None, *NAMED_TEMPLATES):
            saved["target"]["chat_template"] = target.tokenizer.chat_template  # a file's text: the drafter carries it
        text = RECIPE_HEADER + yaml.safe_dump(saved, sort_keys=False)
        atomic_write(out / RECIPE_NAME, lambda tmp: Path(tmp).write_text(text))

    # 1. Data: the target's own answers, held-out conversations first.
    gen_cfg = GenerationConfig(max_new_tokens=d.max_new_tokens, batch_size=d.gen_batch_size, temperature=d.temperature,
                               # ("" is the template's default, as None: the same data, one folder)
                               top_p=d.top_p, seed=d.seed, shard_size=d.shard_size, system=d.system or None,
                               max_prompt_tokens=d.max_prompt_tokens,
                               # (data rendered through another template is other data: its own cache folder)
                               chat_template=None if recipe.target.chat_template is None else
                               hashlib.sha256(target.tokenizer.chat_template.encode()).hexdigest(),
                               # (a quantized target answers differently: its own data and hidden states)
                               quantize=None if recipe.target.quantize == "none" else recipe.target.quantize)
    context = int(getattr(target, "max_context", 1 << 30))
    prompt_room = min(d.max_prompt_tokens, context - d.max_new_tokens)  # (data._generate_shard's limit)
    if prompt_room < 1:
        raise BadInputError(f"data.max_new_tokens {d.max_new_tokens} leaves no room for a prompt in {target.name}'s "
                            f"context of {context} tokens{getattr(target, 'context_cap', '')}; lower it (--max-new-tokens)")
    given_dir = data_dir is not None
    data_dir = Path(data_dir) if data_dir else default_data_dir(recipe, target.name, convs, gen_cfg)
    seen = _sequences_seen(recipe)
    max_shards = None
    if seen is not None:
        # A short run needs only the held-out slice and max_steps batches: generate just those shards.
        max_shards = -(-(d.held_out + seen) // d.shard_size)
    with _making_data(data_dir, launch.world, emit):
        if not given_dir:
            earlier: list[tuple[str, int]] = []
            launch.main_only(lambda: earlier.append(seed_from_earlier(recipe.name, data_dir, convs, gen_cfg, target.name)))
            if earlier and earlier[0][0]:
                emit({"event": "note", "text": reused_note(*earlier[0], d.shard_size)})
        examples = _answers(target, launch, recipe.name, convs, data_dir, gen_cfg, max_shards, generate, emit, "greedy")
        totals = (read_manifest(data_dir) or {}).get("totals") or {}
        first, later = totals.get("unrenderable", 0), totals.get("unrenderable_later", 0)
        unrendered = [f"{n} {what}" for n, what in ((first, "conversation(s) left out"),
                                                    (later, "conversation(s) cut short at a later turn")) if n]
        if unrendered:
            emit({"event": "note", "text": f"{' and '.join(unrendered)}: a message holds a control token's string, "
                                           f"and the chat template changes that message's text"})
        lost = [f"{n} {what}" for n, what in ((totals.get("skipped", 0) - first, "conversation(s) left out"),
                                              (totals.get("truncated", 0) - later,
                                               "conversation(s) cut short at a later turn")) if n > 0]
        if lost:  # (said, not silently fewer)
            emit({"event": "note", "text": f"{' and '.join(lost)}: a prompt (chat template and system turn "
                                           f"included) does not fit in {prompt_room} tokens (data.max_prompt_tokens {d.max_prompt_tokens}; {target.name}'s "
                                           f"context of {context} less data.max_new_tokens {d.max_new_tokens})"})
        held = [e for e in examples if e["conv_index"] < d.held_out]
        train_set = [e for e in examples if e["conv_index"] >= d.held_out]
        if d.cache_hidden:
            _attach_hidden_states(target, launch, examples, data_dir, recipe, emit, greedy=False)
        # The extra sets are sized for the run: when it is shorter than one pass over the greedy set, each
        # extra example is seen about once, and one forward while training costs no more than caching it.
        cache_extra = d.cache_hidden and (seen is None or seen > len(train_set))
        sampled = _sampled_answers(target, launch, recipe, convs[d.held_out:], gen_cfg, data_dir, generate, emit,
                                   cache_extra)
        written = _written_prompts(target, launch, recipe, gen_cfg, data_dir, generate, emit, cache_extra)
    train_set += sampled + written
    if not train_set and generate and _has_shards(read_manifest(data_dir), max_shards, len(convs)):
        raise BadInputError(f"every training conversation was skipped: no prompt fits in {prompt_room} tokens "
                            f"(data.max_prompt_tokens {d.max_prompt_tokens}, and {target.name}'s context of {context}"
                            f"{getattr(target, 'context_cap', '')} less data.max_new_tokens {d.max_new_tokens}); raise "
                            f"data.max_prompt_tokens or lower "
                            f"--max-new-tokens")
    train_tokens = sum(int(e["loss_mask"].sum()) for e in train_set)
    emit({"event": "data_done", "train": len(train_set) - len(sampled) - len(written), "sampled": len(sampled),
          "written": len(written), "held_out": len(held), "train_tokens": train_tokens})
    if data_only:
        return DistillResult(out, {"recipe": recipe.name, "model": target.name, "data_only": True, "data_dir": str(data_dir),
                                   "data": {"train_conversations": len(train_set), "held_out_conversations": len(held),
                                            "train_generated_tokens": train_tokens}}, main=launch.is_main)
    _check_seq_len(train_set, recipe.train.max_seq_len, train_tokens, emit)

    # 2. The drafter (built above), then training.
    if dr.draft_vocab_size:
        # A resume trains on the checkpoint's vocabulary (check_resumable: of the same size).
        coverage = set_draft_vocab(drafter, train_set, dr.draft_vocab_size,
                                   keep=resumed.draft_vocab if resumed is not None else None)
        emit({"event": "draft_vocab", "size": dr.draft_vocab_size, "coverage": coverage})
        drafter.config.extra["draft_vocab_coverage"] = round(coverage, 4)
    if dr.init_from:
        copied = warm_start(drafter, Path(dr.init_from).expanduser(), copy=not resume)  # resume: the checkpoint has them
        emit({"event": "init_from", "path": dr.init_from})
        if recipe.train.freeze_init:
            emit({"event": "freeze", "trainable": freeze_copied(drafter, copied)})
    drafter.float()
    # Greedy self-distillation data holds the target's argmax tokens already; sampled data does not.
    state = train_drafter(target, drafter, train_set, held, recipe.train, out, dr.predict_tokens, resume=resume,
                          on_event=emit, compare_target_argmax=d.temperature > 0,
                          held_out_key=held_out_key(convs, d.held_out))
    if not launch.is_main:  # the final files, the datastore and the bench are the main process's
        return DistillResult(out, {"recipe": recipe.name, "process": launch.rank, "steps": state.step}, main=False)

    # 3. The final drafter = the best by held-out agreement.
    best = out / "best"
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        tmp = out / f".{name}.tmp{os.getpid()}"
        shutil.copyfile(best / name, tmp)
        os.replace(tmp, out / name)
    b = recipe.beam  # this run's recommended shape: best/ may be older than a --resume that changed it
    write_beam_shape(out, b.width, b.length, b.lookup, b.lookup_length, b.datastore, b.nodes)
    if dr.weight_storage != "float":  # only the final drafter: checkpoints keep full precision for --resume
        final = Drafter.load(out)
        if dr.weight_storage == "bfloat16":  # half the file; decoding runs the drafter in bfloat16 on CPU anyway
            final = final.to(torch.bfloat16)
        else:
            final.config.weight_storage = dr.weight_storage
        final.save(out)
    # The training answers, for datastore beams (2 bytes a token with a vocabulary under 65,536).
    datastore = Datastore.from_examples(train_set, target.vocab_size).save(out / DATASTORE_NAME)
    emit({"event": "datastore", "path": str(datastore), "tokens": train_tokens})
    metrics: dict[str, Any] = {
        "recipe": recipe.name,
        "model": target.name,
        "steps": state.step,
        "seconds": round(state.seconds, 1),
        "best_step": state.best_step,
        "best_mean_agreement": state.best_agreement if held else None,  # (none held out: best by training loss)
        "history": state.history,
        "data": {"train_conversations": len(train_set), "held_out_conversations": len(held),
                 "train_generated_tokens": train_tokens},
    }
    if held and d.temperature == 0 and all("hidden" in e for e in held):
        metrics["simulated"] = _simulate_held_out(target, out, held, recipe)
    if bench and held and recipe.eval.bench_prompts > 0:  # (eval.bench_prompts 0: no bench)
        # The metrics first: a run stopped during the bench keeps them (its bench: `redraft bench --drafter`).
        _write_metrics(out, {**metrics, "bench": "not finished (the run stopped during it)"})
        metrics["bench"] = _held_out_bench(target, out, convs[: d.held_out], recipe, emit)
    _write_metrics(out, metrics)
    emit({"event": "finished", "out": str(out), **{k: metrics[k] for k in ("steps", "best_step", "best_mean_agreement")}})
    return DistillResult(out, metrics)


def _write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write(out / METRICS_NAME, lambda tmp: Path(tmp).write_text(text))


def _shape_notes(recipe: Recipe, bench: bool = True) -> list[str]:
    """Recipe values that run but do less than they say: drafter steps no answer is long enough to
    train, and a held-out bench (when it runs) asked for more prompts than are held out."""
    d, k, notes = recipe.data, recipe.drafter.predict_tokens, []
    longest = max(d.max_new_tokens, (d.sampled_max_new_tokens or 0) if d.sampled_answers else 0)
    if k >= longest:  # drafter step j learns the answer token j after g0: answers of `longest` tokens end first
        notes.append(f"drafter.predict_tokens {k}: answers of at most {longest} tokens (data.max_new_tokens) train "
                     f"only drafter steps 1-{longest - 1}; the rest stay untrained (agreement 0): lower predict_tokens "
                     f"or raise data.max_new_tokens")
    if d.held_out == 0:
        notes.append("data.held_out 0: no conversation is held out, so there is no held-out agreement"
                     + (" or bench" if bench and recipe.eval.bench_prompts > 0 else "")
                     + ", and the best checkpoint is the one of lowest training loss")
    if bench and recipe.eval.bench_prompts > d.held_out > 0:
        notes.append(f"eval.bench_prompts {recipe.eval.bench_prompts}: only {d.held_out} conversations are held out "
                     f"(data.held_out), so the bench after training runs {d.held_out}")
    return notes


def _left_by_a_run(path: Path) -> bool:
    """Whether a file of --out is what a distill stopped before its first checkpoint leaves there
    (a recipe.yaml only with the header a run writes: the user's own recipe is not replaced)."""
    if path.name == RECIPE_NAME:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.readline() == RECIPE_HEADER
        except OSError:
            return False
    return path.name == "best" or path.name.startswith(f".{CHECKPOINT}.")


def _held_out_in_training(convs: list[list[str]], held_out: int) -> int:
    """How many of the first `held_out` conversations (kept out for evaluation) recur among the training ones."""
    def key(c: list[str]) -> tuple:  # (the same user turns after another system turn are another conversation)
        return getattr(c, "system", None), tuple(c)

    training = {key(c) for c in convs[held_out:]}
    return sum(key(c) in training for c in convs[:held_out])


def _check_seq_len(train_set: list[dict], max_seq_len: int, train_tokens: int, emit: EventFn) -> None:
    """Training cuts every sequence at train.max_seq_len tokens: a BadInputError when that leaves no
    answer token to learn (it would train on nothing), a note when it leaves some out."""
    kept = sum(int(e["loss_mask"][:max_seq_len].sum()) for e in train_set)
    if train_tokens and not kept:
        shortest = min(int(e["loss_mask"].nonzero()[0, 0]) for e in train_set if e["loss_mask"].any())
        raise BadInputError(f"train.max_seq_len {max_seq_len} cuts every training conversation before its answer "
                            f"begins (the shortest prompt is {shortest} tokens): there is nothing to learn; raise it")
    if kept < train_tokens:
        emit({"event": "note", "text": f"train.max_seq_len {max_seq_len} leaves {1 - kept / train_tokens:.0%} of the "
                                       f"answer tokens out of training (raise it to learn them)"})


@contextmanager
def _making_data(data_dir: Path, processes: int, emit: EventFn) -> Iterator[None]:
    """One run at a time makes a data folder's answers and hidden states. Runs into other --out folders
    share it (an `own` and a `tied` head distilled side by side from one recipe): the second says so,
    waits, and then reuses what the first made, where both used to make it twice and overwrite each
    other's manifest. The processes of one launch split the work instead (launch.py): no lock. A folder
    where no lock file can be made (read-only data) is used unlocked."""
    from filelock import FileLock, Timeout

    if processes > 1:
        yield
        return
    lock: FileLock | None = FileLock(str(data_dir / ".lock"))
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            emit({"event": "note", "text": f"another redraft distill is making the data in {data_dir}; this run "
                                           f"waits for it, then uses that data"})
            lock.acquire()
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


@contextmanager
def _holding(out: Path, hold: bool) -> Iterator[None]:
    """Hold the folder --out for this run (an exclusive lock, released when the run ends or its process
    dies): a second distill into the same folder at once is a BadInputError instead of both writing its
    checkpoint and drafter. hold=False (a data-only run, the other processes of a launch): nothing held."""
    try:
        import fcntl
    except ImportError:  # (Windows: no advisory locks on folders)
        hold = False
    if not hold:
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInputError(f"another redraft distill is writing --out {out} now; wait for it to end (--resume "
                                f"then continues it) or use another --out") from None
        except OSError:  # a file system without locks (some network mounts): the run goes on unguarded
            pass
        else:  # no other run writes here: what a killed one (kill -9) left half-written is stale
            recover_checkpoint(out, clean=True)  # (first: a complete new checkpoint left beside the old one counts)
            remove_temporaries(out)
        yield
    finally:
        os.close(fd)


def _check_writable(path: Path, message: str, hint: str = "") -> None:
    """`files.writable_dir(path)`, or fail with `message` (which may name {path}) and the reason."""
    try:
        writable_dir(path)
    except OSError as exc:
        raise BadInputError(message.format(path=path) + f": {exc.strerror or exc}{hint}") from exc


def _answers(target: Target, launch: Launch, package_name: str, convs: list[list[str]], data_dir: Path,
             gen_cfg: GenerationConfig, max_shards: int | None, generate: bool, emit: EventFn, kind: str,
             required: bool = True) -> list[dict]:
    """One set of answers to `convs`: seeded from the package, generated (or resumed) unless
    generate=False, then loaded; with max_shards, only the conversations of those shards."""
    launch.main_only(lambda: seed_from_package(package_name, data_dir, convs, gen_cfg))
    damaged: list[str] = []
    launch.main_only(lambda: damaged.extend(drop_damaged_shards(data_dir)))
    if damaged:
        again = "made again" if generate else "left out (run without --no-generate to make them again)"
        emit({"event": "note", "text": f"{len(damaged)} shard(s) of {data_dir} were missing or damaged "
                                       f"({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}): {again}"})
    manifest = read_manifest(data_dir)
    if not generate:
        if manifest is None or not manifest.get("shards"):
            if not required:
                return []
            raise BadInputError(f"no distillation data in {data_dir} yet; run without --no-generate first")
        if not manifest.get("complete"):
            emit({"event": "data_partial", "set": kind, "dir": str(data_dir),
                  "done": sum(s["conversations"] for s in manifest["shards"]), "total": len(convs)})
    elif not _has_shards(manifest, max_shards, len(convs)):
        emit({"event": "data_start", "set": kind, "conversations": len(convs), "dir": str(data_dir)})
        generate_dataset(target, convs, data_dir, gen_cfg, max_shards=max_shards, launch=launch,
                         progress=lambda done, total, tokens: emit({"event": "data", "set": kind, "done": done,
                                                                    "total": total, "tokens": tokens}))
    # A directory's set may be larger than `convs` (written prompts grow under one key): its first ones.
    examples = [e for e in load_dataset(data_dir) if e["conv_index"] < len(convs)]
    if examples and max(int(e["input_ids"].max()) for e in examples) >= target.vocab_size:
        raise BadInputError(f"the data in {data_dir} holds token ids outside {target.name}'s vocabulary of "
                            f"{target.vocab_size}; delete that folder to generate the data again")
    if max_shards is not None:  # a short run trains on the shards it asked for, not on all that exist
        examples = [e for e in examples if e["conv_index"] < max_shards * gen_cfg.shard_size]
    return examples


def _has_shards(manifest: dict | None, max_shards: int | None, conversations: int) -> bool:
    """Whether the data answers all `conversations` (a complete set at least as large: sets that
    share a directory grow by extension), or every one of its first max_shards shards."""
    if manifest is None:
        return False
    count = int(manifest["num_conversations"])
    if manifest.get("complete") and count >= conversations:
        return True
    size = int(manifest["config"]["shard_size"])
    final = count // size if count < conversations else int(manifest["num_shards"])  # shards that will not change
    done = {int(s["index"]) for s in manifest["shards"] if int(s["index"]) < final}
    return max_shards is not None and all(i in done for i in range(min(max_shards, -(-conversations // size))))


def _sequences_seen(recipe: Recipe) -> int | None:
    """Training sequences a run with train.max_steps visits; None: the whole schedule."""
    t = recipe.train
    return t.max_steps * t.batch_size * t.grad_accum if t.max_steps else None


def _shards_to_answer(recipe: Recipe, conversations: int) -> int:
    """Shards of an extra answer set to generate: all of them, or for a short run only as many
    conversations as it has steps for."""
    shards = -(-conversations // recipe.data.shard_size)
    seen = _sequences_seen(recipe)
    return shards if seen is None else min(shards, -(-seen // recipe.data.shard_size))


def _sampled_answers(target: Target, launch: Launch, recipe: Recipe, train_convs: list[list[str]], gen_cfg: GenerationConfig,
                     data_dir: Path, generate: bool, emit: EventFn, cache: bool) -> list[dict]:
    """The recipe's sampled answers to the training conversations (data.sampled_*), every example
    carrying `greedy`: the target's greedy token per position (from the hidden-state cache, or
    -1 = computed from the target during training). They live in data_dir/sampled-KEY/."""
    d = recipe.data
    if not d.sampled_answers:
        return []
    n = min(len(train_convs), d.sampled_prompts or len(train_convs))
    shards = _shards_to_answer(recipe, n)
    examples: list[dict] = []
    for s in range(1, d.sampled_answers + 1):
        cfg = replace(gen_cfg, temperature=d.sampled_temperature, top_p=d.sampled_top_p, seed=d.seed + s,
                      max_new_tokens=d.sampled_max_new_tokens or d.max_new_tokens)
        # (keyed by where the training conversations start too: another data.held_out answers other ones)
        sdir = data_dir / f"sampled-{settings_key([cfg.fingerprint(), d.held_out])}"
        found = _answers(target, launch, f"{recipe.name}-sampled-{s}", train_convs, sdir, cfg, shards, generate, emit,
                         f"sampled answers {s}", required=False)
        found = [e for e in found if e["conv_index"] < n]
        if cache:
            _attach_hidden_states(target, launch, found, sdir, recipe, emit, greedy=True)
        else:
            for e in found:
                e["greedy"] = torch.full_like(e["input_ids"], -1)
        examples += found
    return examples


def _written_prompts(target: Target, launch: Launch, recipe: Recipe, gen_cfg: GenerationConfig, data_dir: Path,
                     generate: bool, emit: EventFn, cache: bool) -> list[dict]:
    """data.written_prompts: prompts the target writes (written.py), answered like the recipe's own.
    Prompts, answer shards and their hidden states live in data_dir/written-KEY/."""
    d = recipe.data
    if not d.written_prompts:
        return []
    wcfg = WritingConfig(count=d.written_prompts, temperature=d.written_temperature, batch_size=d.gen_batch_size,
                         seed=d.seed, system=d.system)
    wdir = data_dir / f"written-{settings_key([wcfg.fingerprint(), gen_cfg.fingerprint()])}"
    shipped = shipped_data(f"{recipe.name}-written")

    def seed() -> None:
        if ((shipped / WRITTEN_PROMPTS).is_file() and not (wdir / WRITTEN_PROMPTS).is_file() and json.loads(
                (shipped / WRITTEN_STATE).read_text()).get("config") == json.loads(json.dumps(wcfg.fingerprint()))):
            wdir.mkdir(parents=True, exist_ok=True)
            for name in (WRITTEN_PROMPTS, WRITTEN_STATE):
                shutil.copyfile(shipped / name, wdir / name)

    launch.main_only(seed)
    shards = _shards_to_answer(recipe, d.written_prompts)  # (the prompt set is written whole)
    state = wdir / WRITTEN_STATE
    written = json.loads(state.read_text()).get("kept", 0) if state.is_file() else 0
    if generate:
        emit({"event": "writing_start", "prompts": d.written_prompts, "dir": str(wdir)})
        # One list for all: the main process writes it, the others then read it.
        prompts = launch.main_first(lambda: write_prompts(
            target, wdir, wcfg, progress=lambda kept, wanted: emit({"event": "writing", "done": kept, "total": wanted})))
    elif written >= d.written_prompts:
        prompts = [c[0] for c in load_conversations(wdir / WRITTEN_PROMPTS)][: d.written_prompts]
    else:
        return []  # --no-generate before the prompt set is whole: the answers would not match it
    examples = _answers(target, launch, f"{recipe.name}-written", [[p] for p in prompts], wdir, gen_cfg, shards, generate, emit,
                        "written prompts", required=False)
    if cache:
        _attach_hidden_states(target, launch, examples, wdir, recipe, emit, greedy=False)
    return examples


def _attach_hidden_states(target: Target, launch: Launch, examples: list[dict], data_dir: Path, recipe: Recipe,
                          emit: EventFn, greedy: bool) -> None:
    """Small targets: one forward over the data, stored, instead of one per epoch. One cache per
    target dtype; chunks are keyed by their examples, so it grows with the data."""
    if not examples:  # every prompt was skipped: nothing to cache (the caller says why)
        return
    hidden_dir = data_dir / f"hidden-{target.compute_dtype}".replace("torch.", "")
    emit({"event": "hidden_start", "examples": len(examples), "dir": str(hidden_dir)})
    for attempt in range(2):
        build_hidden_cache(target, examples, hidden_dir, batch_size=recipe.train.batch_size, greedy=greedy,
                           launch=launch, progress=lambda done, total: emit({"event": "hidden", "done": done, "total": total}))
        try:
            attach_hidden(examples, hidden_dir, target.name)
            return
        except DamagedChunk as exc:  # computed again, once
            if attempt:
                raise
            emit({"event": "note", "text": f"{exc.path} is damaged; computing it again"})
            launch.barrier()  # (every process has read it before the main one deletes it)
            launch.main_only(exc.forget)


def _label_counts(examples: list[dict], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) how often each token is a training label (the generated tokens, or for sampled
    answers the target's greedy tokens where known)."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for e in examples:
        labels = e.get("greedy", e["input_ids"])[e["loss_mask"]]
        counts += torch.bincount(labels[labels >= 0], minlength=vocab_size)
    return counts


def set_draft_vocab(drafter: Drafter, examples: list[dict], size: int, keep: torch.Tensor | None = None) -> float:
    """Keep the `size` most frequent target tokens of the training labels as the draft vocabulary, or
    `keep` (V_d,) token ids (a resumed checkpoint's); return their share of the labels."""
    counts = _label_counts(examples, drafter.config.vocab_size)
    top = torch.topk(counts, size).indices.sort().values if keep is None else keep.long().cpu()
    drafter.draft_vocab.copy_(top.to(drafter.draft_vocab.device))
    return float(counts[top].sum()) / max(int(counts.sum()), 1)


def _simulate_held_out(target: Target, out: Path, held: list[dict], recipe: Recipe) -> dict[str, Any]:
    """Greedy tokens per step of the final drafter at the recipe's beam shape on every held-out
    answer, from the greedy data and cached hidden states alone (simulate.py: no target pass).
    Answers are cut to the bench's length: repetition, which lookup beams feed on, grows with it."""
    from ..simulate import simulate_greedy

    drafter = Drafter.load(out, map_location=target.device).attach(target.embed_weight, target.lm_head_weight)
    b = recipe.beam
    n = recipe.eval.bench_max_new_tokens
    sim = simulate_greedy(drafter, held, b.width, b.length, b.lookup, b.lookup_length, max_new_tokens=n,
                          datastore_beams=b.datastore, tree_nodes=b.nodes)
    return {"beam_width": b.width, "beam_length": b.length, "lookup_beams": b.lookup,
            "lookup_length": b.lookup_length, "datastore_beams": b.datastore, "tree_nodes": b.nodes,
            "max_new_tokens": n, **sim.to_dict()}


def _held_out_bench(target: Target, out: Path, held_convs: list[list[str]], recipe: Recipe, emit: EventFn) -> dict[str, Any]:
    from ..bench import BenchConfig, run_bench
    from ..decode import Generator

    drafter = Drafter.load(out, map_location=target.device).to(dtype=target.compute_dtype)
    gen = Generator(target, drafter)
    held = held_convs[: recipe.eval.bench_prompts]
    systems = [recipe.data.system or getattr(c, "system", None) for c in held]
    prompts = [target.encode_chat(c[0], system=s) for c, s in zip(held, systems)]
    cfg = recipe.beam.decode_config(max_new_tokens=recipe.eval.bench_max_new_tokens)
    emit({"event": "bench_start", "prompts": len(prompts)})
    result = run_bench(gen, prompts, BenchConfig(cfg, warmup=True, hf_baseline=False),
                       progress=lambda done, total, label: emit({"event": "bench", "done": done, "total": total}))
    emit({"event": "bench_done", "tokens_per_step": result["redraft"]["tokens_per_step"], "speedup": result["speedup"]})
    # As bench's JSON: the run's system prompt (data.system), and how many prompts sent their own instead.
    own = 0 if recipe.data.system else sum(s is not None for s in systems)
    return {"system": recipe.data.system or None, "prompt_systems": own, **result}
