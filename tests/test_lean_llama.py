"""The lean Llama-family forward over a StaticKVCache matches Hugging Face's own forward.

For each family (Llama, Mistral, Qwen2, Qwen3) a tiny random model runs:
a batched prefill of prompts of different lengths, a tree step over random
beams, a commit of a non-contiguous path, and one more token; at every stage
the hidden states equal HF's forward over the same (per-row, unpadded) text.
"""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch

from redraft_cli.lean_llama import LeanLlama, lean_supported
from redraft_cli.static_cache import StaticKVCache
from redraft_cli.tree_attention import pack_tree

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; the embedded-default test is short


def tiny(model_type: str, seed: int = 0):
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    cfg_cls = getattr(transformers, f"{names[model_type]}Config")
    model_cls = getattr(transformers, f"{names[model_type]}ForCausalLM")
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "qwen3":
        kwargs["head_dim"] = 8
    if model_type == "mistral":
        kwargs["sliding_window"] = None
    cfg = cfg_cls(**kwargs)
    cfg._attn_implementation = "sdpa"
    model = model_cls(cfg).eval()
    if model_type == "qwen2":  # Qwen2 has q/k/v biases: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_()
    return model


def hf_hidden(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # (T, H)


# The GPU's exact path as a CPU can run it: good counts up to invariance.CUDA_TOP (a subset of the
# CPU's good float32 counts), float64 scores.
GPU_EXACT = dict(good_rows=frozenset({4, 8, 16, 32, 64, 128}), row_limit=129, float64_reductions=True)


def as_gpu_exact(lean: LeanLlama) -> LeanLlama:
    for name, value in GPU_EXACT.items():
        setattr(lean, name, value)
    lean.batch_invariant = True
    return lean


@pytest.mark.parametrize("fold", ["cpu-path", "folded-gqa", "gpu-exact"])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_prefill_tree_commit_match_hf(model_type, fold):
    model = tiny(model_type)
    assert lean_supported(model)
    lean = LeanLlama(model)
    if fold == "folded-gqa":  # the fused path with folded query groups that CUDA and MPS take (test_folded_gqa_attention...)
        lean.good_rows, lean.batch_invariant, lean.fold_gqa = None, False, True
    if fold == "gpu-exact":  # a CUDA device where the probe found good counts (invariance.cuda_invariant_rows)
        as_gpu_exact(lean)
    prompts = [[3, 9, 4, 1, 7], [5, 2], [8, 8, 1, 6, 2, 9, 11]]
    B, P = len(prompts), max(map(len, prompts))
    cache = lean.new_cache(B, 64, torch.float32, torch.device("cpu"))
    ids = torch.zeros(B, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    causal = torch.ones(P, P, dtype=torch.bool).tril()
    key_ok = torch.arange(P) < torch.tensor([len(p) for p in prompts]).unsqueeze(1)  # (B, P)
    hidden = lean.forward(ids, torch.arange(P).expand(B, P), cache, causal & key_ok.unsqueeze(1))
    for b, p in enumerate(prompts):
        torch.testing.assert_close(hidden[b, : len(p)], hf_hidden(model, p), atol=1e-5, rtol=1e-4)
    cache.commit(torch.arange(P).expand(B, P), torch.tensor([len(p) for p in prompts]))
    assert cache.lengths.tolist() == [5, 2, 7]

    # A tree step: W=3 beams of length 3 per row, sharing prefixes.
    beams = torch.tensor([[[1, 2, 3], [1, 2, 4], [1, 5, 6]],
                          [[7, 7, 7], [7, 8, 9], [7, 8, 10]],
                          [[4, 3, 2], [4, 3, 2], [4, 1, 1]]])
    tree = pack_tree(beams, cache.lengths)
    hidden = lean.forward(tree.tokens, tree.positions, cache, tree.mask)
    for b, p in enumerate(prompts):
        for i in range(3):
            ref = hf_hidden(model, p + beams[b, i].tolist())[len(p):]
            got = hidden[b, tree.unpack[b, i]]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)

    # Commit beam 2 of each row up to depth 1 (g0 + one draft) -- non-contiguous for rows 0 and 1.
    path = tree.unpack[:, 2, :]  # (B, 3)
    cache.commit(path, torch.tensor([2, 2, 2]))
    texts = [p + beams[b, 2, :2].tolist() for b, p in enumerate(prompts)]
    nxt = torch.tensor([[13], [14], [15]])
    hidden = lean.forward(nxt, cache.lengths.unsqueeze(1), cache, torch.ones(B, 1, 1, dtype=torch.bool))
    for b, text in enumerate(texts):
        torch.testing.assert_close(hidden[b, 0], hf_hidden(model, text + [int(nxt[b])])[-1], atol=1e-5, rtol=1e-4)

    # Dropping a finished row keeps the others intact.
    cache.commit(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, dtype=torch.long))
    cache.keep(torch.tensor([2, 0]))
    hidden = lean.forward(torch.tensor([[1], [1]]), cache.lengths.unsqueeze(1), cache, torch.ones(2, 1, 1, dtype=torch.bool))
    for row, b in enumerate([2, 0]):
        ref = hf_hidden(model, texts[b] + [int(nxt[b]), 1])[-1]
        torch.testing.assert_close(hidden[row, 0], ref, atol=1e-5, rtol=1e-4)


