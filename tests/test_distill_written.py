"""Prompts written by the target (written.py): the user-turn prefix, filtering, resumption, the pipeline."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import distill_events, tiny_chat_llama, tiny_recipe
from redraft_cli.distill import written
from redraft_cli.distill.written import WritingConfig, user_turn_prefix, write_prompts
from redraft_cli.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target():
    return tiny_chat_llama(seed=3)


def fake_writer(target, calls):
    """Stands in for sampling: batch b yields, per row, a message chosen by a generator seeded with b:
    whole messages (EOS-ended), duplicates, too-short ones and messages cut at max_tokens (no EOS)."""
    tok = target.tokenizer
    eos = sorted(target.eos_ids)[0]
    pool = [f"Please explain topic number {i} in simple words" for i in range(40)]
    pool += ["Hi there", "  please EXPLAIN topic number 3   in simple words "]  # too short; a duplicate of #3

    def generate_batch(tgt, prompts, cfg, seed=None):
        calls.append(seed)
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in prompts:
            text = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            ids = tok.encode(text, add_special_tokens=False)
            out.append(ids + [eos] if int(torch.randint(4, (1,), generator=gen)) else ids)  # 1 in 4 cut short
        return out

    return generate_batch


def test_user_turn_prefix_is_the_template_up_to_the_users_text(target):
    text = target.tokenizer.decode(user_turn_prefix(target))
    assert text.endswith("<|im_start|>user\n")
    assert "<|im_start|>system" in text and "<|im_start|>assistant" not in text
    assert "Be brief." in target.tokenizer.decode(user_turn_prefix(target, system="Be brief."))


def test_written_prompts_are_whole_new_and_long_enough_and_resume_identically(target, tmp_path, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(written, "generate_batch", fake_writer(target, calls))
    cfg = WritingConfig(count=12, batch_size=4, seed=5)
    full = write_prompts(target, tmp_path / "a", cfg)
    assert len(full) == 12 and len({" ".join(p.lower().split()) for p in full}) == 12
    assert all(len(p.split()) >= cfg.min_words and p == p.strip() for p in full)
    rows = [json.loads(line) for line in (tmp_path / "a" / "prompts.jsonl").read_text().splitlines()]
    assert [r["turns"][0] for r in rows] == full

    # Interrupted after 2 batches, then resumed: the same prompts, and no batch sampled twice.
    batches = len(calls)
    calls.clear()
    part = write_prompts(target, tmp_path / "b", WritingConfig(count=3, batch_size=4, seed=5))
    seeds_before = list(calls)
    again = write_prompts(target, tmp_path / "b", cfg)
    assert again == full
    assert len(calls) == batches and len(set(calls)) == len(calls) and calls[: len(seeds_before)] == seeds_before
    assert part == full[: len(part)]
    # Other settings in the same directory: refused, not mixed.
    with pytest.raises(BadInputError, match="other settings"):
        write_prompts(target, tmp_path / "a", WritingConfig(count=12, batch_size=4, seed=6))


def test_a_target_that_never_finishes_a_message_fails_clearly(target, tmp_path, monkeypatch):
    monkeypatch.setattr(written, "generate_batch", lambda tgt, prompts, cfg, seed=None: [[5, 6, 7] for _ in prompts])
    with pytest.raises(BadInputError, match="usable prompts"):
        write_prompts(target, tmp_path, WritingConfig(count=4, batch_size=2))
    with pytest.raises(BadInputError, match="temperature"):
        WritingConfig(count=4, temperature=0)


def test_distill_pipeline_with_written_prompts(target, tmp_path, monkeypatch):
    monkeypatch.setattr(written, "generate_batch", fake_writer(target, []))
    recipe = tiny_recipe({"num_prompts": 6, "max_new_tokens": 6, "written_prompts": 6}, max_steps=2)
    events, done = distill_events(recipe, target, tmp_path)
    assert (done["train"], done["written"], done["held_out"]) == (4, 6, 2)
    wdir = next((tmp_path / "data").glob("written-*"))
    prompts = [json.loads(line)["turns"][0] for line in (wdir / "prompts.jsonl").read_text().splitlines()]
    manifest = json.loads((wdir / "manifest.json").read_text())
    assert len(prompts) == 6 and manifest["num_conversations"] == 6
    assert any(e["event"] == "writing" for e in events)
    # --no-generate later reuses them as they are.
    events, done = distill_events(recipe, target, tmp_path, out="out2", generate=False)
    assert done["written"] == 6
    assert not any(e["event"] in ("writing", "data") for e in events)
    # A larger count writes more prompts and answers only the new ones; a smaller one uses the first.
    before = {p.name: p.stat().st_mtime_ns for p in wdir.glob("shard-*")}
    more = tiny_recipe({"num_prompts": 6, "max_new_tokens": 6, "written_prompts": 10}, max_steps=3)
    events, done = distill_events(more, target, tmp_path, out="out3")
    assert done["written"] == 10 and json.loads((wdir / "manifest.json").read_text())["num_conversations"] == 10
    assert max(e["done"] for e in events if e["event"] == "data" and e["set"] == "written prompts") == 10
    assert all(p.stat().st_mtime_ns == before[p.name] for p in wdir.glob("shard-*") if p.name in before
               and int(p.name[6:11]) < 6 // more.data.shard_size)
    fewer = tiny_recipe({"num_prompts": 6, "max_new_tokens": 6, "written_prompts": 4}, max_steps=2)
    events, done = distill_events(fewer, target, tmp_path, out="out4")
    assert done["written"] == 4 and not any(e["event"] == "data" for e in events)
