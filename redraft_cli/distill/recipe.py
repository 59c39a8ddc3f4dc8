"""Distillation recipes: YAML files that map onto one dataclass per section.

A recipe names the target, where prompts come from and how the target
answers them (self-distillation), the drafter's shape, the optimiser and
schedule, evaluation, and the recommended beam shape. Defaults live here
only; the CLI's flags override fields after the YAML is read.

    name: smollm2-135m
    target: {model: smollm2-135m, dtype: float32, quantize: none}
    data: {source: builtin, num_prompts: 2736, held_out: 48, max_new_tokens: 256, temperature: 0.0}
    drafter: {head: tied, num_layers: 2, predict_tokens: 4, context_window: 0, init_from: null}
    train: {epochs: 2, batch_size: 8, lr: 1.0e-3, warmup_ratio: 0.1}
    beam: {width: 4, length: 5}
"""

from __future__ import annotations

import dataclasses
import math
import os
import numbers
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..chat_templates import resolve_template
from ..errors import BadInputError, python_scalar

if TYPE_CHECKING:  # (imported when called: decode loads torch)
    from ..decode import DecodeConfig


@dataclass
class TargetSection:
    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "auto"
    quantize: str = "none"
    chat_template: str | None = None  # a named template ("vicuna"), a Jinja file or Jinja text, for tokenizers without one

    def __post_init__(self) -> None:
        if self.chat_template is not None:
            if not isinstance(self.chat_template, str):
                raise BadInputError("target.chat_template must be a template name, a Jinja file or Jinja text")
            try:
                resolve_template(self.chat_template)
            except BadInputError as exc:
                raise BadInputError(f"target.chat_template: {exc}") from exc


@dataclass
class DataSection:
    """source: 'builtin', a prompt file (bench's formats), or a Hugging Face dataset name."""

    source: str = "builtin"
    num_prompts: int | None = None  # None: all
    held_out: int = 48  # conversations kept out of training for evaluation
    system: str | None = None
    max_new_tokens: int = 256
    max_prompt_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    gen_batch_size: int = 16
    shard_size: int = 64
    seed: int = 0
    cache_hidden: bool = False  # cache the target's hidden states on disk (small targets)
    # More answers per training conversation, sampled, each labelled with the target's greedy token at
    # every position: new contexts near the target's own answers, cheaper than new prompts.
    sampled_answers: int = 0  # per training conversation (0: greedy answers only)
    sampled_prompts: int | None = None  # only the first N training conversations get them (None: all)
    sampled_temperature: float = 0.7
    sampled_top_p: float = 0.95
    sampled_max_new_tokens: int | None = None  # None: max_new_tokens
    # Prompts the target writes itself (written.py), answered like the others: more varied conversations.
    written_prompts: int = 0
    written_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.sampled_answers < 0:
            raise BadInputError(f"data.sampled_answers must be >= 0, got {self.sampled_answers}")
        if self.sampled_prompts is not None and self.sampled_prompts < 1:
            raise BadInputError(f"data.sampled_prompts must be >= 1 (or null: every training conversation), got "
                                f"{self.sampled_prompts}")
        if self.sampled_answers and not self.sampled_temperature > 0:
            raise BadInputError("data.sampled_temperature must be > 0 (the greedy answer is there already)")
        if self.written_prompts < 0:
            raise BadInputError(f"data.written_prompts must be >= 0, got {self.written_prompts}")
        if self.written_prompts and not self.written_temperature > 0:
            raise BadInputError(f"data.written_temperature must be > 0 (the target samples the prompts it writes), "
                                f"got {self.written_temperature}")


@dataclass
class DrafterSection:
    head: str = "tied"
    num_layers: int = 2
    predict_tokens: int = 4
    draft_vocab_size: int | None = None
    context_window: int = 0  # > 0: the head attends over the last N positions (context_attention.py)
    init_from: str | None = None  # a drafter directory to start from (same shape; context attention may be new)
    weight_storage: str = "float"  # the final drafter on disk: float (as trained) | bfloat16 | int8 (checkpoints stay float)

    def __post_init__(self) -> None:
        if self.weight_storage not in ("float", "bfloat16", "int8"):
            raise BadInputError(f"drafter.weight_storage must be float, bfloat16 or int8, got {self.weight_storage!r}")
        if self.context_window < 0:
            raise BadInputError(f"drafter.context_window must be >= 0, got {self.context_window}")