def test_attention_mask_worked_example():
    cache = StaticKVCache(1, 2, 1, 16, 4, torch.float32, torch.device("cpu"))
    cache.lengths = torch.tensor([2, 0])
    tree = torch.tensor([[[1, 0], [1, 1]], [[1, 0], [0, 1]]], dtype=torch.bool)
    mask, span = cache.attention_mask(tree)
    assert span == 4
    T, F = True, False
    expected = torch.tensor([[[T, T, T, F], [T, T, T, T]],   # row 0: 2 committed, then its nodes at slots 2, 3
                             [[T, F, F, F], [F, T, F, F]]])  # row 1: nothing committed, nodes at slots 0, 1
    assert torch.equal(mask[:, 0], expected)


def test_unsupported_layouts_fall_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert not lean_supported(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)))
    model = tiny("qwen2")
    model.config.layer_types = ["full_attention", "chunked_attention"]  # a layer kind the lean path lacks
    assert not lean_supported(model)


def sliding(model_type: str, window: int = 6):
    """A tiny model with a sliding window shorter than its context: every layer (Mistral v0.1) or the
    layers its layer_types name (Qwen2: the first full, the second sliding)."""
    if model_type == "mistral":
        model = tiny("mistral")
        model.config.sliding_window = window
    else:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                       use_sliding_window=True, sliding_window=window, max_window_layers=1)
        cfg._attn_implementation = "sdpa"
        model = transformers.Qwen2ForCausalLM(cfg).eval()
        assert cfg.layer_types == ["full_attention", "sliding_attention"]
    return model


@pytest.mark.parametrize("fold", ["cpu-path", "folded-gqa", "gpu-exact"])
@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_sliding_windows_match_hf_past_the_window(model_type, fold):
    """Sliding-window layers on the lean path: prefill, a tree and plain steps well past the window
    give HF's hidden states for the whole text (its mask: a key within the window's positions)."""
    model = sliding(model_type)
    assert lean_supported(model)
    lean = LeanLlama(model)
    assert lean.windows == ([6, 6] if model_type == "mistral" else [None, 6])
    if fold == "folded-gqa":
        lean.good_rows, lean.batch_invariant, lean.fold_gqa = None, False, True
    if fold == "gpu-exact":
        as_gpu_exact(lean)
    prompt = [3, 9, 4, 1, 7, 2, 8, 5, 11, 6]  # 10 tokens: past the window of 6
    cache = lean.new_cache(1, 64, torch.float32, torch.device("cpu"))
    P = len(prompt)
    hidden = lean.forward(torch.tensor([prompt]), torch.arange(P).view(1, P), cache,
                          torch.ones(1, P, P, dtype=torch.bool).tril())
    torch.testing.assert_close(hidden[0], hf_hidden(model, prompt), atol=1e-5, rtol=1e-4)
    cache.commit(torch.arange(P).view(1, P), torch.tensor([P]))
    beams = torch.tensor([[[1, 2, 3, 4, 5, 6, 7], [1, 2, 9, 9, 9, 9, 9], [1, 5, 6, 7, 8, 9, 10]]])
    tree = pack_tree(beams, cache.lengths)
    hidden = lean.forward(tree.tokens, tree.positions, cache, tree.mask)
    for i in range(3):
        ref = hf_hidden(model, prompt + beams[0, i].tolist())[P:]
        torch.testing.assert_close(hidden[0, tree.unpack[0, i]], ref, atol=1e-5, rtol=1e-4)
    cache.commit(tree.unpack[:, 2, :], torch.tensor([5]))  # beam 2 up to depth 4: not the first slots
    text = prompt + beams[0, 2, :5].tolist()
    for tok in (13, 14, 15):  # plain steps
        hidden = lean.forward(torch.tensor([[tok]]), cache.lengths.view(1, 1), cache, torch.ones(1, 1, 1, dtype=torch.bool))
        cache.advance(1)
        text.append(tok)
        torch.testing.assert_close(hidden[0, 0], hf_hidden(model, text)[-1], atol=1e-5, rtol=1e-4)


