"""The frozen target model as the decoder calls it: forward over tokens with an explicit
tree mask and positions, the LM head, chat encoding, context checks; and the probes that
tell, once per model, what its attention takes (per-layer masks, tree passes, causality).

Works with any Hugging Face causal LM whose base model accepts
`position_ids`, a 4D additive `attention_mask` and a `DynamicCache`
(Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma-2, OLMo, SmolLM, ...).
Llama-family targets (SmolLM2 among them) decode through `lean_llama`
instead: a preallocated per-row KV cache, batched rows. Loading is `loading.py`.
"""

from __future__ import annotations

import numbers
import re
import struct
from typing import Any

import torch
from safetensors import SafetensorError

from .chat_templates import encode_messages
from .cuda_graphs import GraphedForward, graphs_wanted
from .env import env_flag
from .errors import BadInputError, ChatTemplateError, ContextOverflowError, ModelLoadError
from .invariance import pad_rows
from .kv_cache import TreeCache
from .lean_llama import (LEAN_MODEL_TYPES, LeanLlama, attention_window, bnb_quantized, lean_supported, packed_rows,
                         unpack_rows)
from .tree_attention import attention_bias

# Errors that third-party model code raises for unreadable or unknown models (loading, a probe pass).
try:  # transformers' configs validate their fields with huggingface_hub's strict dataclasses
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # an older huggingface_hub
    class StrictDataclassError(Exception):  # type: ignore[no-redef]
        pass

LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, ImportError, TypeError, AttributeError, NotImplementedError,
               IndexError, struct.error, SafetensorError, StrictDataclassError)


def _decoder_of(model: Any, name: str) -> Any:
    """The model's decoder stack (the module that returns `last_hidden_state`), under its base-model
    prefix, else `model.model`, else `get_decoder()`; never the causal-LM wrapper itself."""
    prefix = getattr(model, "base_model_prefix", "model")
    for candidate in (getattr(model, prefix, None), getattr(model, "model", None), model.get_decoder()):
        if isinstance(candidate, torch.nn.Module) and candidate is not model:
            return candidate
    raise ModelLoadError(f"{name} ({type(model).__name__}) has no decoder module under "
                         f"{prefix!r}, 'model' or get_decoder(); redraft needs one that returns hidden states")


@torch.no_grad()
def _takes_layer_masks(target: "Target") -> bool:
    """Whether the generic path's model takes one 4D mask per layer type, as a dict
    {"full_attention": ..., "sliding_attention": ...} (`layer_type_masks`), and applies each to its
    layers: a 4-token pass with the sliding entry hiding the first token from the last must change
    the last token's state and nothing else, and a dict of two causal masks must give the model's own
    causal pass. Two or three passes of 4 tokens; False on any error (the context is then capped)."""
    types = set(getattr(target.config, "layer_types", None) or [])
    if "sliding_attention" not in types or not types <= {"full_attention", "sliding_attention"}:
        return False
    ids = _probe_ids(target, 4)[None]
    positions = torch.arange(4, device=target.device)[None]
    causal = attention_bias(torch.ones(1, 4, 4, dtype=torch.bool, device=target.device).tril(), 0, target.compute_dtype)
    hidden = causal.clone()
    hidden[..., 3, 0] = torch.finfo(target.compute_dtype).min

    def run(mask):
        return target.base(input_ids=ids, position_ids=positions, attention_mask=mask,
                           use_cache=False).last_hidden_state[0].float()

    try:
        own = run(None)
        both = run({"full_attention": causal, "sliding_attention": causal})
        slid = run({"full_attention": causal, "sliding_attention": hidden})
    except LOAD_ERRORS:
        return False
    return _same_states(both, own) and _same_states(slid[:3], both[:3]) and not _same_states(slid[3:], both[3:])