@dataclass
class TrainSection:
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    max_seq_len: int = 1024
    positions_per_sequence: int = 64  # drafter positions sampled per sequence per step
    kl_weight: float = 0.0  # 0: cross-entropy on the target's tokens only
    dropout: float = 0.0  # on the drafter's input and block branches, while training (against overfitting)
    freeze_init: bool = False  # with drafter.init_from: train only what it lacked (new draft-vocabulary rows, a new block)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise BadInputError(f"train.dropout must be in [0, 1), got {self.dropout}")
        if self.freeze_init and self.weight_decay:  # AdamW would still shrink the frozen rows of a partly new tensor
            raise BadInputError("train.freeze_init needs train.weight_decay 0")
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0


@dataclass
class EvalSection:
    bench_prompts: int = 8
    bench_max_new_tokens: int = 64


@dataclass
class BeamSection:
    width: int = 4
    length: int = 5
    lookup: int = 0  # recommended context-lookup beams beside the drafted ones
    lookup_length: int = 0  # their length, counting g0 (0: the beam length)
    datastore: int = 0  # recommended datastore beams (lookup_length long); distill always saves the datastore
    nodes: int = 0  # recommended node budget: verify the N most likely drafted tokens of the search (0: every beam)

    def __post_init__(self) -> None:
        """Fail on an impossible shape when the recipe loads, not after training."""
        try:
            self.decode_config()
        except BadInputError as exc:  # named by the recipe's fields, not bench's flags
            message = str(exc)
            for flag, name in (("--beam-width", "width"), ("--beam-length", "length"), ("--lookup-length", "lookup_length"),
                               ("--lookup", "lookup"), ("--datastore", "datastore"), ("--nodes", "nodes"),
                               ("beam width", "width"), ("beam length", "length")):
                message = message.replace(flag, f"beam.{name}")
            raise BadInputError(message) from exc

    def fit_to(self, predict_tokens: int, context_window: int = 0) -> str | None:
        """Shorten the recommended beams to what a drafter predicting `predict_tokens` tokens learned,
        and, for a drafter with context attention over `context_window` positions, to that window.

        A beam of length L drafts L - 1 tokens after g0; positions past `predict_tokens` were never
        trained, so the recommended length becomes predict_tokens + 1 and the node budget at most
        width x (length - 1). No beam, drafted or copied, may be longer than the context window
        (decoding refuses it). Returns a one-line note when it changed anything, else None."""
        before = self._label()
        longest = min(predict_tokens + 1, context_window or predict_tokens + 1)
        self.length = min(self.length, longest)
        self.nodes = min(self.nodes, self.width * (self.length - 1))
        if context_window and self.lookup_length > context_window:
            self.lookup_length = context_window if context_window >= 2 else 0  # (0: as long as the beams)
        after = self._label()
        if after == before:
            return None
        why = f"predicts {predict_tokens} token(s)" + (f" and attends over {context_window} positions"
                                                       if context_window else "")
        return f"the drafter {why}, so its recommended beam shape is {after} (the recipe said {before})"

    def _label(self) -> str:
        return (f"{self.width}x{self.length}" + (f" --nodes {self.nodes}" if self.nodes else "")
                + (f" --lookup {self.lookup}" if self.lookup else "") + (f" --datastore {self.datastore}" if self.datastore else "")
                + (f" --lookup-length {self.lookup_length}" if self.lookup_length and (self.lookup or self.datastore) else ""))

    def decode_config(self, **kwargs: Any) -> "DecodeConfig":
        """This shape as decoding settings (greedy unless kwargs say otherwise)."""
        from ..decode import DecodeConfig

        return DecodeConfig(beam_width=self.width, beam_length=self.length, lookup_beams=self.lookup,
                            lookup_length=self.lookup_length, datastore_beams=self.datastore, tree_nodes=self.nodes,
                            **kwargs)


