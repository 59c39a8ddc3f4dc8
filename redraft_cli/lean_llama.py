"""A lean target forward for the Llama family over a `StaticKVCache`.

Llama, Mistral, Qwen2 and Qwen3 decoders share one layout (Qwen3 adds an
RMSNorm on each query/key head):

    x = embed(ids)                                            (B, n, H)
    for each layer:
        q, k, v = proj(norm(x)); q, k = rope(q, k)            (B, heads, n, d)
        cache.write(k, v at slots lengths + i)
        x = x + o_proj(SDPA(q, K[:span], V[:span], mask))     GQA without copying K/V
        x = x + mlp(norm(x))
    return norm(x)                                            post-norm hidden (B, n, H)

The model's own modules do the arithmetic (projections, norms, MLP, rotary
embedding), so bitsandbytes-quantised layers and every checkpoint of these
families work unchanged. What this replaces is the per-step machinery of a
generic forward that decoding does not need: mask construction per layer
type, cache objects that concatenate, keyword plumbing. One boolean mask is
built per step (`StaticKVCache.attention_mask`) and shared by all layers;
layers with a sliding window (Mistral v0.1, Qwen2's upper layers) share a
second one that also hides keys `window` or more positions back
(`layer_windows`; key positions from `StaticKVCache.key_positions`). The
cache keeps every key, so a tree node sees exactly the window a token at
its position sees in plain decoding.

Batch invariance (CPU). Greedy ReDrafter is lossless only if a token's
logits do not depend on how many other tokens share the pass. On CPU a
matmul's kernel, and its rounding, can depend on its row count M and on
where a row falls in the kernel's tiles (float32 with MKL: only M = 4, 8
and M >= 12 give every row the same bits; bfloat16 with oneDNN: every
M >= 2; `invariance.py` finds the good counts by trying, once per dtype
and shapes); the fused SDPA kernel splits keys into blocks that depend on
the query count; and any reduction over keys (softmax sum, probs @ V)
depends on the offsets at which the keys sit, which in a tree differ from
plain decoding (a node's ancestors are not adjacent). So on CPU this
module (a) runs every projection on a good row count: where a pass has too
few rows (one token of plain decoding: 2 rows in bfloat16, 4 in float32; a
float32 tree of 9 nodes: 12), copies of its first row are added, whose
results are the same bits and are dropped (`forward`'s packed rows), and
(b) pads each attention-score matrix's query rows the same way and
reduces over keys (softmax, probs @ V) in float64 (`grouped_attention`),
where the order of a sum no longer shows after rounding back to the
model's dtype. Then a tree pass and a one-token pass
give the same bits for the same token (up to a ~1e-10 chance per token),
and greedy output is identical to plain decoding. Where no row count is
good (a BLAS whose results keep changing with M) the fused kernel is kept
and identity holds up to rare near-ties (see the README's performance
section).

Batch invariance (CUDA). cuBLAS picks its kernel by M, N and K at every
size, so `invariance.cuda_invariant_rows` tries every M up to 128 against
128 rows on the GPU (an H200 in bfloat16 found all of them good). The
attention scores are then float64 dot products as well (a GPU kernel's
order over head_dim is not probed), and each RMSNorm takes its mean of
squares in float64 (`rms_norm`): a CUDA reduction lays out its threads,
and so orders its sum, by the number of rows.

Models of other architectures (and layer kinds other than full and sliding
attention) keep the generic Hugging Face path (`lean_supported` says which).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from .env import env_flag
from .invariance import CUDA_TOP, LIMIT, cuda_invariant_rows, invariant_rows, pad_rows, padded_rows
from .static_cache import StaticKVCache

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SLIDING_MODEL_TYPES = ("mistral", "qwen2", "qwen3")  # those whose attention honours config.sliding_window
# Passes of more tokens than this (prompts; both decoding paths prefill the same way) use the fused,
# memory-efficient SDPA kernel even in batch-invariant mode: grouped_attention holds float64 scores.
INVARIANT_MAX_TOKENS = 256


def attention_window(cfg: Any) -> int | None:
    """The sliding window of a config some of whose layers attend to fewer positions than its
    context (Mistral v0.1's 4,096 of 32,768; Gemma-2's local layers), else None."""
    window = getattr(cfg, "sliding_window", None)
    if (not isinstance(window, int) or isinstance(window, bool) or window <= 0
            or window >= (getattr(cfg, "max_position_embeddings", 0) or 1 << 62)):
        return None  # (a negative window is refused when the target loads: Target)
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return int(window) if any(t == "sliding_attention" for t in types) else None
    return int(window) if getattr(cfg, "use_sliding_window", True) else None


def lean_config_supported(cfg: Any) -> bool:
    """True when a model config (`PretrainedConfig`) describes a decoder this module runs."""
    if getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES:
        return False
    return all(t in ("full_attention", "sliding_attention") for t in (getattr(cfg, "layer_types", None) or []))


def layer_windows(cfg: Any) -> list[int | None]:
    """Per decoder layer, the sliding window of its attention (a query sees the `window` latest
    positions, itself included, as Hugging Face's `kv_idx > q_idx - window`), or None: every earlier
    position. Mistral v0.1 slides in every layer, Qwen2 in those its `layer_types` name."""
    window = attention_window(cfg) if cfg.model_type in SLIDING_MODEL_TYPES else None  # Llama has no window
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * int(cfg.num_hidden_layers)
    return [window if window and t == "sliding_attention" else None for t in types]


def lean_supported(model: Any) -> bool:
    """True when `model` (a *ForCausalLM) has the plain Llama decoder layout this module runs."""
    if not lean_config_supported(getattr(model, "config", None)):
        return False
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or not hasattr(base, "rotary_emb") or not hasattr(base, "norm"):
        return False
    attn = layers[0].self_attn
    return all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


def bnb_quantized(model: Any) -> bool:
    """Whether `model` was loaded quantized (bitsandbytes): its layers then run kernels that neither
    the GPU probe measures nor CUDA graphs record (a GGUF's weights are dequantised on load)."""
    return getattr(model.config, "quantization_config", None) is not None


def probe_good_rows(model: Any, head_dim: int) -> tuple[frozenset[int] | None, int]:
    """(good row counts, the count from which the pass is left as it is) for this model's dtype and
    matmul shapes (its first layer's projections and LM head; bitsandbytes layers count with their
    unquantised shapes): `invariant_rows` on the CPU, `cuda_invariant_rows` on a CUDA device
    (unquantised models only: bitsandbytes' GPU kernels are not what the probe measures), else None.
    REDRAFT_CUDA_EXACT=0 leaves CUDA passes as they are (faster where the probe pads, not exact)."""
    modules = list(model.model.layers[0].modules()) + [model.get_output_embeddings()]
    shapes = tuple(sorted({(int(m.in_features), int(m.out_features)) for m in modules
                           if hasattr(m, "in_features") and hasattr(m, "out_features")}))
    weight = model.get_input_embeddings().weight
    if weight.device.type == "cpu":
        return invariant_rows(weight.dtype, shapes, head_dim), LIMIT
    if weight.device.type == "cuda" and not bnb_quantized(model) and env_flag("REDRAFT_CUDA_EXACT", True):
        return cuda_invariant_rows(weight.dtype, shapes, str(weight.device)), CUDA_TOP + 1
    return None, LIMIT


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bfloat16 matmuls run natively (else they are emulated and slow)."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, c, lambda: False)()) for c in checks)


class LeanLlama:
    """forward(ids (B, n), positions (B, n), cache, tree_mask (B, n, n)) -> hidden (B, n, H)."""

    def __init__(self, model: Any) -> None:
        self.base = model.model
        self.layers = list(self.base.layers)
        attn = self.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        cfg = model.config
        self.num_heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.scaling = float(attn.scaling)
        self.qk_norm = hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
        self.windows = layer_windows(cfg)
        self.rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        weight = model.get_input_embeddings().weight
        # Row counts (below row_limit) at which every matmul is batch-invariant here; None: some matmul
        # never is (or not on this device), and identity holds only up to near-ties.
        self.good_rows, self.row_limit = probe_good_rows(model, self.head_dim)
        # Off the CPU the invariant attention takes its scores in float64 too: a GPU kernel's summation
        # order over head_dim is not probed (the CPU's bfloat16 scores are, and keep their answers);
        # and the RMSNorms their mean of squares (`rms_norm`), which needs their weight and epsilon.
        self.float64_reductions = weight.device.type != "cpu"
        norms = [self.base.norm, self.layers[0].input_layernorm, self.layers[0].post_attention_layernorm]
        if self.float64_reductions and not all(hasattr(m, "weight") and hasattr(m, "variance_epsilon") for m in norms):
            self.good_rows = None
        self.batch_invariant = self.good_rows is not None
        # Off the CPU, masked SDPA with enable_gqa has no fused kernel (flash takes no mask; memory-efficient
        # and cuDNN need equal head counts) and runs the unfused math backend: fold the query groups instead
        # (`fold_gqa_mask`). The CPU's fused kernel serves masked GQA itself.
        self.fold_gqa = self.kv_heads != self.num_heads and weight.device.type != "cpu"

    def _norm(self, norm: Any, x: torch.Tensor) -> torch.Tensor:
        """norm(x), an RMSNorm of the model; on the GPU's exact path with its mean of squares taken in
        float64 (`rms_norm`): a GPU reduction sums in an order chosen by the row count."""
        return rms_norm(norm, x) if self.batch_invariant and self.float64_reductions else norm(x)

    def rows(self, m: int) -> int:
        """The row count a batch-invariant matmul of m rows runs with (m itself when not invariant)."""
        return m if self.good_rows is None else padded_rows(m, self.good_rows, self.row_limit)

    def new_cache(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                  buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> StaticKVCache:
        return StaticKVCache(len(self.layers), batch, self.kv_heads, capacity, self.head_dim, dtype, device, buffers)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                tree_mask: torch.Tensor, valid: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Run n tokens per row at `positions`; their K/V go to `cache.slots(n)`.

        ids, positions: (B, n) int64; tree_mask: (B, n, n) bool (which new
        tokens each new token sees; causal for a prompt, ancestors for a tree).
        valid: optional (B, n) bool, False for padding (rows of a batched tree
        with fewer nodes than the largest): the projections, norms and MLP then
        run on the N real tokens only, packed as (N, H), and only attention
        sees the padded (B, n) layout. Padding's hidden states come back as 0.
        Where N is not a good row count for batch invariance, copies of the
        first real row are added to the packed rows (same bits, dropped).
        Returns the post-norm hidden states (B, n, H). `cache.lengths` is not
        advanced: call `cache.commit` with what to keep.

        lengths: (B,) int64, the committed lengths, given by a CUDA graph
        (cuda_graphs.py) in place of `cache.lengths`: attention then spans
        every slot of the cache, so the pass reads nothing on the host and has
        the same shapes at every step (the caller checks the room).

        Worked example, B = 2, n = 3, valid = [[T, T, T], [T, F, F]]: the
        residual stream is 4 rows (flat indices 0, 1, 2, 3 of the 6 cells);
        q, k, v are scattered into (2, 3) for RoPE, the cache and attention,
        whose output is gathered back to those 4 rows for o_proj.
        """
        B, n = ids.shape
        graphed = lengths is not None
        if not graphed:
            cache.check_room(n)
        row_ids = torch.arange(B, device=ids.device).unsqueeze(1) if graphed else None
        slots = cache.slots(n, lengths)
        mask, span = cache.attention_mask(tree_mask, lengths, cache.capacity if graphed else None)
        masks = {None: mask}  # per sliding window (None: none), the (B, 1, n, span) mask
        if any(self.windows):
            key_pos = cache.key_positions(positions, span, lengths).unsqueeze(1).unsqueeze(1)  # (B, 1, 1, span)
            for w in set(self.windows) - {None}:
                masks[w] = mask & (key_pos > positions.unsqueeze(1).unsqueeze(-1) - w)
        # ... and the one the fused kernel takes (folded when `fold_gqa`)
        masks = {w: (m, fold_gqa_mask(m, self.num_heads // self.kv_heads) if self.fold_gqa else m)
                 for w, m in masks.items()}
        x = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(x, positions)
        rows = packed_rows(valid)
        real = B * n if rows is None else rows.numel()
        if self.rows(real) != real:
            # Copies of the first cell up to a good row count (module docstring); unpacking writes that
            # cell once per copy, the same bits each time.
            rows = pad_rows(torch.arange(B * n, device=ids.device) if rows is None else rows, 0, self.good_rows,
                            self.row_limit)
        if rows is not None:
            x = x.reshape(B * n, -1).index_select(0, rows)  # (N, H)
        extents = None if graphed else self._extents(cache, valid, B, n, span)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(layer.self_attn, self._norm(layer.input_layernorm, x), cos, sin, cache, i,
                                    (slots, row_ids), masks[self.windows[i]], span, (B, n), rows, extents)
            x = x + layer.mlp(self._norm(layer.post_attention_layernorm, x))
        x = self._norm(self.base.norm, x)
        return x if rows is None else unpack_rows(x, rows, B, n)

    def _extents(self, cache: StaticKVCache, valid: torch.Tensor | None, B: int, n: int, span: int
                 ) -> list[tuple[int, int]] | None:
        """Per-row (queries, keys) that attention must compute in batch-invariant mode, when rows
        differ enough to pay for one attention call per row: row b's real nodes come first in its
        n, and its keys end at lengths[b] + its node count. None: one batched call."""
        if B == 1 or not self.batch_invariant or n > INVARIANT_MAX_TOKENS:
            return None
        counts = valid.sum(1) if valid is not None else torch.full((B,), n, device=cache.lengths.device)
        ext = [(max(c, 1), k) for c, k in zip(counts.tolist(), (cache.lengths + counts).tolist())]
        return ext if sum(q * k for q, k in ext) < 0.8 * B * n * span else None

    def _attention(self, attn: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: StaticKVCache,
                   layer: int, slots: tuple[torch.Tensor, torch.Tensor | None],
                   masks: tuple[torch.Tensor, torch.Tensor], span: int,
                   shape: tuple[int, int], rows: torch.Tensor | None, extents: list[tuple[int, int]] | None = None
                   ) -> torch.Tensor:
        """x: (B, n, H), or (N, H) packed at `rows` of the (B, n) = `shape` cells; returns x's layout.
        slots: the (B, n) cache slots of the new tokens, and (B, 1) row ids for the write (or None).
        masks: the (B, 1, n, span) mask, and the one the fused kernel takes (folded when `fold_gqa`)."""
        B, n = shape
        d = self.head_dim
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        if rows is not None:
            q, k, v = (unpack_rows(t, rows, B, n) for t in (q, k, v))
        q = q.view(B, n, self.num_heads, d)
        k = k.view(B, n, self.kv_heads, d)
        v = v.view(B, n, self.kv_heads, d).transpose(1, 2)
        if self.qk_norm:
            q, k = self._norm(attn.q_norm, q), self._norm(attn.k_norm, k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (B, heads, n, d)
        cache.write(layer, k, v, *slots)
        keys, values = cache.view(layer, span)
        if self.batch_invariant and n <= INVARIANT_MAX_TOKENS:
            out = grouped_attention(q, keys, values, masks[0], self.scaling, extents,
                                    None if self.float64_reductions else self.good_rows, self.float64_reductions)
        else:
            out = fused_attention(q, keys, values, masks[1], self.scaling)  # (B, heads, n, d)
        out = out.transpose(1, 2).reshape(B * n, self.num_heads * d)
        if rows is not None:
            return attn.o_proj(out.index_select(0, rows))
        return attn.o_proj(out).view(B, n, -1)


def rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """The Llama-family RMSNorm `norm` (weight, variance_epsilon) of x (..., H), with the mean of
    squares summed in float64 and rounded to float32, where Hugging Face sums it in float32.

    A CUDA reduction picks its thread layout, and with it the order of its float32 sum, by the
    number of rows: a row normalised beside 11 others can differ in its last bit from the same row
    alone (one token of plain decoding), and greedy output with it. Squares of float32 values are
    exact in float64 and their sum's order moves it by ~1e-16 relative, which rounding to float32
    hides, so every row gets the float32 variance whatever else shares its pass (and the correctly
    rounded one, where HF's may be an ulp off). Everything else is the module's own arithmetic."""
    h = x.to(torch.float32)
    variance = h.double().pow(2).mean(-1, keepdim=True).float()
    return norm.weight * (h * torch.rsqrt(variance + norm.variance_epsilon)).to(x.dtype)


def packed_rows(valid: torch.Tensor | None) -> torch.Tensor | None:
    """valid (B, n) bool -> (N,) flat indices of its True cells; None when there is no padding."""
    if valid is None or bool(valid.all()):
        return None
    return valid.reshape(-1).nonzero().squeeze(1)


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor, B: int, n: int) -> torch.Tensor:
    """(N, D) values of the flat cells `rows` -> (B, n, D), zeros elsewhere."""
    out = packed.new_zeros(B * n, packed.shape[-1])
    return out.index_copy_(0, rows, packed).view(B, n, -1)


def fold_gqa_mask(mask: torch.Tensor, rep: int) -> torch.Tensor:
    """(B, 1, n, S) -> (B, 1, rep * n, S): the mask of `fused_attention`'s folded queries, where the
    rep = heads / kv_heads query heads of a KV head are stacked as rep * n queries (once per forward)."""
    B, _, n, S = mask.shape
    return mask.unsqueeze(2).expand(B, 1, rep, n, S).reshape(B, 1, rep * n, S)


def fused_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """SDPA over a grouped-query cache; K and V are never repeated.

    q: (B, heads, n, d); keys, values: (B, kv_heads, S, d); mask (B, 1, n, S)
    bool, or (B, 1, rep * n, S) from `fold_gqa_mask`. With the folded mask,
    query head h = j * rep + r (kv head j, as Hugging Face's repeat_kv orders
    them) becomes query r * n + i of kv head j: a plain multi-head call of
    kv_heads heads and rep * n queries, which fused kernels serve with a mask.
    Worked example, heads 4, kv_heads 2, n 1: q (B, 4, 1, d) is viewed as
    (B, 2, 2, d); heads 0 and 1 read kv head 0 as its queries 0 and 1.
    Otherwise `enable_gqa` lets SDPA broadcast the KV heads.
    Returns (B, heads, n, d).
    """
    B, Hq, n, d = q.shape
    Hk = keys.shape[1]
    if Hq == Hk or mask.shape[2] == n:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=Hq != Hk)
    out = F.scaled_dot_product_attention(q.reshape(B, Hk, Hq // Hk * n, d), keys, values, attn_mask=mask, scale=scale)
    return out.reshape(B, Hq, n, d)  # the fused kernels may return a (B, n, heads, d) memory layout


def grouped_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                      scale: float, extents: list[tuple[int, int]] | None = None,
                      good_rows: frozenset[int] | None = None, scores_float64: bool = False) -> torch.Tensor:
    """Attention whose result does not depend on where the attended keys sit or how many queries share it.

    q: (B, heads, n, d); keys, values: (B, kv_heads, S, d); mask: (B, 1, n, S)
    bool. Scores are per (query, key) dot products over d, a matmul in the
    model's dtype whose rep * n query rows are padded to a good row count
    (`good_rows`, invariance.py; a float32 matrix of 2-3 rows sums in another
    order than one of 4); the softmax and probs @ V, the reductions over keys,
    run in float64, where summation order moves the result by ~1e-16 relative
    and the final rounding to the model's dtype absorbs it. (In bf16/fp32 a
    tree node's ancestors sit at other offsets than in plain decoding and the
    sums round differently.) The rep = heads / kv_heads query heads that share
    a KV head are stacked into one matrix, so K and V are never repeated.
    scores_float64 (a GPU, whose kernels' order over d is not probed): the
    scores are float64 dot products too, and no query row is padded.
    extents: optional per-row (queries, keys): row b computes only its first
    queries against its first keys (the rest of its rows are padding, left 0),
    one call per row; the float64 reductions make that invisible in the result.
    Returns (B, heads, n, d) in q's dtype.
    """
    if extents is not None:
        out = q.new_zeros(q.shape)
        for b, (nq, nk) in enumerate(extents):
            out[b : b + 1, :, :nq] = grouped_attention(q[b : b + 1, :, :nq], keys[b : b + 1, :, :nk],
                                                       values[b : b + 1, :, :nk], mask[b : b + 1, :, :nq, :nk], scale,
                                                       good_rows=good_rows, scores_float64=scores_float64)
        return out
    B, Hq, n, d = q.shape
    Hk, S = keys.shape[1], keys.shape[2]
    rep = Hq // Hk
    if scores_float64:
        scores = torch.matmul(q.reshape(B, Hk, rep * n, d).double(), keys.double().transpose(-1, -2)) * scale
    else:
        queries = pad_rows(q.reshape(B, Hk, rep * n, d), 2, good_rows)  # copies of the first row, dropped below
        scores = torch.matmul(queries, keys.transpose(-1, -2))[:, :, : rep * n].double() * scale
    scores = scores.view(B, Hk, rep, n, S).masked_fill(~mask.view(B, 1, 1, n, S), float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(B, Hk, rep * n, S)
    return torch.matmul(probs, values.double()).to(q.dtype).view(B, Hq, n, d)
