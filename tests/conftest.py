"""Shared fixtures: tiny seeded random models for mechanics, the embedded default for end to end."""

from __future__ import annotations


import pytest
import torch

from redraft_cli.target import Target


def tiny_llama(vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, seed: int = 0,
               logit_scale: float = 4.0, max_positions: int = 256, eos_token_id: int | None = None) -> Target:
    """A random Llama small enough for exhaustive tests.

    logit_scale sharpens the LM head so argmax ties (which make fp32 tree and
    sequential passes disagree for reasons unrelated to correctness) are rare.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = eos_token_id
    return Target(model, tokenizer=None, name=f"tiny-llama-v{vocab_size}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are all per-op overhead: with two OpenMP threads on a 2-core machine (and anything
    else running) every op pays a thread barrier. Modules of tiny-model tests use one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_target() -> Target:
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2() -> Target:
    from redraft_cli.loading import load_target

    return load_target("smollm2-135m", device="cpu")


def random_prompts(n: int, vocab_size: int, seed: int = 0, min_len: int = 3, max_len: int = 12) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        out.append(torch.randint(0, vocab_size, (length,), generator=gen).tolist())
    return out


def tiny_chat_llama(hidden_size: int = 32, layers: int = 2, seed: int = 0, max_positions: int = 256) -> Target:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template (vocabulary 49152)."""
    from transformers import AutoTokenizer

    from redraft_cli.loading import _convert_embedded

    tok = AutoTokenizer.from_pretrained(str(_convert_embedded("smollm2-135m")))
    base = tiny_llama(vocab_size=len(tok), hidden_size=hidden_size, layers=layers, seed=seed,
                      eos_token_id=tok.eos_token_id, max_positions=max_positions)
    return Target(base.model, tok, name="tiny-chat-llama")


def tiny_model_dir(model_dir, layers: int, hidden_size: int = 32):
    """A random tiny Llama saved with SmolLM2's tokenizer: (directory, tokenizer, config)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from redraft_cli.loading import _convert_embedded

    tok = AutoTokenizer.from_pretrained(str(_convert_embedded("smollm2-135m")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir, tok, cfg


def tiny_recipe(data: dict | None = None, max_steps: int = 3, every: int = 2):
    """A distillation recipe sized for tiny targets: 10 built-in conversations (2 held out), short answers."""
    from redraft_cli.distill.recipe import recipe_from_dict

    return recipe_from_dict({
        "name": "tiny",
        "data": {"num_prompts": 10, "held_out": 2, "max_new_tokens": 8, "gen_batch_size": 4, "shard_size": 4,
                 "cache_hidden": True, **(data or {})},
        "drafter": {"head": "tied", "num_layers": 1, "predict_tokens": 2},
        "train": {"max_steps": max_steps, "batch_size": 4, "eval_every": every, "save_every": every,
                  "positions_per_sequence": 4},
        "eval": {"bench_prompts": 1, "bench_max_new_tokens": 6},
        "beam": {"width": 2, "length": 3},
    })


def distill_events(recipe, target, tmp_path, out: str = "out", **kw) -> tuple[list[dict], dict]:
    """Run the distillation pipeline (no bench) with its data in tmp_path/data; returns (events, data_done event)."""
    from redraft_cli.distill.pipeline import distill

    events: list[dict] = []
    distill(recipe, tmp_path / out, on_event=events.append, target=target, data_dir=tmp_path / "data", bench=False, **kw)
    return events, next(e for e in events if e["event"] == "data_done")