def test_a_sliding_window_model_decodes_past_its_window_exactly():
    """Mistral v0.1's layout (a window shorter than the context): on the lean path its context is the
    model's, and greedy ReDrafter equals plain decoding far past the window. On the generic path (whose
    cache trims sliding layers) the context stops one short of the window, where a sliding layer attends
    to everything, and a longer prompt is a clear error."""
    from redraft_cli import DecodeConfig, Drafter, Generator, Target
    from redraft_cli.errors import ContextOverflowError

    target = Target(sliding("mistral", 16), None, name="tiny-mistral-window")
    assert target.lean is not None and target.max_context == 128
    gen = Generator(target, Drafter.for_target(target, seed=0))
    cfg = DecodeConfig(max_new_tokens=60, beam_width=4, beam_length=5)
    for prompt in ([5, 6, 7], list(range(5, 30))):
        plain = gen.generate(prompt, cfg, mode="plain").tokens
        assert gen.generate(prompt, cfg).tokens == plain and len(plain) == 60

    # Rows of different lengths in one batch (each row's window from its own positions), Qwen2's mixed layers.
    from conftest import random_prompts

    target = Target(sliding("qwen2", 5), None, name="tiny-qwen2-window")
    prompts = random_prompts(3, target.vocab_size, seed=4, min_len=2, max_len=14)
    gen = Generator(target, Drafter.for_target(target, seed=1))
    cfg = DecodeConfig(max_new_tokens=30, beam_width=3, beam_length=4, stop_on_eos=False)
    singles = [gen.generate(p, cfg, mode="plain").tokens for p in prompts]
    assert gen.generate_batch(prompts, cfg, slots=2).tokens == singles

    with patch.dict("os.environ", {"REDRAFT_GENERIC": "1"}):
        target = Target(sliding("mistral", 16), None, name="tiny-mistral-window")
    assert target.lean is None and target.max_context == 15
    gen = Generator(target, Drafter.for_target(target, seed=0))
    for prompt in ([5, 6, 7], list(range(5, 13))):
        cfg = DecodeConfig(max_new_tokens=50, beam_width=4, beam_length=5)
        plain = gen.generate(prompt, cfg, mode="plain").tokens
        assert gen.generate(prompt, cfg).tokens == plain and len(prompt) + len(plain) == 15
    with pytest.raises(ContextOverflowError, match="context is 15 .*takes 128 positions.*sliding window of 16"):
        gen.generate(list(range(5, 25)), DecodeConfig(max_new_tokens=4))