@dataclass
class Recipe:
    name: str = "custom"
    description: str = ""
    target: TargetSection = field(default_factory=TargetSection)
    data: DataSection = field(default_factory=DataSection)
    drafter: DrafterSection = field(default_factory=DrafterSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    beam: BeamSection = field(default_factory=BeamSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in fields(Recipe)}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise BadInputError(f"recipe section {where!r} must be a mapping")
    known = {f.name: str(f.type) for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BadInputError(f"recipe section {where!r} has unknown field(s) {unknown}; known: {sorted(known)}")
    for name, value in data.items():  # before the section's own checks compare them
        _check_type(where, name, value, known[name])
    return cls(**data)


SECTION_TYPES = {"target": TargetSection, "data": DataSection, "drafter": DrafterSection, "train": TrainSection,
                 "eval": EvalSection, "beam": BeamSection}


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    if not isinstance(data, dict):
        raise BadInputError("a recipe must be a YAML mapping")
    section_types = SECTION_TYPES
    unknown = sorted(set(data) - set(section_types) - {"name", "description"})
    if unknown:
        raise BadInputError(f"recipe has unknown section(s) {unknown}")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise BadInputError(f"recipe {key} must be a string, got {_as_yaml(data[key])}")
    kwargs = {k: _build(cls, data.get(k), k) for k, cls in section_types.items()}
    recipe = Recipe(name=data.get("name", "custom"), description=data.get("description", ""), **kwargs)
    check_recipe(recipe)
    return recipe


# A recipe's name names its data folder and its default --out (drafters/NAME): one path component.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def safe_name(text: str) -> str:
    """A recipe name made from a model id or path (its last part, other characters as '-')."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "-", text.rstrip("/\\").replace("\\", "/").split("/")[-1]).lstrip("._+-")[:100]
    return name or "custom"


def _type_ok(value: Any, annotation: str) -> bool:
    """Whether value fits a field annotated `annotation` ("int", "float", "str | None", ...); an int
    fits a float field, a bool fits only a bool field."""
    kinds = {k.strip() for k in annotation.split("|")}
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return bool(kinds & {"int", "float"})
    if isinstance(value, float):
        return "float" in kinds
    return isinstance(value, str) and "str" in kinds


def _as_yaml(value: Any) -> str:
    """A recipe value as its YAML spells it (true, null), for messages about it; other values as repr
    (a long one cut short)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def _check_type(section: str, name: str, value: Any, annotation: str) -> None:
    if not _type_ok(value, annotation):
        kinds = {"int": "a whole number", "float": "a number", "str": "a string", "bool": "true or false"}
        wanted = " or ".join(kinds.get(k.strip(), "null") for k in annotation.split("|"))
        raise BadInputError(f"{section}.{name} must be {wanted}, got {_as_yaml(value)}{_flag(section, name)}")


def _flag(section: str, name: str) -> str:
    """' (--flag)' for a field that `redraft distill` also takes as a flag, else ''."""
    return f" ({FLAGS[section, name]})" if (section, name) in FLAGS else ""


def _check_types(recipe: Recipe) -> None:
    for section in SECTION_TYPES:
        part = getattr(recipe, section)
        known = {f.name for f in fields(part)}
        for name in vars(part):  # (set from Python: `recipe.drafter.dropout = 0.1` would change nothing)
            if name not in known:
                home = [s for s, kind in SECTION_TYPES.items() if name in {f.name for f in fields(kind)}]
                raise BadInputError(f"{section} has no field {name!r}" + (f" (it is {home[0]}.{name})" if home else
                                    f"; its fields: {', '.join(sorted(known))}"))
        for f in fields(part):
            # Python's own values in place of numpy's (np.int64, np.str_), a Fraction's or a str subclass's:
            # recipe.yaml and the reports are written from them.
            value = python_scalar(getattr(part, f.name))
            if isinstance(value, numbers.Real) and not isinstance(value, (int, float, bool)):
                value = int(value) if isinstance(value, numbers.Integral) else float(value)
            elif isinstance(value, str) and type(value) is not str:
                value = str(value)
            object.__setattr__(part, f.name, value)
            _check_type(section, f.name, value, str(f.type))


# (section, field): (smallest value, whether the smallest value itself is allowed); None passes where the field allows it.
_LOWER_BOUNDS: dict[tuple[str, str], tuple[float, bool]] = {
    ("data", "num_prompts"): (1, True), ("data", "held_out"): (0, True), ("data", "max_new_tokens"): (1, True),
    ("data", "max_prompt_tokens"): (1, True), ("data", "temperature"): (0, True), ("data", "top_p"): (0, False),
    ("data", "gen_batch_size"): (1, True), ("data", "shard_size"): (1, True), ("data", "seed"): (0, True),
    ("data", "sampled_max_new_tokens"): (1, True),
    ("drafter", "num_layers"): (0, True), ("drafter", "predict_tokens"): (1, True),
    ("drafter", "draft_vocab_size"): (1, True),
    ("train", "epochs"): (0, False), ("train", "max_steps"): (1, True), ("train", "batch_size"): (1, True),
    ("train", "grad_accum"): (1, True), ("train", "lr"): (0, False), ("train", "weight_decay"): (0, True),
    ("train", "warmup_ratio"): (0, True), ("train", "max_seq_len"): (2, True),
    ("train", "positions_per_sequence"): (1, True), ("train", "kl_weight"): (0, True),
    ("train", "eval_every"): (1, True), ("train", "save_every"): (1, True), ("train", "seed"): (0, True),
    ("eval", "bench_prompts"): (0, True), ("eval", "bench_max_new_tokens"): (1, True),
    ("data", "sampled_temperature"): (0, False), ("data", "sampled_top_p"): (0, False),
    ("data", "written_temperature"): (0, False), ("data", "sampled_answers"): (0, True),
    ("data", "sampled_prompts"): (1, True), ("data", "written_prompts"): (0, True),
    ("drafter", "context_window"): (0, True),
}
_UPPER_BOUNDS = {("data", "top_p"): 1.0, ("train", "warmup_ratio"): 1.0, ("data", "sampled_top_p"): 1.0,
                 # a drafter is a small head: 20,000 blocks filled the memory before any message
                 ("drafter", "num_layers"): 64, ("drafter", "predict_tokens"): 63,  # (beams of at most 64 tokens)
                 ("data", "seed"): 2**32 - 1, ("train", "seed"): 2**32 - 1}  # (seeds derived from them stay 64-bit)
INT_MAX = 2**63 - 1  # (torch's seeds and counts are 64-bit)
# The fields that `redraft distill` also takes as a flag: an error about one names both.
FLAGS = {("data", "source"): "--data", ("data", "num_prompts"): "--num-prompts", ("data", "held_out"): "--held-out",
         ("data", "max_new_tokens"): "--max-new-tokens", ("train", "max_steps"): "--max-steps",
         ("train", "epochs"): "--epochs", ("train", "batch_size"): "--batch-size", ("train", "lr"): "--lr",
         ("train", "dropout"): "--dropout", ("drafter", "num_layers"): "--num-layers",
         ("drafter", "predict_tokens"): "--predict-tokens", ("drafter", "draft_vocab_size"): "--draft-vocab",
         ("drafter", "context_window"): "--context-window", ("data", "sampled_answers"): "--sampled-answers",
         ("data", "written_prompts"): "--written-prompts", ("data", "system"): "--system"}
MIXED_PRECISION = ("no", "bf16", "fp16")


def check_recipe(recipe: Recipe) -> None:
    """BadInputError, naming the field, for any value that would only fail (or be ignored) after the model loads.
    The same checks whether the recipe came from YAML, flags or Python code that changed its fields after
    `load_recipe` (each section's own checks run again)."""
    if not isinstance(recipe, Recipe):
        raise BadInputError(f"a recipe must be a Recipe (load_recipe(NAME_OR_PATH)), got {type(recipe).__name__}")
    for section, kind in SECTION_TYPES.items():
        if not isinstance(getattr(recipe, section, None), kind):
            raise BadInputError(f"recipe.{section} must be {'an' if kind.__name__[0] in 'AEIOU' else 'a'} {kind.__name__}, got "
                                f"{_as_yaml(getattr(recipe, section, None))}")
    if not isinstance(recipe.name, str) or not NAME.fullmatch(recipe.name):
        raise BadInputError(f"recipe name must be letters, digits, '.', '_', '+' or '-' (it names the data folder and "
                            f"drafters/NAME), starting with a letter or digit, got {recipe.name!r}")
    _check_types(recipe)
    for section, name in (("target", "model"), ("data", "source")):
        if not getattr(getattr(recipe, section), name).strip():
            raise BadInputError(f"{section}.{name} is empty" + (" (--data needs a prompt file, 'builtin' or hf://owner/"
                                                                  "name/file.json)" if name == "source" else ""))
    if recipe.data.source.strip() == "-":  # generation resumes shard by shard and reads its prompts again
        raise BadInputError("data.source '-' (standard input) cannot be read again when distill resumes; save the "
                            "prompts to a file and give its path")
    for (section, name), (low, inclusive) in _LOWER_BOUNDS.items():
        part = getattr(recipe, section)
        value = getattr(part, name)
        if value is None and "None" in str(next(f.type for f in fields(part) if f.name == name)):
            continue  # an optional field left unset
        # (a whole number is not tested with math.isfinite: one of 400 digits overflows a float)
        upper = _UPPER_BOUNDS.get((section, name), INT_MAX if isinstance(value, int) else None)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (isinstance(value, int)
                                                                                or math.isfinite(value))
        ok = ok and (value >= low if inclusive else value > low) and (upper is None or value <= upper)
        if not ok:
            bound = f">= {low}" if inclusive else f"> {low}"
            shown_upper = upper is not None and ((section, name) in _UPPER_BOUNDS or value > upper)  # (not 2**63 always)
            raise BadInputError(f"{section}.{name} must be a finite number {bound}"
                                + (f" and <= {upper}" if shown_upper else "") + f", got {_as_yaml(value)}"
                                + _flag(section, name))
    for section in SECTION_TYPES:  # each section's own checks, for values set after it was made
        dataclasses.replace(getattr(recipe, section))
    d = recipe.drafter
    if d.head not in ("own", "tied"):
        raise BadInputError(f"drafter.head (--head) must be own or tied, got {_as_yaml(d.head)}")
    if recipe.train.freeze_init and not d.init_from:
        raise BadInputError("train.freeze_init needs a drafter to start from (--init-from or drafter.init_from)")
    if recipe.train.mixed_precision not in MIXED_PRECISION:
        raise BadInputError(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {recipe.train.mixed_precision!r}")
    from ..loading import TargetSpec

    t = recipe.target
    try:
        TargetSpec(model=t.model, dtype=t.dtype, device=t.device, quantize=t.quantize)
    except BadInputError as exc:  # "--dtype must be ..." -> "target.dtype (--dtype) must be ..."
        raise BadInputError(re.sub(r"--(dtype|device|quantize)\b", r"target.\1 (--\1)", str(exc))) from exc
    if recipe.drafter.context_window == 1:
        raise BadInputError("drafter.context_window 1 keeps beams to g0 alone (a beam may not outrun the window), so the "
                            "drafter could never draft; use 2 or more, or 0 for no context attention")
    vocab, width = recipe.drafter.draft_vocab_size, recipe.beam.width
    if vocab is not None and vocab < width:
        raise BadInputError(f"drafter.draft_vocab_size {vocab} is smaller than beam.width {width}: each beam needs its "
                            f"own token")


def builtin_recipes() -> dict[str, Path]:
    """Recipe name -> YAML path, from the project's recipes/ folder (repo) or the package copy."""
    found: dict[str, Path] = {}
    repo = Path(__file__).resolve().parents[2] / "recipes"
    packaged = Path(str(resources.files("redraft_cli") / "data" / "recipes"))
    for folder in (packaged, repo):
        if folder.is_dir():
            for p in sorted(folder.glob("*.yaml")):
                found[p.stem] = p
    return found


def load_recipe(name_or_path_or_model: str | os.PathLike) -> Recipe:
    """A recipe name (recipes/NAME.yaml), a YAML path, or a model id/path with default settings."""
    if isinstance(name_or_path_or_model, os.PathLike):
        name_or_path_or_model = os.fspath(name_or_path_or_model)
    if not isinstance(name_or_path_or_model, str):
        raise BadInputError(f"a recipe is a name, a YAML path or a model id/path, got "
                            f"{type(name_or_path_or_model).__name__}")
    arg = name_or_path_or_model
    if not arg.strip():
        raise BadInputError(f"the recipe is {'empty' if not arg else 'only spaces'}: give a recipe name (" +
                            ", ".join(sorted(builtin_recipes())) + "), a YAML path or a model id/path")
    path = Path(arg)
    if arg.endswith((".yaml", ".yml")):
        if path.is_dir():
            raise BadInputError(f"recipe {path} is a directory, not a YAML file")
        if not path.is_file():
            raise BadInputError(f"recipe file not found: {path}")
        return _read_yaml(path)
    recipes = builtin_recipes()
    if arg in recipes:
        return _read_yaml(recipes[arg])
    if path.expanduser().is_file() and path.suffix.lower() != ".gguf":
        raise BadInputError(f"{arg} is a file, not a recipe (a name or a .yaml file) or a model (a hub id, a folder or "
                            f"a .gguf file); a prompt file goes to --data (redraft distill smollm2-135m --data {arg})")
    recipe = Recipe(name=safe_name(arg))
    recipe.target.model = arg
    return recipe


class _RecipeLoader(yaml.SafeLoader):
    """YAML as a recipe's author means it: `1e-3` is a number (YAML 1.2; PyYAML's 1.1 rules read an
    exponent without a dot as a string), and a key given twice is an error (the last one silently won)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:  # (`? [a, b]`: a list as a key)
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, not a {type(key).__name__}",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_RecipeLoader.add_implicit_resolver(  # (after PyYAML's own: only what they leave a string, 1e-3 and 2E5)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _read_yaml(path: Path) -> Recipe:
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise BadInputError(f"recipe {path}{where} is not valid YAML: {what}") from exc
    except UnicodeDecodeError as exc:
        raise BadInputError(f"recipe {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                            f"{exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise BadInputError(f"cannot read recipe {path}: {exc}") from exc
    try:
        return recipe_from_dict(_beside(data, path.parent))
    except TypeError as exc:
        raise BadInputError(f"invalid recipe {path}: {exc}") from exc


# The fields that may name a file or folder: (section, field, whether it names a folder rather than a file).
_PATH_FIELDS = (("data", "source", False), ("target", "model", None), ("target", "chat_template", False),
                ("drafter", "init_from", True))


def _not_paths() -> set[str]:
    from ..chat_templates import NAMED
    from ..loading import EMBEDDED

    return {"builtin", "-", *NAMED, *EMBEDDED}


def _beside(data: Any, folder: Path) -> Any:
    """`data` (a recipe's YAML) with each relative path that names something in `folder` (the recipe's
    own folder) made absolute, so that a recipe and the files beside it work from any folder, as a
    config file's paths do. A value that names nothing there (a hub id, 'builtin', Jinja text, a path
    from the current folder as before) is left as it is. Flags (--data ...) stay relative to the
    current folder."""
    if not isinstance(data, dict):
        return data
    data, not_paths = dict(data), _not_paths()
    for section, name, is_dir in _PATH_FIELDS:
        part = data.get(section)
        value = part.get(name) if isinstance(part, dict) else None
        if not isinstance(value, str) or not value.strip() or "\n" in value or value.strip() in not_paths:
            continue
        try:
            candidate = Path(value.strip()).expanduser()
            if candidate.is_absolute():
                continue
            candidate = folder / candidate
            found = candidate.is_dir() if is_dir else candidate.is_file() if is_dir is False else candidate.exists()
        except (OSError, RuntimeError, ValueError):  # (a name too long for a path, a NUL byte: not a path)
            continue
        if found:
            data[section] = {**part, name: str(candidate.resolve())}
    return data