def _probe_ids(target: "Target", n: int) -> torch.Tensor:
    """n distinct ordinary token ids (n,) for the load-time probes, spread from a third of the way into
    the vocabulary: no special token and no all-zero embedding row (a pad token's row often is), whose
    hiding or showing would move no state and fool a probe (Gemma-2 with pad id 2 lost its per-layer
    masks, and a tree probe over such tokens could pass a model that ignores the mask)."""
    vocab = max(target.vocab_size, 1)
    special = {int(i) for i in getattr(target.tokenizer, "all_special_ids", None) or () if isinstance(i, int)}
    try:
        rows = target.model.get_input_embeddings().weight
        zero = None if rows.is_meta else rows
    except (AttributeError, NotImplementedError, TypeError):
        zero = None
    picks: list[int] = []
    for k in range(vocab):
        i = (vocab // 3 + 7 * k) % vocab
        if i in special or i in picks or (zero is not None and i < zero.shape[0] and not bool(zero[i].any())):
            continue
        picks.append(i)
        if len(picks) == n:
            break
    picks += [k % vocab for k in range(n - len(picks))]  # a vocabulary of mostly special tokens
    return torch.tensor(picks, device=target.device)


def _same_states(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Whether hidden states (n, H) of two passes are the same up to rounding, for the load-time probes:
    every row within 3% of its norm. Rounding moves a row by well under 1% (0 on CPU); a token seen or
    hidden by mistake moved one by 11% in SmolLM2."""
    return bool(((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)).max() <= 0.03)


def _first_line(exc: BaseException) -> str:
    """An error's first line, for one-line messages ('' when it has none)."""
    return (str(exc).strip().splitlines() or [""])[0]


def layer_type_masks(tree_mask: torch.Tensor, cache_len: int, position_ids: torch.Tensor, window: int,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Additive masks per layer type for a generic-path pass whose cache keeps every key.

    tree_mask (B, n, n) bool and position_ids (B, n) of the new tokens, after `cache_len` committed
    tokens at positions 0 .. cache_len-1. "full_attention": `attention_bias`; "sliding_attention"
    also hides keys `window` or more positions before the query (Hugging Face's
    `kv_idx > q_idx - window`). Each (B, 1, n, cache_len + n).

    Example, window 2, cache_len 2, one new token at position 2: full [0, 0, 0], sliding
    [min, 0, 0] (position 0 is 2 back).
    """
    full = attention_bias(tree_mask, cache_len, dtype)
    B = tree_mask.shape[0]
    keys = torch.cat([torch.arange(cache_len, device=position_ids.device).expand(B, cache_len), position_ids], 1)
    far = position_ids.unsqueeze(-1) - keys.unsqueeze(1) >= window  # (B, n, cache_len + n)
    return {"full_attention": full, "sliding_attention": full.masked_fill(far.unsqueeze(1), torch.finfo(dtype).min)}


def _check_attention_only(target: "Target") -> None:
    """ModelLoadError if a cache layer of the generic path holds a recurrent state (state-space or
    linear-attention layers: Mamba and its hybrids): a tree pass would advance it through every
    branch at once."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    try:
        layers = getattr(target.new_cache(), "layers", [])
    except LOAD_ERRORS:  # a config its cache cannot read: check_causal's first pass names the error
        return
    recurrent = sorted({type(layer).__name__ for layer in layers if isinstance(layer, LinearAttentionCacheLayerMixin)})
    if recurrent:
        raise ModelLoadError(f"{target.name} ({target.config.model_type}) has recurrent layers "
                             f"({', '.join(recurrent)}): a tree pass cannot verify several branches through one "
                             f"recurrent state; redraft needs an attention-only decoder")


@torch.no_grad()
def check_tree_pass(target: "Target") -> None:
    """ModelLoadError unless the model's own attention (the generic path) honours a tree mask.

    After a 2-token prefix, one pass over the tree c -> {d, e} (positions 2, 3, 3; e must not see
    its sibling d) must give the hidden states of the sequential passes over [a, b, c, d] and
    [a, b, c, e]. A model that builds its positions or biases from a 2D mask (ALiBi in Bloom)
    fails the pass; one that ignored the mask would verify every node against the wrong context
    and lose exactness silently. Three passes of at most 4 tokens.
    """
    a, b, c, d, e = _probe_ids(target, 5)
    tree = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool, device=target.device)
    positions = torch.arange(4, device=target.device)[None]
    try:
        cache = target.new_cache()
        target.forward(torch.stack([a, b])[None], positions[:, :2], cache)
        nodes = target.forward(torch.stack([c, d, e])[None], torch.tensor([[2, 3, 3]], device=target.device), cache,
                               attention_bias(tree, 2, target.compute_dtype))[0].float()
        seq = [target.forward(torch.stack([a, b, c, x])[None], positions, target.new_cache())[0, 2:].float()
               for x in (d, e)]
    except LOAD_ERRORS as exc:
        raise ModelLoadError(f"{target.name} ({target.config.model_type}) cannot run a tree pass: its attention "
                             f"does not take a 4D mask ({type(exc).__name__}: {_first_line(exc)}); redraft verifies "
                             f"drafts with one") from exc
    if not _same_states(nodes, torch.stack([seq[0][0], seq[0][1], seq[1][1]])):  # (3, H) each
        raise ModelLoadError(f"{target.name} ({target.config.model_type}) does not honour a tree attention mask "
                             f"(a node saw its sibling); its drafts could not be verified exactly")


@torch.no_grad()
def check_causal(target: "Target") -> None:
    """ModelLoadError unless the model is causal: its first position must not see the second token
    (an encoder such as BERT, which AutoModelForCausalLM also loads, sees both). One pass of 2 x 2 tokens."""
    ids = torch.tensor([[1, 2], [1, 3]], device=target.device) % max(target.vocab_size, 1)
    try:
        if target.lean is None:
            target.new_cache()  # the generic path's cache reads per-layer settings of the config too
        hidden = target.base(input_ids=ids, use_cache=False).last_hidden_state[:, 0].float()
    except LOAD_ERRORS as exc:  # a config the model's own code cannot run (an unknown layer type, ...)
        first = _first_line(exc)
        hint = ("check its config.json, or load it unquantized (bitsandbytes kernels have their own limits on "
                "layer sizes)") if bnb_quantized(target.model) else "check its config.json"
        raise ModelLoadError(f"{target.name} ({target.config.model_type}) fails its first forward pass: "
                             f"{type(exc).__name__}: {first}; {hint}") from exc
    if not torch.allclose(hidden[0], hidden[1], rtol=1e-2, atol=1e-3 * (1 + hidden[0].abs().max().item())):
        raise ModelLoadError(f"{target.name} ({target.config.model_type}) is not a causal language model: its "
                             f"first position sees the tokens after it (an encoder?); redraft needs a decoder-only LM")


class Target:
    """A loaded causal LM plus what decoding needs from it.

    forward(input_ids (B, n), position_ids (B, n), cache, attn_bias (B, 1, n, S+n) | None)
        -> hidden (B, n, H), the last layer after the final norm.
    logits(hidden (..., H)) -> (..., V) float32.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "model") -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.base = _decoder_of(model, name)
        self.lm_head = model.get_output_embeddings()
        if self.lm_head is None:
            raise ModelLoadError(f"{name} has no output embedding (LM head); is it a causal LM?")
        import inspect

        params = inspect.signature(self.base.forward).parameters
        # transformers >= 5.2x names the cache argument `cache`; earlier 5.x `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.softcap = getattr(self.config, "final_logit_softcapping", None)
        self.hidden_size = int(self.config.hidden_size)
        self.embed_weight = model.get_input_embeddings().weight
        self.vocab_size = int(self.embed_weight.shape[0])
        self.lm_head_weight = self.lm_head.weight
        # With a device map (accelerate) the layers sit on several devices. Decoding works on the
        # input embedding's device: hidden states and logits are brought back there.
        self.device = self.embed_weight.device
        self.devices = sorted({str(p.device) for p in model.parameters()})
        self.compute_dtype = self.embed_weight.dtype
        self.max_context = int(
            getattr(self.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", 4096)
        )
        if self.max_context < 2:  # a prompt token and an answer token
            raise ModelLoadError(f"{name}'s config.json has max_position_embeddings {self.max_context}; a context "
                                 f"holds at least 2 positions (a prompt token and an answer)")
        window = getattr(self.config, "sliding_window", None)
        if isinstance(window, int) and not isinstance(window, bool) and window < 0:
            raise ModelLoadError(f"{name}'s config.json has sliding_window {window}; a window is a positive number of "
                                 f"positions (null or 0: none)")
        self.window = attention_window(self.config)  # sliding-window layers shorter than the context, else None
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos_ids.add(int(tokenizer.eos_token_id))
        try:
            self.eos_ids = frozenset(int(e) for e in eos_ids)
        except (TypeError, ValueError):
            raise ModelLoadError(f"{name}'s generation_config.json has eos_token_id {eos!r}; it takes a token id or a "
                                 f"list of them") from None
        # The lean Llama-family forward (static KV cache, batched rows) where the layout allows;
        # REDRAFT_GENERIC=1 forces the generic Hugging Face path (for comparisons).
        use_lean = lean_supported(model) and not self.spread and not env_flag("REDRAFT_GENERIC", False)
        self.lean = LeanLlama(model) if use_lean else None
        if self.lean is None:
            _check_attention_only(self)
        # Sliding-window layers on the generic path: their cache keeps every key (new_cache), and each
        # layer type gets its own mask where the model's forward takes a dict of them (Gemma-2/3,
        # GPT-OSS, Cohere-2, ...: `layer_masks`). Otherwise the context stops one short of the window,
        # where a sliding layer attends to everything.
        self.layer_masks = bool(self.window) and self.lean is None and _takes_layer_masks(self)
        self.context_cap = ""  # why max_context is below the model's own (said with every context error)
        if self.window and self.lean is None and not self.layer_masks and self.window - 1 < self.max_context:
            self.context_cap = (f" ({name} takes {self.max_context} positions, but redraft's generic path stops one "
                                f"short of its sliding window of {self.window})")
            self.max_context = self.window - 1
        # On CUDA the lean pass replays CUDA graphs (cuda_graphs.py); REDRAFT_CUDA_GRAPHS=0 turns them off.
        # bitsandbytes layers are left eager.
        self.graphs = (GraphedForward(self.lean) if graphs_wanted(self.device) and self.lean is not None
                       and not bnb_quantized(model) else None)

    @property
    def batch_invariant(self) -> bool:
        """Whether a token's logits are bitwise the same whatever else shares its pass (lean path on CPU, where
        `invariance.py` found a row count from which the matmuls are invariant), so greedy ReDrafter output
        is exactly plain decoding's (lean_llama.py)."""
        return self.lean is not None and self.lean.batch_invariant

    @property
    def spread(self) -> bool:
        """Whether a device map put the model's layers on more than one device."""
        return len(self.devices) > 1

    # -- model calls ----------------------------------------------------------
    def new_cache(self):
        """A Hugging Face DynamicCache (the generic path's cache)."""
        from transformers import DynamicCache

        if self.window:  # a tree pass must not trim the sliding layers' keys: every key is kept, and
            return DynamicCache()  # their masks hide the old ones (layer_type_masks), or the context stops short
        return DynamicCache(config=self.model.config)

    def new_tree_cache(self, batch: int = 1, capacity: int | None = None) -> Any:
        """The cache decoding uses: a preallocated `StaticKVCache` of `capacity` slots per row on
        the lean path, else a `TreeCache` over a DynamicCache (one row only)."""
        if self.lean is not None:
            capacity = capacity or self.max_context
            maker = self.graphs or self.lean  # with CUDA graphs: buffers of finished caches are reused
            return maker.new_cache(batch, capacity, self.compute_dtype, self.device)
        if batch != 1 and self.spread:
            raise BadInputError(f"batched decoding needs the target on one device; {self.name} is spread over "
                                f"{', '.join(self.devices)} (--device-map): decode one prompt at a time (--batch-size 1)")
        if batch != 1 and env_flag("REDRAFT_GENERIC", False) and lean_supported(self.model):
            raise BadInputError(f"batched decoding runs on redraft's lean path, and REDRAFT_GENERIC=1 puts {self.name} "
                                f"on the generic Hugging Face path: unset REDRAFT_GENERIC, or decode one prompt at a "
                                f"time (--batch-size 1)")
        if batch != 1:
            raise BadInputError(
                f"batched decoding needs a Llama-family target ({', '.join(LEAN_MODEL_TYPES)}); "
                f"{self.name} is a {self.config.model_type!r}: decode one prompt at a time (--batch-size 1)"
            )
        return TreeCache(self.new_cache(), self.device)

    @torch.no_grad()
    def forward_tree(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any,
                     tree_mask: torch.Tensor, valid: torch.Tensor | None = None, graph: bool = True) -> torch.Tensor:
        """Run n new tokens per row after each row's committed ones.

        input_ids, position_ids: (B, n); tree_mask: (B, n, n) bool, which new
        tokens each new token sees (causal for a prompt, ancestors for a tree);
        valid: optional (B, n) bool, False for padding nodes (the lean path then
        skips their projections and MLP; their hidden states are 0).
        graph: False runs the pass eagerly where CUDA graphs would replay it
        (a prompt: once per generation, not worth a capture).
        The new tokens' K/V are tentative until `cache.commit(path, accepted)`.
        Returns post-norm hidden states (B, n, H).
        """
        if self.lean is not None:
            graphed = graph and self.graphs is not None
            out = self.graphs(input_ids, position_ids, cache, tree_mask, valid) if graphed else None
            return out if out is not None else self.lean.forward(input_ids, position_ids, cache, tree_mask, valid)
        n = input_ids.shape[1]
        prefix = cache.get_seq_length()
        causal = n == 1 or (prefix == 0 and bool(torch.equal(tree_mask[0], torch.ones(n, n, dtype=torch.bool,
                                                                                      device=tree_mask.device).tril())))
        if causal:  # the model's own masks, sliding layers included (no (n, n) float mask for a long prompt)
            bias = None
        elif self.layer_masks and prefix + n > self.window:  # a tree: each layer type's mask, built here
            bias = layer_type_masks(tree_mask, prefix, position_ids, self.window, self.compute_dtype)
        else:
            bias = attention_bias(tree_mask, prefix, self.compute_dtype)
        return self.forward(input_ids, position_ids, cache.hf, bias)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache: Any,
                attn_bias: torch.Tensor | dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        out = self.base(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attn_bias,
            use_cache=True,
            **{self._cache_arg: cache},
        )
        return out.last_hidden_state.to(self.device)

    @torch.no_grad()
    def logits_at(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """hidden (B, n, H), valid (B, n) bool -> float32 logits (B, n, V), scored only where
        valid (padding nodes of a batched tree get 0)."""
        rows = packed_rows(valid)
        if rows is None:
            return self.logits(hidden)
        B, n, _ = hidden.shape
        return unpack_rows(self.logits(hidden.reshape(B * n, -1).index_select(0, rows)), rows, B, n)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., H) -> float32 logits (..., V)."""
        rows = hidden.numel() // hidden.shape[-1]
        if self.batch_invariant and 0 < rows != self.lean.rows(rows):
            # That many rows would sum in another order (lean_llama, invariance.py): pad with copies of the first.
            padded = pad_rows(hidden.reshape(rows, -1), 0, self.lean.good_rows, self.lean.row_limit)
            return self.logits(padded)[:rows].view(*hidden.shape[:-1], -1)
        out = self.lm_head(hidden.to(self.lm_head_weight.device)).float().to(self.device)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

    # -- text -----------------------------------------------------------------
    def encode_chat(self, messages: str | list[dict[str, str]], system: str | None = None) -> list[int]:
        """Token ids of a conversation through the chat template, ready for the assistant turn. system:
        None leaves the template's default system prompt (where it has one); "" sends an empty one."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not isinstance(messages, (list, tuple)) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise BadInputError("encode_chat takes a text, or a non-empty list of messages "
                                "({'role': 'user', 'content': 'text'}, ...)")
        if system is not None and not isinstance(system, str):
            raise BadInputError(f"encode_chat's system prompt must be a text (str) or None, got {type(system).__name__}")
        if system is not None:  # "" is an empty system turn: no template default in its place
            messages = [{"role": "system", "content": system}, *messages]
        if not getattr(self.tokenizer, "chat_template", None):
            raise ChatTemplateError(
                f"{self.name} has no chat template: give it one (--chat-template, a name such as vicuna, a Jinja "
                f"file or text; in Python chat_templates.apply_chat_template(target, ...)), or send raw text "
                f"(--no-chat-template in bench and sweep; target.encode_raw)"
            )
        messages = [{**m, "content": valid_text(m.get("content", ""))} for m in messages]
        return encode_messages(self.tokenizer, messages)

    def encode_raw(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise BadInputError(f"encode_raw takes a text (str), got {type(text).__name__}")
        # Text stays text: a control token's string ("<|endoftext|>") is tokenized as characters, as in
        # encode_chat's messages (the tokenizer's own BOS, if it adds one, is still added).
        return self.tokenizer(valid_text(text), split_special_tokens=True)["input_ids"]

    def check_prompt(self, prompt_ids: list[int]) -> None:
        if not isinstance(prompt_ids, (list, tuple)) or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                                for t in prompt_ids):
            raise BadInputError(f"a prompt is a list of token ids (ints), got {type(prompt_ids).__name__}"
                                + ("" if not isinstance(prompt_ids, (list, tuple)) else " holding other values")
                                + "; turn text into ids with target.encode_chat(text)")
        if len(prompt_ids) == 0:
            raise BadInputError("the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            raise ContextOverflowError(
                f"the prompt is {len(prompt_ids)} tokens but {self.name}'s context is {self.max_context}"
                f"{self.context_cap}; shorten it"
            )
        if max(prompt_ids) >= self.vocab_size or min(prompt_ids) < 0:
            bad = max(prompt_ids) if max(prompt_ids) >= self.vocab_size else min(prompt_ids)
            raise BadInputError(f"token id {bad} is outside {self.name}'s vocabulary of {self.vocab_size}: the "
                                f"tokenizer (or whatever made the ids) does not match the model")

    def describe(self) -> str:
        where = "+".join(self.devices) if self.spread else self.device
        return f"{self.name} ({self.config.model_type}, {self.compute_dtype}, {where})".replace("torch.", "")


def valid_text(text: str) -> str:
    """Text a tokenizer accepts: bytes that were not UTF-8 (read from a terminal or argv, they arrive as
    lone surrogates) become U+FFFD instead of failing inside the tokenizer."""
    return _SURROGATES.sub("\ufffd", text) if isinstance(text, str) else text


_SURROGATES = re.compile("[\ud800-\udfff]")


def not_utf8(text: str) -> str:
    """'' for text that came from valid UTF-8; else where it did not: bytes that were not UTF-8, read from a
    terminal or argv, arrive as lone surrogates (U+DC80-U+DCFF for byte 0x80-0xff)."""
    match = _SURROGATES.search(text)
    if match is None:
        return ""
    code = ord(match.group())
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
    return f"{what} at character {match.start()}"