def invariant_tiny_llama(dtype: torch.dtype, **kwargs):
    """tiny_llama in `dtype` on the lean path; skips where this CPU's matmuls are never batch-invariant."""
    from conftest import tiny_llama

    target = tiny_llama(**kwargs)
    target.model.to(dtype)
    target.__init__(target.model, None, target.name)  # re-read dtype, rebuild the lean path
    if not target.batch_invariant:
        pytest.skip(f"{dtype} matmuls on this CPU are batch-invariant at no row count (invariance.py)")
    assert target.compute_dtype == dtype
    return target


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cpu_passes_are_batch_invariant(dtype):
    """On CPU a token's hidden state and logits are bitwise the same whether it runs alone, in a
    chain, in a tree or in a batch (every pass padded to a good row count), so greedy ReDrafter
    equals plain decoding exactly."""
    target = invariant_tiny_llama(dtype, hidden_size=64, layers=3, seed=5)
    lean = target.lean
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(0))

    def run(chunks):
        cache = lean.new_cache(2, 64, dtype, torch.device("cpu"))
        outs, pos = [], 0
        for n in chunks:
            h = lean.forward(ids[:, pos : pos + n], torch.arange(pos, pos + n).expand(2, n), cache,
                             torch.ones(2, n, n, dtype=torch.bool).tril())
            cache.commit(torch.arange(n).expand(2, n), torch.tensor([n, n]))
            outs.append(h)
            pos += n
        return torch.cat(outs, 1)

    one_by_one = run([30] + [1] * 10)
    for chunks in ([30, 10], [40], [30, 3, 7], [30, 1, 4, 5]):
        assert torch.equal(run(chunks)[:, 30:], one_by_one[:, 30:]), chunks
    rows = one_by_one[:, 30:]  # (2, 10, H)
    single = torch.stack([torch.stack([target.logits(rows[b, i]) for i in range(10)]) for b in range(2)])
    assert torch.equal(target.logits(rows), single)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tree_nodes_equal_their_sequential_runs(dtype):
    """A branching tree puts a node's ancestors at other offsets than plain decoding does; the
    reductions over keys must not care (this is the case chains alone do not cover)."""
    target = invariant_tiny_llama(dtype, hidden_size=64, layers=3, seed=6)
    lean = target.lean
    gen = torch.Generator().manual_seed(1)
    for trial in range(6):
        prompt = torch.randint(0, 64, (1, 25 + trial), generator=gen)
        beams = torch.randint(0, 64, (1, 4, 5), generator=gen)
        beams[:, :, 0] = beams[0, 0, 0]
        beams[:, 1, :2] = beams[:, 0, :2]  # shared prefixes: a real tree
        beams[:, 3, :3] = beams[:, 2, :3]
        P = prompt.shape[1]
        cache = lean.new_cache(1, 96, dtype, torch.device("cpu"))
        lean.forward(prompt, torch.arange(P)[None], cache, torch.ones(1, P, P, dtype=torch.bool).tril())
        cache.commit(torch.arange(P)[None], torch.tensor([P]))
        tree = pack_tree(beams, cache.lengths)
        hidden = lean.forward(tree.tokens, tree.positions, cache, tree.mask)
        for i in range(4):
            seq = StaticKVCache(3, 1, lean.kv_heads, 96, lean.head_dim, dtype, torch.device("cpu"))
            lean.forward(prompt, torch.arange(P)[None], seq, torch.ones(1, P, P, dtype=torch.bool).tril())
            seq.commit(torch.arange(P)[None], torch.tensor([P]))
            for k in range(5):
                h = lean.forward(beams[:, i, k : k + 1], torch.tensor([[P + k]]), seq, torch.ones(1, 1, 1, dtype=torch.bool))
                seq.commit(torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]))
                assert torch.equal(h[0, 0], hidden[0, tree.unpack[0, i, k]]), (trial, i, k)


