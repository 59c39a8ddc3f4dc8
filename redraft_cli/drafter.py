"""The recurrent draft head (DESIGN section 2), read top to bottom.

Notation: H = target hidden size, V = vocabulary size, E = the target's own
(frozen, shared, never saved here) input embedding table, h = the target's
last-layer hidden state after its final norm.

    s_0 = 0
    s_k = SiLU(rnn_w(E(x_{k-1})) + rnn_u(s_{k-1}))        rnn_u carries the bias
    z_k = concat(h, s_k)                                     (..., 2H)
    z  <- z + SiLU(lm_head[i].linear(z))   for i < N          residual blocks
    logits = lm_head[N](z)                                   head "own":  2H -> V
           = target_lm_head(lm_head[N](z))                   head "tied": 2H -> H -> V

Step k sees h (position t), g0 = x_0 (the target's token t+1) and drafted
tokens, and predicts token t+1+k; it never predicts t+1.

Checkpoints are `config.json` + `model.safetensors` in the layout of the
reference implementation and TensorRT-LLM's converter (`rnn_w.weight`,
`rnn_u.weight`, `rnn_u.bias`, `lm_head.{i}.linear.{weight,bias}`,
`lm_head.{N}.weight`), with redraft's own fields beside them.
An optional `datastore.safetensors` beside them holds the target's answers
from the training data, for datastore beams (datastore.py).

A reduced draft vocabulary (`draft_vocab`, int64 (V_d,)) restricts scoring to
V_d token ids; beam search then works in that index space and maps back with
`draft_vocab[idx]`. Losslessness does not depend on it: the target verifies.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .context_attention import ContextAttention, ContextCache
from .datastore import DATASTORE_NAME, Datastore
from .errors import BadInputError, DrafterLoadError, DrafterMismatchError, check_field_types
from .files import PACKAGE_DIR, atomic_write, file_mode, inside_package

if TYPE_CHECKING:  # decode.py imports this module
    from .decode import DecodeConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "recurrent_drafting_drafter"
HEAD_KINDS = ("own", "tied")
MAX_CONFIG_SIZE = 1024  # the most predict_tokens / beam_width / beam_length a config.json may say
WEIGHT_STORAGE = ("float", "int8")
# The recommended decoding settings of a drafter (top level: batch 1; `batch_shapes`: larger batches;
# `device_shapes`: batch 1 on an accelerator, where a tree node costs far less than on a CPU).
SHAPE_KEYS = ("beam_width", "beam_length", "lookup_beams", "lookup_length", "datastore_beams", "tree_nodes")
SHAPE_DEVICES = ("cuda", "mps")
SCALE_SUFFIX = "_scale"  # int8 storage: NAME int8 (rows, cols) + NAME_scale float32 (rows, 1), for every weight matrix


@dataclass
class DrafterConfig:
    """Shape and provenance of a drafter. `exit_dim` (= 2H) is derived."""

    hidden_size: int
    vocab_size: int
    num_draft_layers: int = 2
    head: str = "tied"
    predict_tokens: int = 4  # drafter steps trained (= beam_length - 1)
    target_model: str | None = None
    beam_width: int = 4  # recommended beam shape (sweep --save-best writes these)
    beam_length: int = 5
    lookup_beams: int = 0  # recommended extra context-lookup beams (lookup.py)
    lookup_length: int = 0  # their longest copy, counting g0 (0: beam_length); datastore beams' too
    datastore_beams: int = 0  # recommended extra beams from the datastore (datastore.py), when the drafter has one
    tree_nodes: int = 0  # recommended node budget for the beam search (beam_search.py); 0: every beam
    context_window: int = 0  # > 0: attention over the last N positions feeds the head (context_attention.py)
    context_heads: int = 0  # its attention heads (0: head size 64 where it divides H)
    weight_storage: str = "float"  # how model.safetensors stores weight matrices: float | int8 (a scale per row)
    draft_vocab_size: int | None = None  # None: the full vocabulary
    # Recommended shapes for batches: {"4": {"tree_nodes": 3, ...}} (sweep --batch-size 4 --save-best);
    # a batch of B rows takes the entry of the largest saved size <= B over the batch-1 fields above.
    batch_shapes: dict[str, dict[str, int]] = field(default_factory=dict)
    # Recommended shapes at batch 1 on an accelerator: {"cuda": {"beam_width": 8, ...}} (sweep --save-best
    # run there), over the batch-1 fields above, which are the CPU's.
    device_shapes: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_field_types(self)  # a Python caller's DrafterConfig(hidden_size="576"); config.json is checked on load
        for name in ("target_model", "draft_vocab_size"):
            value, kind = getattr(self, name), str if name == "target_model" else int
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise BadInputError(f"DrafterConfig.{name} must be {kind.__name__} or None, got {value!r}")
        if self.head not in HEAD_KINDS:
            raise DrafterLoadError(f"drafter head must be one of {HEAD_KINDS}, got {self.head!r}")
        if self.hidden_size <= 0 or self.vocab_size <= 0 or self.num_draft_layers < 0:
            raise DrafterLoadError("drafter config has non-positive sizes")
        if self.weight_storage not in WEIGHT_STORAGE:
            raise DrafterLoadError(f"weight_storage must be one of {WEIGHT_STORAGE}, got {self.weight_storage!r}")
        if self.context_window < 0:
            raise DrafterLoadError(f"context_window must be >= 0, got {self.context_window}")
        for name in ("predict_tokens", "beam_width", "beam_length"):
            if not 1 <= getattr(self, name) <= MAX_CONFIG_SIZE:
                raise DrafterLoadError(f"drafter config: {name} must be from 1 to {MAX_CONFIG_SIZE:,}, "
                                       f"got {getattr(self, name)}")
        if min(self.lookup_beams, self.lookup_length, self.datastore_beams, self.tree_nodes) < 0:
            raise DrafterLoadError("drafter config has negative lookup_beams/lookup_length/datastore_beams/tree_nodes")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise DrafterLoadError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}")
        self._check_batch_shapes()
        if self.context_window and not self.context_heads:
            H = self.hidden_size
            self.context_heads = next((H // d for d in (64, 32, 128, 16, 2) if H % d == 0), 0)
        if self.context_window:
            d = self.hidden_size // max(1, self.context_heads)
            if self.context_heads <= 0 or self.hidden_size % self.context_heads or d % 2:
                raise DrafterLoadError(f"context_heads {self.context_heads} must split hidden size "
                                       f"{self.hidden_size} into heads of an even size")

    def _check_batch_shapes(self) -> None:
        for name, what in (("batch_shapes", "batch sizes"), ("device_shapes", "devices")):
            bad = f"invalid drafter config: redraft.{name}"
            if not isinstance(getattr(self, name), dict):
                raise DrafterLoadError(f"{bad} must map {what} to shapes, got {getattr(self, name)!r}")
        for size in self.batch_shapes:
            if not (isinstance(size, str) and size.isdigit() and size == str(int(size)) and int(size) >= 2):
                raise DrafterLoadError(f"invalid drafter config: redraft.batch_shapes: batch size {size!r} must be "
                                       f"an integer >= 2 (as a string)")
        for device in self.device_shapes:
            if device not in SHAPE_DEVICES:
                raise DrafterLoadError(f"invalid drafter config: redraft.device_shapes: device {device!r} must be "
                                       f"one of {', '.join(SHAPE_DEVICES)} (the batch-1 fields are the CPU's)")
        for name, entries in (("batch_shapes", self.batch_shapes), ("device_shapes", self.device_shapes)):
            bad = f"invalid drafter config: redraft.{name}"
            self._check_shapes(bad, entries)

    @staticmethod
    def _check_shapes(bad: str, entries: dict[str, Any]) -> None:
        for size, shape in entries.items():
            if not isinstance(shape, dict) or any(k not in SHAPE_KEYS for k in shape):
                raise DrafterLoadError(f"{bad}[{size!r}] must map some of {', '.join(SHAPE_KEYS)} to integers")
            for k, v in shape.items():
                low = 1 if k in ("beam_width", "beam_length") else 0
                if not _fits(v, "int") or v < low:
                    raise DrafterLoadError(f"{bad}[{size!r}].{k} must be an integer >= {low}, got {v!r}")

    def shape_for(self, batch_size: int = 1, device: str | None = None) -> dict[str, int]:
        """The recommended settings (SHAPE_KEYS) for batches of `batch_size` rows on `device` (a
        device type: cpu, cuda, mps; None: the CPU's): the batch-1 fields, overridden at batch 1 by
        the device's saved entry, at larger batches by that of the largest batch size <= batch_size."""
        shape = {k: getattr(self, k) for k in SHAPE_KEYS}
        if batch_size == 1 and device in self.device_shapes:
            shape.update(self.device_shapes[device])
        sizes = [int(s) for s in self.batch_shapes if int(s) <= batch_size]
        if sizes:
            shape.update(self.batch_shapes[str(max(sizes))])
        return shape

    @property
    def exit_dim(self) -> int:
        return 2 * self.hidden_size

    def to_json_dict(self) -> dict[str, Any]:
        """The interoperable fields first, then redraft's own."""
        ours = asdict(self)
        extra = ours.pop("extra")
        for name in ("batch_shapes", "device_shapes"):
            if not ours[name]:
                del ours[name]
        return {
            "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "exit_dim": self.exit_dim,
            "num_draft_layers": self.num_draft_layers,
            "rnn": True,
            "redraft": {k: v for k, v in ours.items() if k not in ("vocab_size", "hidden_size", "num_draft_layers")},
            **extra,
        }

    @classmethod
    def from_json_dict(cls, data: dict[str, Any]) -> "DrafterConfig":
        if not isinstance(data, dict):
            raise DrafterLoadError(f"drafter config.json holds {type(data).__name__}, not an object of fields")
        if "hidden_size" not in data or "vocab_size" not in data:
            raise DrafterLoadError("drafter config.json lacks hidden_size/vocab_size")
        if data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise DrafterLoadError(f"config.json is a {data.get('model_type')!r}, not a {MODEL_TYPE!r}")
        if data.get("rnn", True) is not True:
            raise DrafterLoadError(f"only recurrent drafters (rnn: true) are supported, got rnn {data['rnn']!r}")
        coverage = data.get("draft_vocab_coverage")
        if coverage is not None and not (isinstance(coverage, (int, float)) and not isinstance(coverage, bool)
                                         and 0 <= coverage <= 1):
            raise DrafterLoadError(f"invalid drafter config: draft_vocab_coverage must be a share from 0 to 1, "
                                   f"got {coverage!r}")
        ours = data.get("redraft", {})
        if not isinstance(ours, dict):
            raise DrafterLoadError(f"invalid drafter config: 'redraft' must be a mapping, got {type(ours).__name__}")
        types = {f.name: str(f.type) for f in fields(cls)}
        kwargs = {k: v for k, v in ours.items() if k in types and k != "extra"}
        for k, v in kwargs.items():
            if not _fits(v, types[k]):
                kind = types[k].replace(" | None", " or null")
                raise DrafterLoadError(f"invalid drafter config: redraft.{k} must be {kind}, got {v!r}")
        # A checkpoint from the reference implementation has no "redraft" block: own head.
        kwargs.setdefault("head", "own")
        reserved = {"model_type", "vocab_size", "hidden_size", "exit_dim", "num_draft_layers", "rnn", "redraft"}
        # Sizes are whole numbers in a range a real model has (a garbled 1e20 must not reach an allocation).
        for key, top in (("hidden_size", 1 << 17), ("vocab_size", 1 << 24), ("num_draft_layers", 64)):
            value = data.get(key, 2)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise DrafterLoadError(f"invalid drafter config: {key} must be a whole number from 0 to {top:,}, "
                                       f"got {value!r}")
        hidden = data["hidden_size"]
        if "exit_dim" in data and data["exit_dim"] != 2 * hidden:
            # the reference's field: the MLP's input, [h; e] = 2 x hidden_size
            raise DrafterLoadError(f"invalid drafter config: exit_dim must be 2 x hidden_size = {2 * hidden}, "
                                   f"got {data['exit_dim']!r}")
        try:
            return cls(
                hidden_size=data["hidden_size"],
                vocab_size=data["vocab_size"],
                num_draft_layers=data.get("num_draft_layers", 2),
                extra={k: v for k, v in data.items() if k not in reserved},
                **kwargs,
            )
        except (TypeError, ValueError) as exc:
            raise DrafterLoadError(f"invalid drafter config: {exc}") from exc


def _check_int(name: str, value: Any, low: int | None) -> None:
    """BadInputError unless `value` is an int (not a bool), >= low when low is given."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or (low is not None and value < low):
        shown = repr(value) if isinstance(value, (int, float, str, type(None))) else type(value).__name__
        raise BadInputError(f"{name} must be an int{f' >= {low}' if low is not None else ''}, got {shown}")


def device_kind(method: str, device: Any) -> str:
    """The type (cpu, cuda, mps, ...) of a device given as a str or torch.device; BadInputError else."""
    if not isinstance(device, (str, torch.device)):
        raise BadInputError(f"{method}'s device must be a str or torch.device, got {type(device).__name__}")
    try:
        return torch.device(device).type
    except RuntimeError as exc:
        raise BadInputError(f"{method}'s device {device!r} is not a device (cpu, cuda, cuda:1, mps, ...)") from exc


def _check_draft_vocab(src: Path, ids: torch.Tensor, vocab_size: int) -> None:
    """DrafterLoadError unless a saved draft vocabulary (N,) is distinct token ids of 0..vocab_size-1."""
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise DrafterLoadError(f"drafter {src}: its draft vocabulary is {ids.dtype}, not token ids; its files are damaged")
    if ids.unique().numel() != ids.numel():
        raise DrafterLoadError(f"drafter {src}: its draft vocabulary lists a token id twice; its files are damaged")
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise DrafterLoadError(f"drafter {src}: config.json says vocab_size {vocab_size}, but its draft vocabulary "
                               f"holds token id {int(ids.max())}; its files do not match")
    if ids.numel() and int(ids.min()) < 0:
        raise DrafterLoadError(f"drafter {src}: its draft vocabulary holds a negative token id; its files are damaged")


def _check_path(method: str, path: Any, error: type[BadInputError] = DrafterLoadError) -> None:
    if not isinstance(path, (str, os.PathLike)):
        hint = " (shipped_drafter_dir returns None for a model no drafter ships for)" if path is None else ""
        raise error(f"{method} needs a path to a drafter folder (str or os.PathLike), got {type(path).__name__}"
                    + hint)


def _fits(value: Any, annotation: str) -> bool:
    """Whether a JSON value matches a DrafterConfig field annotation ('int', 'str | None', ...)."""
    kinds = {"int": int, "str": str, "None": type(None), "bool": bool}
    names = [a.strip() for a in annotation.split("|")]
    if any(n not in kinds for n in names):
        return True  # an annotation this check does not know (the `extra` dict): let it through
    return any(isinstance(value, kinds[n]) and not (n == "int" and isinstance(value, bool)) for n in names)


class ResBlock(nn.Module):
    """z <- z + SiLU(linear(z)), width 2H (dropout on the branch while training)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=True)

    def forward(self, z: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        branch = F.silu(self.linear(z))
        return z + (F.dropout(branch, dropout, training=True) if dropout else branch)


class Drafter(nn.Module):
    """The draft head. The target's embedding and LM head are attached, not owned.

    Call `attach(embed_weight, lm_head_weight)` before use; they are held by
    reference, excluded from `state_dict`, and never saved.
    """

    def __init__(self, config: DrafterConfig) -> None:
        if not isinstance(config, DrafterConfig):
            raise BadInputError(f"Drafter needs a DrafterConfig, got {type(config).__name__}; load a saved drafter "
                                f"with Drafter.load(path) or build one with Drafter.for_target(target)")
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.rnn_w = nn.Linear(H, H, bias=False)
        self.rnn_u = nn.Linear(H, H, bias=True)
        out = config.vocab_size if config.head == "own" else H
        if config.head == "own" and config.draft_vocab_size:
            out = config.draft_vocab_size
        blocks: list[nn.Module] = [ResBlock(2 * H) for _ in range(config.num_draft_layers)]
        blocks.append(nn.Linear(2 * H, out, bias=False))
        self.lm_head = nn.ModuleList(blocks)
        # Optional attention over recent positions, replacing h by c (context_attention.py).
        self.context = ContextAttention(H, config.context_window, config.context_heads) if config.context_window else None
        if config.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size, dtype=torch.long))
        else:
            self.draft_vocab = None
        self._embed: torch.Tensor | None = None
        self._head: torch.Tensor | None = None
        # The target's answers from the training data, for datastore beams (datastore.py); saved beside the weights.
        self.datastore: Datastore | None = None
        self.folder: Path | None = None  # the folder it was loaded from or last saved to (resolved): save() may write there
        # Training only (the trainer sets it; never saved): dropout on z and on every block's branch.
        self.dropout = 0.0

    # -- wiring to the target -------------------------------------------------
    def attach(self, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor) -> "Drafter":
        """Share the target's input embedding (V, H) and LM head (V, H) weights."""
        if not isinstance(embed_weight, torch.Tensor) or not isinstance(lm_head_weight, torch.Tensor):
            bad = embed_weight if not isinstance(embed_weight, torch.Tensor) else lm_head_weight
            raise BadInputError(f"Drafter.attach needs the target's embedding and LM head weights (tensors), "
                                f"got {type(bad).__name__}")
        V, H = self.config.vocab_size, self.config.hidden_size
        if tuple(embed_weight.shape) != (V, H):
            raise DrafterMismatchError(
                f"drafter expects a target with vocabulary {V} and hidden size {H}, "
                f"but the target's embedding is {tuple(embed_weight.shape)}"
            )
        if self.config.head == "tied" and tuple(lm_head_weight.shape) != (V, H):
            raise DrafterMismatchError(
                f"tied drafter expects an LM head of shape {(V, H)}, target has {tuple(lm_head_weight.shape)}"
            )
        # Plain attributes, not nn.Module registration: never in state_dict, never moved or saved.
        object.__setattr__(self, "_embed", embed_weight)
        object.__setattr__(self, "_head", lm_head_weight)
        return self

    @property
    def draft_vocab_size(self) -> int:
        return self.config.draft_vocab_size or self.config.vocab_size

    def _head_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(V_d, H) rows of the target's LM head that the tied head scores, in `dtype`.

        The slice (and cast) is a copy of V_d x H values: made once and reused
        while the head, the draft vocabulary and the dtype stay the same
        (re-slicing it per draft step cost more than the projection itself).
        """
        assert self._head is not None, "call attach() first"
        if self.draft_vocab is None and self._head.dtype == dtype and self._head.device == self.rnn_w.weight.device:
            return self._head
        key = (self._head.data_ptr(), self._head._version, dtype, self.rnn_w.weight.device,
               None if self.draft_vocab is None else (self.draft_vocab.data_ptr(), self.draft_vocab._version))
        cached = self.__dict__.get("_head_cache")
        if cached is None or cached[0] != key:
            w = self._head if self.draft_vocab is None else self._head.index_select(0, self.draft_vocab.to(self._head.device))
            cached = (key, w.detach().to(device=self.rnn_w.weight.device, dtype=dtype))  # the head may sit on another GPU
            object.__setattr__(self, "_head_cache", cached)
        return cached[1]

    # -- the model ------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...,) int64 -> (..., H) in the drafter's dtype."""
        assert self._embed is not None, "call attach() first"
        return F.embedding(tokens, self._embed).to(self.rnn_w.weight.dtype)

    def rnn_step(self, state: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
        """state, token_emb: (..., H) -> next state (..., H)."""
        return F.silu(self.rnn_w(token_emb) + self.rnn_u(state))

    def logits(self, h: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Draft logits over the draft vocabulary.

        h: (..., H) context hidden state, broadcastable to state; state: (..., H).
        Returns (..., V_d) in the drafter's dtype.
        """
        h = h.to(state.dtype).expand_as(state)
        z = torch.cat([h, state], dim=-1)  # (..., 2H)
        p = self.dropout if self.training else 0.0
        if p:
            z = F.dropout(z, p, training=True)
        for block in self.lm_head[:-1]:
            z = block(z, p)
        out = self.lm_head[-1](z)
        if self.config.head == "tied":
            out = F.linear(out, self._head_weight(out.dtype))
        return out

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, hidden: torch.Tensor | None = None,
                ids: torch.Tensor | None = None, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits for training.

        h: (B, P, H) hidden states at the drafter positions; tokens: (B, P, K) with
        tokens[..., 0] = g0 and tokens[..., k] the k-th drafted token. Returns
        (B, P, K, V_d): step k+1's logits (predicting token t+2+k) from inputs
        tokens[..., :k+1]. A drafter with context attention also needs the whole
        sequences: hidden (B, T, H), ids (B, T) and pos (B, P), the positions of h;
        it replaces h by c there.
        """
        if self.context is not None:
            if hidden is None or ids is None or pos is None:
                raise ValueError("a drafter with context attention trains on whole sequences (hidden, ids, pos)")
            h = self._contexts(hidden, ids, pos)
        emb = self.embed(tokens)  # (B, T, K, H)
        state = torch.zeros_like(emb[..., 0, :])
        states = []
        for k in range(tokens.shape[-1]):
            state = self.rnn_step(state, emb[..., k, :])
            states.append(state)
        stacked = torch.stack(states, dim=-2)  # (B, T, K, H)
        return self.logits(h.unsqueeze(-2), stacked)

    @torch.no_grad()
    def context_states(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The drafter's context input at every position of known sequences.

        hidden: (B, T, H) the target's hidden states; ids: (B, T) the tokens (the
        token after position j is ids[j+1]; the last position has none and gets
        a pad). Returns (B, T, H): c_t with context attention, else hidden itself.
        """
        if self.context is None:
            return hidden
        B, T, _ = hidden.shape
        return self._contexts(hidden, ids, torch.arange(T, device=hidden.device).expand(B, T))

    def _contexts(self, hidden: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """c at positions pos (B, P) of sequences ids (B, T) with hidden states (B, T, H); the token
        after position j is ids[j+1] (a pad after the last). Returns (B, P, H)."""
        next_emb = self.embed(F.pad(ids[:, 1:], (0, 1)))  # (B, T, H): x_{j+1} at every j
        return self.context(hidden.to(self.rnn_w.weight.dtype), next_emb, pos)

    def context_cache(self, batch: int) -> ContextCache | None:
        """A fresh decoding cache for context attention (None for a plain drafter)."""
        if self.context is None:
            return None
        w = self.rnn_w.weight
        return ContextCache(self.context, batch, w.device, w.dtype)

    # -- construction, save and load -----------------------------------------
    def reset_parameters(self, seed: int = 0) -> "Drafter":
        """Seeded init: small random weights (an untrained drafter)."""
        _check_int("Drafter.reset_parameters's seed", seed, low=None)
        gen = torch.Generator().manual_seed(seed)
        last = f"lm_head.{self.config.num_draft_layers}.weight"
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias") or name == "context.out.weight":
                    p.zero_()  # context attention starts as the identity: c = h
                elif p.dim() == 1:
                    p.fill_(1.0)  # norm scales
                else:
                    # The vocabulary projection starts small: near-uniform drafts, initial loss ~ ln(V).
                    std = (0.1 if name == last else 1.0) / math.sqrt(p.shape[1])
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    @torch.no_grad()
    def scale_token_path(self, embed_weight: torch.Tensor) -> "Drafter":
        """Rescale rnn_w so that rnn_w(E(x)) starts with unit variance, like h's side of z.

        Target embeddings are small (SmolLM2: std 0.14, h has std 1.9), so with a
        plain 1/sqrt(H) init the recurrent state, the drafter's only view of g0
        and its drafted tokens, starts ~10x weaker than h and AdamW spends
        hundreds of steps growing it: on SmolLM2 held-out agreement after 200
        steps was 0.244 without this and 0.294 with it.
        """
        rows = embed_weight[:: max(1, embed_weight.shape[0] // 8192)].float()  # a sample is enough
        std = float(rows.std())
        if std > 0:
            self.rnn_w.weight.mul_(1.0 / (std * math.sqrt(self.config.hidden_size)) / self.rnn_w.weight.std())
        return self

    @classmethod
    def for_target(cls, target: Any, seed: int = 0, **config_kwargs: Any) -> "Drafter":
        """A freshly initialised drafter shaped for `target` (a `redraft_cli.target.Target`)."""
        from .target import Target  # (target.py's cuda_graphs imports beam_search, which imports this module)

        if not isinstance(target, Target):
            raise BadInputError(f"Drafter.for_target needs a Target (from load_target), got {type(target).__name__}")
        _check_int("Drafter.for_target's seed", seed, low=None)
        allowed = {f.name for f in fields(DrafterConfig)} - {"hidden_size", "vocab_size", "target_model", "extra"}
        for k in config_kwargs:
            if k not in allowed:
                raise BadInputError(f"Drafter.for_target got {k!r}, which is not a DrafterConfig field it takes "
                                    f"(hidden_size, vocab_size and target_model come from the target)")
        cfg = DrafterConfig(
            hidden_size=target.hidden_size,
            vocab_size=target.vocab_size,
            target_model=target.name,
            **config_kwargs,
        )
        drafter = cls(cfg).reset_parameters(seed).scale_token_path(target.embed_weight)
        return drafter.to(device=target.device, dtype=target.compute_dtype).attach(
            target.embed_weight, target.lm_head_weight
        )

    random_for = for_target

    def state_to_save(self) -> dict[str, torch.Tensor]:
        """The tensors of model.safetensors. With weight_storage "int8" every weight matrix (2-D
        `.weight`) is stored as int8 rows and a float32 scale per row (max |w| / 127), half the
        bytes of bfloat16; loading dequantises them. Norm scales, biases and the draft
        vocabulary stay as they are."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.weight_storage == "int8":
            for k in [k for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]:
                w = state[k].float()
                scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-12)
                state[k] = torch.round(w / scale).clamp(-127, 127).to(torch.int8).contiguous()
                state[k + SCALE_SUFFIX] = scale.contiguous()
        return state

    def save(self, path: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors (+ datastore.safetensors) atomically into directory `path`."""
        from safetensors.torch import save_file

        _check_path("Drafter.save", path, BadInputError)
        out = Path(path).expanduser()
        self._check_save_over(out)
        try:
            out.mkdir(parents=True, exist_ok=True)
            if self.datastore is not None:
                self.datastore.save(out / DATASTORE_NAME)
            elif (out / DATASTORE_NAME).is_file():  # the drafter saved here before had one: not this drafter's
                (out / DATASTORE_NAME).unlink()
            with tempfile.TemporaryDirectory(dir=out, prefix=".save.tmp") as tmp:  # (a kill leaves it: remove_temporaries)
                save_file(self.state_to_save(), os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
                os.chmod(os.path.join(tmp, WEIGHTS_NAME), file_mode())  # (save_file makes it 0o600)
                with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
                    json.dump(self.config.to_json_dict(), f, indent=2)
                os.replace(os.path.join(tmp, WEIGHTS_NAME), out / WEIGHTS_NAME)
                os.replace(os.path.join(tmp, CONFIG_NAME), out / CONFIG_NAME)
        except (FileExistsError, NotADirectoryError):
            raise BadInputError(f"cannot save the drafter to {out}: it (or a folder above it) is a file") from None
        except OSError as exc:
            raise BadInputError(f"cannot save the drafter to {out}: {exc.strerror or exc}") from None
        self.folder = out.resolve()
        return out

    def _check_save_over(self, out: Path) -> None:
        """BadInputError when `out` is inside the redraft package (its shipped drafters are data), or the
        folder holds something the drafter's files would wrongly replace or join: a model (a config.json of
        another model_type, a tokenizer), a drafter for another target with the files its distillation
        left beside it (datastore, recipe.yaml, metrics.json), or a distilled drafter's recipe.yaml and
        metrics.json, which would then describe this drafter (unless it was loaded from or saved to there)."""
        if inside_package(out):
            raise BadInputError(f"cannot save the drafter to {out}: it is inside the redraft package ({PACKAGE_DIR}), "
                                f"whose drafters every run reads; save it to a folder of its own")
        if not out.is_dir():
            return
        try:
            data = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # none, or a damaged one: replaced
            data = None
        kind = data.get("model_type", MODEL_TYPE) if isinstance(data, dict) else MODEL_TYPE
        if kind != MODEL_TYPE or (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file():
            what = f"its config.json is a {kind!r}" if kind != MODEL_TYPE else "a tokenizer is there"
            raise BadInputError(f"cannot save the drafter to {out}: that folder holds a model ({what}), whose "
                                f"config.json the drafter's would replace; save it to a folder of its own")
        ours = data.get("redraft") if isinstance(data, dict) else None
        theirs = ours.get("target_model") if isinstance(ours, dict) else None
        mine = self.config.target_model
        left = [n for n in (DATASTORE_NAME, "recipe.yaml", "metrics.json") if (out / n).exists()]
        if isinstance(theirs, str) and mine and theirs != mine and left:
            raise BadInputError(f"cannot save the drafter to {out}: that folder holds a drafter for {theirs} with its "
                                f"{', '.join(left)}, which would stay beside this drafter for {mine}; save it to "
                                f"another folder, or empty that one first")
        run_files = [n for n in left if n != DATASTORE_NAME]
        if run_files and self.folder != out.resolve():
            raise BadInputError(f"cannot save the drafter to {out}: that folder holds a distilled drafter with its "
                                f"{', '.join(run_files)}, which would then describe this one; save it to another "
                                f"folder, or empty that one first (a drafter loaded from a folder may be saved "
                                f"back there)")

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "Drafter":
        """Load a checkpoint directory; errors are `DrafterLoadError` with one-line messages."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        _check_path("Drafter.load", path)
        if not isinstance(map_location, (str, torch.device)):
            raise BadInputError(f"Drafter.load's map_location must be a device (\"cpu\", \"cuda\", a torch.device), "
                                f"got {type(map_location).__name__}")
        try:
            where = torch.device(map_location)
        except RuntimeError:
            raise BadInputError(f"Drafter.load's map_location must be a device (\"cpu\", \"cuda\", a torch.device), "
                                f"got {map_location!r}") from None
        if where.type == "meta" or (where.type == "cuda" and not torch.cuda.is_available()) or (
                where.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())):
            raise BadInputError(f"Drafter.load's map_location {map_location!r} is not a device this machine has")
        src = Path(path).expanduser()
        if not src.is_dir():
            raise DrafterLoadError(f"drafter not found: {src} is not a directory")
        cfg_path, weights_path = src / CONFIG_NAME, src / WEIGHTS_NAME
        if not cfg_path.is_file() and (src / "checkpoint").is_dir():
            raise DrafterLoadError(f"drafter folder {src} holds no finished drafter: its distillation stopped before "
                                   f"the end (run the same distill command with --resume to finish it)")
        if not cfg_path.is_file() and (src / "recipe.yaml").is_file() and not weights_path.exists():
            raise DrafterLoadError(f"drafter folder {src} holds no drafter: its distillation failed before training "
                                   f"(only its recipe.yaml is there); run the distill command again")
        for p in (cfg_path, weights_path):
            if not p.is_file():
                raise DrafterLoadError(f"drafter checkpoint {src} lacks {p.name}")
        try:
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError, OverflowError) as exc:  # (JSONDecodeError, UnicodeDecodeError: ValueErrors)
            raise DrafterLoadError(f"drafter config {cfg_path} is not valid JSON: {type(exc).__name__}: "
                                   f"{str(exc)[:200]}") from exc
        if isinstance(data, dict) and data.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise DrafterLoadError(f"{src} is not a redraft drafter: its config.json is a {data.get('model_type')!r} "
                                   f"(a model folder? it goes to --model)")
        try:
            config = DrafterConfig.from_json_dict(data)
        except BadInputError as exc:  # which file, once
            why = str(exc).removeprefix("invalid drafter config: ").removeprefix("drafter config: ")
            why = why.removeprefix("drafter config.json ").removeprefix("config.json ")
            raise DrafterLoadError(f"drafter config {cfg_path}: {why}") from None
        try:
            state = load_file(str(weights_path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DrafterLoadError(f"drafter weights {weights_path} are corrupt: {exc}") from exc
        if config.head == "own" and "draft_vocab" not in state:
            # The reference layout: the vocabulary projection's rows are the vocabulary.
            rows = state.get(f"lm_head.{config.num_draft_layers}.weight")
            if rows is not None and rows.shape[0] != config.vocab_size:
                raise DrafterLoadError(
                    f"drafter {src}: its own head has {rows.shape[0]} rows, but its config.json says vocab_size "
                    f"{config.vocab_size} and no draft vocabulary (redraft.draft_vocab_size); its files do not match"
                )
        ints = [k for k, v in state.items() if not v.is_floating_point() and k != "draft_vocab"
                and not (v.dtype == torch.int8 and k + SCALE_SUFFIX in state)]
        if ints:
            raise DrafterLoadError(f"drafter weights {weights_path}: {ints[0]} is {state[ints[0]].dtype}, not floating point")
        scaled = [k for k in state if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in state]
        floats = [v.dtype for k, v in state.items() if v.is_floating_point() and not k.endswith(SCALE_SUFFIX)]
        for k in scaled:  # int8 rows: dequantise to the dtype of the float tensors (norms, biases)
            name = k[: -len(SCALE_SUFFIX)]
            q, scale = state[name], state.pop(k)
            if q.dtype != torch.int8 or q.dim() != 2 or tuple(scale.shape) != (q.shape[0], 1):
                raise DrafterLoadError(f"drafter weights {weights_path}: {name} has a scale but is not int8 rows")
            state[name] = (q.float() * scale.float()).to(floats[0] if floats else torch.float32)
        # Compare with the weights before building anything: a config.json that claims a billion blocks
        # or a huge vocabulary must fail here, not allocate (the shapes come from a model on the meta device).
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("lm_head.") and k.split(".")[1].isdigit()}
        if len(blocks) != config.num_draft_layers + 1:
            raise DrafterLoadError(f"drafter config.json says {config.num_draft_layers} blocks, "
                                   f"its weights hold {max(len(blocks) - 1, 0)}")
        with torch.device("meta"):
            expected = cls(config).state_dict()
        if set(state) != set(expected):
            missing = sorted(set(expected) - set(state))
            unexpected = sorted(set(state) - set(expected))
            hint = (" (a draft vocabulary: its config.json lacks redraft.draft_vocab_size)"
                    if unexpected == ["draft_vocab"] else "")
            raise DrafterLoadError(
                f"drafter {src}: its weights do not match its config.json (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}){hint}; the files are damaged or come from different drafters"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise DrafterLoadError(f"drafter {src}: tensor {k} has shape {tuple(v.shape)}, but its config.json "
                                       f"implies {tuple(expected[k].shape)}; its files do not match")
        broken = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
        if broken:
            raise DrafterLoadError(f"drafter weights {weights_path}: {broken} holds NaN or infinite values (a damaged "
                                   f"file, or a training run that diverged); distill the drafter again")
        if "draft_vocab" in state:
            _check_draft_vocab(src, state["draft_vocab"], config.vocab_size)
        drafter = cls(config)
        drafter.load_state_dict(state)
        if (src / DATASTORE_NAME).is_file():
            drafter.datastore = Datastore.load(src / DATASTORE_NAME)
            if drafter.datastore.vocab_size != config.vocab_size:
                raise DrafterLoadError(f"drafter {src}: config.json says vocab_size {config.vocab_size}, but its "
                                       f"{DATASTORE_NAME} is for a vocabulary of {drafter.datastore.vocab_size}; "
                                       f"its files do not match")
        dtype = state["rnn_w.weight"].dtype
        drafter.folder = src.resolve()
        return drafter.to(device=map_location, dtype=dtype)

    def check_target(self, hidden_size: int, vocab_size: int, target_name: str = "the target") -> None:
        """Raise DrafterMismatchError unless this drafter was shaped for such a target."""
        c = self.config
        if c.hidden_size != hidden_size or c.vocab_size != vocab_size:
            raise DrafterMismatchError(
                f"drafter (hidden size {c.hidden_size}, vocabulary {c.vocab_size}) does not match "
                f"{target_name} (hidden size {hidden_size}, vocabulary {vocab_size})"
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def recommended_shape(self, batch_size: int = 1, device: str | torch.device | None = None) -> dict[str, int]:
        """config.json's recommended settings (SHAPE_KEYS) for batches of `batch_size` rows on `device`
        (default: this drafter's), with no datastore beams when this drafter has no datastore."""
        _check_int("Drafter.recommended_shape's batch_size", batch_size, low=1)
        kind = device_kind("Drafter.recommended_shape", device) if device is not None else self.rnn_w.weight.device.type
        shape = self.config.shape_for(batch_size, kind)
        if self.datastore is None:
            shape["datastore_beams"] = 0
        window = self.config.context_window
        if window:  # decoding refuses beams longer than the window (a shape saved before distill fitted it)
            shape["beam_length"] = min(shape["beam_length"], window)
            shape["tree_nodes"] = min(shape["tree_nodes"], shape["beam_width"] * (shape["beam_length"] - 1))
            if shape["lookup_length"] > window:
                shape["lookup_length"] = window if window >= 2 else 0  # (0: as long as the beams)
        return shape

    def decode_config(self, batch_size: int = 1, device: str | torch.device | None = None,
                      **overrides: Any) -> "DecodeConfig":
        """Decoding settings at this drafter's recommended shape for batches of `batch_size` rows on
        `device` (default: this drafter's; config.json: beam shape, node budget, copied beams;
        datastore beams only when it has a datastore), with `overrides` (any DecodeConfig field:
        max_new_tokens, accept, sampling, ...) on top. What the CLI decodes with when no shape option
        is given."""
        from .decode import DecodeConfig

        _check_int("Drafter.decode_config's batch_size", batch_size, low=1)
        if device is not None:  # (an error names this method, not recommended_shape)
            device = device_kind("Drafter.decode_config", device)
        known = {f.name for f in fields(DecodeConfig)}
        for k in overrides:
            if k not in known:
                raise BadInputError(f"Drafter.decode_config got {k!r}, which is not a DecodeConfig field")
        return DecodeConfig(**{**self.recommended_shape(batch_size, device), **overrides})


def made_for_another(made_for: str | None, target_name: str) -> bool:
    """Whether a drafter's config.json names a target other than `target_name` (by the last part of
    their names: a hub id and its local copy's folder count as the same)."""
    return bool(made_for) and Path(made_for).name.lower() != Path(target_name).name.lower()


def write_beam_shape(path: str | os.PathLike, beam_width: int, beam_length: int,
                     lookup_beams: int | None = None, lookup_length: int | None = None,
                     datastore_beams: int | None = None, tree_nodes: int | None = None,
                     batch_size: int = 1, device: str | torch.device | None = None) -> Path:
    """Set the recommended beam shape in a saved drafter's config.json, touching nothing else.

    lookup_beams / lookup_length / datastore_beams / tree_nodes, when given, are recommended
    with it (the settings the shape was measured with). batch_size > 1 writes the shape
    for batches of that size (`batch_shapes`) and leaves the batch-1 one alone; at batch 1 a
    device in SHAPE_DEVICES (cuda, mps) writes that device's (`device_shapes`).

    The weights are not rewritten; config.json is replaced atomically (temporary
    file in the same directory, then `os.replace`). A reference-layout config
    without a `redraft` block gets one that keeps its head kind ("own").
    Returns the path of config.json.
    """
    from .beam_search import check_beam_shape

    _check_int("write_beam_shape's batch_size", batch_size, low=1)
    if inside_package(path):  # (as Drafter.save: the shipped drafters are data every run reads)
        raise BadInputError(f"write_beam_shape would rewrite the drafter shipped inside the redraft package ({path}); "
                            f"copy it (cp -r {path} my-drafter) and write to the copy")
    for name, value in (("beam_width", beam_width), ("beam_length", beam_length), ("lookup_beams", lookup_beams),
                        ("lookup_length", lookup_length), ("datastore_beams", datastore_beams),
                        ("tree_nodes", tree_nodes)):
        if value is not None or name in ("beam_width", "beam_length"):  # (the beam's range: check_beam_shape)
            _check_int(f"write_beam_shape's {name}", value, low=None if name in ("beam_width", "beam_length") else 0)
    kind = "cpu" if device is None else device_kind("write_beam_shape", device)
    if kind not in ("cpu",) + SHAPE_DEVICES:
        raise BadInputError(f"write_beam_shape keeps shapes for cpu, {', '.join(SHAPE_DEVICES)}; got device {device!r}")
    check_beam_shape(beam_width, beam_length, tree_nodes=tree_nodes or 0)
    from .decode import DecodeConfig  # every range bench checks, so that bench accepts what is written

    DecodeConfig(beam_width=beam_width, beam_length=beam_length, lookup_beams=lookup_beams or 0,
                 lookup_length=lookup_length or 0, datastore_beams=datastore_beams or 0, tree_nodes=tree_nodes or 0)
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise DrafterLoadError(f"drafter checkpoint {Path(path)} lacks {CONFIG_NAME}")
    try:
        data = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise DrafterLoadError(f"drafter config {cfg_path} is not valid JSON: {exc}") from exc
    before = DrafterConfig.from_json_dict(data)
    ours = data.setdefault("redraft", {"head": before.head})
    values = {"beam_width": beam_width, "beam_length": beam_length, "lookup_beams": lookup_beams,
              "lookup_length": lookup_length, "datastore_beams": datastore_beams, "tree_nodes": tree_nodes}
    shape = {k: int(v) for k, v in values.items() if v is not None}
    if batch_size > 1:
        ours.setdefault("batch_shapes", {})[str(int(batch_size))] = shape
    elif kind in SHAPE_DEVICES:
        ours.setdefault("device_shapes", {})[kind] = shape
    else:
        ours.update(shape)
    after = DrafterConfig.from_json_dict(data)  # still a valid config, only the shape changed
    got = after.shape_for(batch_size, kind)
    assert after.head == before.head and (got["beam_width"], got["beam_length"]) == (beam_width, beam_length)
    mode = cfg_path.stat().st_mode & 0o777
    try:
        atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)), mode=mode)
    except OSError as exc:
        raise DrafterLoadError(f"cannot write {cfg_path}: {exc.strerror or exc}") from exc
    return cfg_path
