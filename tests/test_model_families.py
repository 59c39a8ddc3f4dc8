"""Hugging Face families beyond the lean Llama path: the generic path runs them through the model's own
attention with a 4D tree mask. Each tiny random model must verify trees exactly (greedy output equal to
plain decoding's, with an oracle proposer so that trees do get accepted); families whose attention cannot
take a tree (ALiBi built from a 2D mask, recurrent state-space layers, a mask ignored) are refused at load
with one line."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers as T

from conftest import tiny_model_dir
from redraft_cli import DecodeConfig, Generator
from redraft_cli.errors import ModelLoadError
from redraft_cli.loading import load_target
from redraft_cli.target import Target, check_tree_pass
from test_decode_greedy import OracleProposer

V = 96
SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=256)
GQA = dict(SMALL, num_key_value_heads=2)
FAMILIES = {
    "gpt2": (T.GPT2Config, dict(n_layer=2, n_embd=32, n_head=2, n_positions=256)),
    "gpt_neox": (T.GPTNeoXConfig, SMALL),
    "phi3": (T.Phi3Config, dict(GQA, pad_token_id=0)),
    "gemma2": (T.Gemma2Config, dict(GQA, head_dim=8, sliding_window=512)),
    "falcon": (T.FalconConfig, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4)),
    "opt": (T.OPTConfig, dict(SMALL, ffn_dim=64, word_embed_proj_dim=32)),
    "mixtral": (T.MixtralConfig, dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "llama4_text": (T.Llama4TextConfig, dict(GQA, head_dim=8, intermediate_size_mlp=64, num_local_experts=2)),
}


def _tiny(family: str) -> Target:
    config_class, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config_class(vocab_size=V, **kwargs)).eval()
    return Target(model, tokenizer=None, name=family)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generic_families_verify_trees_exactly(family, one_thread):
    target = _tiny(family)
    assert target.lean is None
    check_tree_pass(target)  # what load_target runs for the generic path
    cfg = DecodeConfig(max_new_tokens=16, beam_width=3, beam_length=4)
    prompt = [7, 3, 44, 2, 8]
    plain = Generator(target).generate(prompt, cfg, "plain")
    out = Generator(target, proposer=OracleProposer(target, seed=1)).generate(prompt, cfg, "redraft")
    assert out.tokens == plain.tokens
    assert len(out.steps) < len(out.tokens)  # trees were accepted, not just the bonus token


def test_a_recurrent_model_is_refused(one_thread):
    """Mamba's cache holds a recurrent state: one tree pass would run every branch through it."""
    model = T.AutoModelForCausalLM.from_config(T.MambaConfig(vocab_size=V, num_hidden_layers=2, hidden_size=32))
    with pytest.raises(ModelLoadError, match="recurrent layers .*attention-only"):
        Target(model.eval(), tokenizer=None, name="mamba")


def test_alibi_from_a_2d_mask_is_refused_at_load(tmp_path, one_thread):
    """Bloom builds ALiBi from a 2D attention mask, so a 4D tree mask fails inside its forward."""
    _, tok, _ = tiny_model_dir(tmp_path / "llama", layers=1)
    bloom = tmp_path / "bloom"
    T.BloomForCausalLM(T.BloomConfig(vocab_size=len(tok), n_layer=1, hidden_size=32, n_head=4)).save_pretrained(bloom)
    tok.save_pretrained(bloom)
    with pytest.raises(ModelLoadError, match=r"cannot run a tree pass: its attention does not take a 4D mask"):
        load_target(str(bloom), device="cpu")


def test_a_model_that_ignores_the_tree_mask_is_refused(tmp_path, monkeypatch, one_thread):
    """A model whose attention drops the 4D mask would let a node see its siblings: every verification
    would check a draft against the wrong context. The load-time probe catches it."""
    from transformers.models.llama import modeling_llama

    model_dir, _, _ = tiny_model_dir(tmp_path / "llama", layers=2)
    monkeypatch.setenv("REDRAFT_GENERIC", "1")
    assert load_target(str(model_dir), device="cpu").lean is None  # the generic path passes the probe

    forward = modeling_llama.LlamaModel.forward

    @functools.wraps(forward)
    def without_mask(self, *args, **kwargs):
        kwargs["attention_mask"] = None
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", without_mask)
    with pytest.raises(ModelLoadError, match="does not honour a tree attention mask"):
        load_target(str(model_dir), device="cpu")


WINDOWED = dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=64, max_position_embeddings=256, sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
WINDOWED_FAMILIES = {
    "gemma2": (T.Gemma2Config, WINDOWED),
    "gemma3_text": (T.Gemma3TextConfig, WINDOWED),
    "gpt_oss": (T.GptOssConfig, dict(WINDOWED, num_local_experts=4, num_experts_per_tok=2)),
    "gemma3_text, every layer sliding": (T.Gemma3TextConfig, dict(WINDOWED, layer_types=["sliding_attention"] * 3)),
}


@pytest.mark.parametrize("family", sorted(WINDOWED_FAMILIES))
def test_sliding_window_families_decode_past_the_window(family, one_thread):
    """Sliding-window layers on the generic path: the cache keeps every key and each layer type gets
    its own mask (a dict the model's forward takes), so the context is the model's, not the window's.
    Plain decoding equals Hugging Face's own generate() far past the window of 8 (a window off by one
    does not), and greedy ReDrafter with accepted trees equals plain decoding."""
    config_class, kwargs = WINDOWED_FAMILIES[family]
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config_class(vocab_size=V, **kwargs)).eval()
    model.generation_config.eos_token_id = None
    target = Target(model, tokenizer=None, name=family)
    assert target.lean is None and target.window == 8 and target.layer_masks and target.max_context == 256
    check_tree_pass(target)
    cfg = DecodeConfig(max_new_tokens=40, beam_width=3, beam_length=4)
    prompt = [7, 3, 44, 2, 8, 19, 33, 1, 5, 9, 12, 60, 61, 70]
    plain = Generator(target).generate(prompt, cfg, "plain").tokens
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    assert plain == hf[0, len(prompt):].tolist()
    out = Generator(target, proposer=OracleProposer(target, seed=1)).generate(prompt, cfg, "redraft")
    assert out.tokens == plain and len(out.steps) < 20


@pytest.mark.parametrize("pad", [2, V // 3])
def test_the_load_time_probes_skip_a_zero_pad_row(pad, one_thread):
    """A pad token's embedding row is zero: a probe that hid it moved no state, and the per-layer masks
    were refused (a Gemma-2 with pad id 2, SmolLM2's tokenizer, had its context cut to the window)."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.Gemma2Config(vocab_size=V, pad_token_id=pad, **WINDOWED)).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight[pad] = 0
    target = Target(model, tokenizer=None, name="gemma2")
    assert target.layer_masks and target.max_context == 256
    check_tree_pass(target)


def test_layer_type_masks_hide_keys_a_window_back():
    """Worked example: window 2, two committed tokens, a tree of two siblings at position 2."""
    from redraft_cli.target import layer_type_masks

    tree = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.bool)
    masks = layer_type_masks(tree, 2, torch.tensor([[2, 2]]), window=2, dtype=torch.float32)
    low = torch.finfo(torch.float32).min
    assert masks["full_attention"][0, 0].tolist() == [[0, 0, 0, low], [0, 0, low, 0]]
    assert masks["sliding_attention"][0, 0].tolist() == [[low, 0, 0, low], [low, 0, low, 0]]