def test_embedded_default_bfloat16_greedy_identity_on_a_near_tie(smollm2):
    """Built-in bench prompt 6 reaches a 1-ulp tie between two tokens after 44 tokens; with float32
    reductions over keys the tree pass rounded the other way and ReDrafter's output diverged."""
    from redraft_cli import DecodeConfig, Generator
    from redraft_cli.cli.common import resolve_drafter
    from redraft_cli.prompts import load_prompts

    if smollm2.compute_dtype != torch.bfloat16:
        pytest.skip("this CPU has no native bfloat16")
    drafter, _ = resolve_drafter(smollm2, "auto", 0)
    gen = Generator(smollm2, drafter)
    ids = smollm2.encode_chat(load_prompts(None, limit=10)[5])
    cfg = DecodeConfig(max_new_tokens=48, beam_width=2, beam_length=3, lookup_beams=1)
    assert gen.generate(ids, cfg, "redraft").tokens == gen.generate(ids, cfg, "plain").tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_nodes_are_skipped_without_changing_real_ones(dtype):
    """Rows of a batched tree with fewer nodes are padded; with `valid` the projections and MLP
    run on the real nodes only, and the real nodes' hidden states and cached K/V are those of the
    padded forward (bitwise in bfloat16, where the lean path is batch-invariant)."""
    from conftest import tiny_llama
    from redraft_cli.lookup import PAD

    target = tiny_llama(hidden_size=64, layers=3, seed=7)
    target.model.to(dtype)
    target.__init__(target.model, None, target.name)
    lean = target.lean
    gen = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, 64, (3, 20), generator=gen)
    beams = torch.randint(0, 64, (3, 3, 4), generator=gen)
    beams[:, :, 0] = beams[:, :1, 0]
    beams[1, 1:] = beams[1, :1]  # row 1: one beam only (4 nodes)
    beams[2, :, 2:] = PAD  # row 2: beams of 2 tokens (4 nodes)
    runs = []
    for valid in (False, True):
        cache = lean.new_cache(3, 64, dtype, torch.device("cpu"))
        lean.forward(prompts, torch.arange(20).expand(3, 20), cache, torch.ones(3, 20, 20, dtype=torch.bool).tril())
        cache.commit(torch.arange(20).expand(3, 20), torch.full((3,), 20))
        tree = pack_tree(beams, cache.lengths)
        hidden = lean.forward(tree.tokens, tree.positions, cache, tree.mask, tree.valid if valid else None)
        logits = target.logits_at(hidden, tree.valid) if valid else target.logits(hidden)
        runs.append((hidden, logits, cache, tree))
    (h0, l0, c0, tree), (h1, l1, c1, _) = runs
    assert tree.num_nodes.tolist() == [10, 4, 4] and not bool(tree.valid.all())
    real = tree.valid
    same = torch.equal if dtype == torch.bfloat16 else (lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-4))
    assert same(h1[real], h0[real]) and same(l1[real], l0[real])
    assert not h1[~real].any() and not l1[~real].any()
    slots = c0.slots(tree.n)[real]  # (N,) cache slots of the real nodes, row by row
    row = real.nonzero()[:, 0]
    assert same(c1.keys[:, row, :, slots], c0.keys[:, row, :, slots])
    assert same(c1.values[:, row, :, slots], c0.values[:, row, :, slots])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_family_is_batch_invariant_on_cpu(model_type, dtype):
    """Each Llama-family layout (Qwen2's biases, Qwen3's q/k norms and head_dim) in each precision:
    a tree node's hidden state has the bits of the same token decoded one at a time, in a batch of 3
    rows (odd, so float32 passes need padding rows)."""
    model = tiny(model_type, seed=3).to(dtype)
    lean = LeanLlama(model)
    if not lean.batch_invariant:
        pytest.skip(f"{dtype} matmuls on this CPU are batch-invariant at no row count (invariance.py)")
    gen = torch.Generator().manual_seed(4)
    B, P = 3, 12
    prompt = torch.randint(0, 64, (B, P), generator=gen)
    beams = torch.randint(0, 64, (B, 3, 4), generator=gen)
    beams[:, :, 0] = beams[:, :1, 0]
    beams[:, 1, :2] = beams[:, 0, :2]

    def prefilled():
        cache = lean.new_cache(B, 48, dtype, torch.device("cpu"))
        lean.forward(prompt, torch.arange(P).expand(B, P), cache, torch.ones(B, P, P, dtype=torch.bool).tril())
        cache.commit(torch.arange(P).expand(B, P), torch.full((B,), P))
        return cache

    cache = prefilled()
    tree = pack_tree(beams, cache.lengths)
    hidden = lean.forward(tree.tokens, tree.positions, cache, tree.mask)
    for i in range(3):
        seq = prefilled()
        for k in range(4):
            h = lean.forward(beams[:, i, k : k + 1], seq.lengths.unsqueeze(1), seq, torch.ones(B, 1, 1, dtype=torch.bool))
            seq.commit(torch.zeros(B, 1, dtype=torch.long), torch.ones(B, dtype=torch.long))
            for b in range(B):
                assert torch.equal(h[b, 0], hidden[b, tree.unpack[b, i, k]]), (b, i, k)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_folded_gqa_attention_matches_hf(model_type):
    """Off the CPU the fused path stacks each KV head's query heads as extra queries (`fold_gqa`, so
    a masked GQA call gets a fused kernel); forced on here, it gives HF's hidden states for a
    prefill and a tree step."""
    from redraft_cli.lean_llama import fold_gqa_mask, fused_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.rand(2, 1, 3, 5) > 0.3
    mask[..., 0] = True
    folded = fold_gqa_mask(mask, 3)
    assert folded.shape == (2, 1, 9, 5) and torch.equal(folded[:, :, 3:6], mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                           attn_mask=mask, scale=0.3)
    torch.testing.assert_close(fused_attention(q, k, v, folded, 0.3), ref)
    torch.testing.assert_close(fused_attention(q, k, v, mask, 0.3), ref)
    # CUDA's fused kernels can return their output in a (B, n, heads, d) memory layout, which a
    # view cannot unfold (it failed on an H200 in session 17): the same values in that layout.
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with patch("redraft_cli.lean_llama.F.scaled_dot_product_attention",
               lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2)):
        torch.testing.assert_close(fused_attention(q, k, v, folded, 0.3), ref)

    model = tiny(model_type)
    lean = LeanLlama(model)
    lean.good_rows, lean.batch_invariant, lean.fold_gqa = None, False, True
    prompt = [3, 9, 4, 1, 7]
    cache = lean.new_cache(1, 32, torch.float32, torch.device("cpu"))
    P = len(prompt)
    hidden = lean.forward(torch.tensor([prompt]), torch.arange(P)[None], cache, torch.ones(P, P, dtype=torch.bool).tril()[None])
    torch.testing.assert_close(hidden[0], hf_hidden(model, prompt), atol=1e-5, rtol=1e-4)
    cache.commit(torch.arange(P)[None], torch.tensor([P]))
    beams = torch.tensor([[[1, 2, 3], [1, 5, 6]]])
    tree = pack_tree(beams, cache.lengths)
    hidden = lean.forward(tree.tokens, tree.positions, cache, tree.mask)
    for i in range(2):
        ref = hf_hidden(model, prompt + beams[0, i].tolist())[P:]
        torch.testing.assert_close(hidden[0, tree.unpack[0, i]], ref, atol=1e-5, rtol=1e-4)


def test_longest_row_is_tracked_on_the_host():
    """Plain decoding reads no device value for the cache's length: `advance` keeps the host's count."""
    cache = StaticKVCache(1, 2, 1, 16, 4, torch.float32, torch.device("cpu"))
    cache.lengths = torch.tensor([3, 5])
    assert cache.get_seq_length() == 5
    cache.advance(2)
    assert cache._longest == 7 and cache.lengths.tolist() == [5, 7]
    cache.commit(torch.tensor([[0, 2], [0, 1]]), torch.tensor([2, 1]))
    assert cache._longest is None and cache.get_seq_length() == 8 and cache.lengths.tolist() == [7, 8]
    cache.keep(torch.tensor([0]))
    assert cache.get_seq_length() == 7
    cache.commit(torch.tensor([[0, 3, 1]]), torch.tensor([3]))
    assert cache._longest == 10 and cache.lengths.tolist() == [10]


def test_rms_norm_does_not_depend_on_summation_order():
    """The GPU exact path's RMSNorm (`rms_norm`): the mean of squares taken in float64 gives each row
    the same float32 variance whatever order a reduction sums it in (here: permuted columns), where
    the module's float32 sum does not; and it is the module's RMSNorm otherwise."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from redraft_cli.lean_llama import rms_norm

    torch.manual_seed(0)
    H = 576
    norm, shuffled = LlamaRMSNorm(H, eps=1e-5), LlamaRMSNorm(H, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
        perm = torch.randperm(H)
        shuffled.weight.copy_(norm.weight[perm])
    x = torch.randn(256, H) * 3
    with torch.no_grad():
        assert torch.equal(rms_norm(norm, x)[:, perm], rms_norm(shuffled, x[:, perm]))
        assert not torch.equal(norm(x)[:, perm], shuffled(x[:, perm]))  # the float32 sum: order shows
        torch.testing.assert_close(rms_norm(norm, x), norm(x))
        xb = x.bfloat16()
        torch.testing.assert_close(rms_norm(norm.bfloat16(), xb), norm.bfloat16()(xb))
