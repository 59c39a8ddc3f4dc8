"""Drafter training: position sampling, loss, learning, checkpoints and exact resumption."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import yaml

from conftest import distill_events, tiny_chat_llama, tiny_llama, tiny_recipe
from redraft_cli.distill.recipe import Recipe, TrainSection, load_recipe, recipe_from_dict
from redraft_cli.distill.train import collate, drafter_positions, evaluate, train_drafter
from redraft_cli.drafter import Drafter
from redraft_cli.errors import BadInputError


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic_examples(target, n: int, seed: int = 0, length: int = 24) -> list[dict]:
    """Sequences whose 'response' half is the target's own greedy continuation (self-distillation)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(0, target.vocab_size, (6,), generator=gen)
        ids = prompt.tolist()
        with torch.no_grad():
            for _ in range(length - 6):
                ids.append(int(target.model(torch.tensor([ids])).logits[0, -1].argmax()))
        mask = torch.zeros(length, dtype=torch.bool)
        mask[6:] = True
        out.append({"input_ids": torch.tensor(ids), "loss_mask": mask, "conv_index": i})
    return out


def test_positions_worked_example():
    # One sequence of 8 tokens, generated from position 3 on; K = 2.
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    attn = torch.ones(1, 8, dtype=torch.bool)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pos, inputs, labels, lmask = drafter_positions(ids, attn, mask, 2, None, None)
    # Eligible t: x_{t+2} generated -> t in 1..5; deterministic order is ascending t when no generator.
    valid_t = pos[0][lmask[0, :, 0]].tolist()
    assert sorted(valid_t) == [1, 2, 3, 4, 5]
    row = {int(t): (inputs[0, i].tolist(), labels[0, i].tolist(), lmask[0, i].tolist()) for i, t in enumerate(pos[0])}
    assert row[1] == ([12, 13], [13, 14], [True, True])  # h_1, g0 = x_2, predicts x_3, x_4
    assert row[5] == ([16, 17], [17, 0], [True, False])  # x_8 is past the end
    # A label that is not generated stops teacher forcing for later steps too.
    mask2 = torch.tensor([[0, 0, 0, 1, 0, 1, 1, 1]], dtype=torch.bool)
    pos, inputs, labels, lmask = drafter_positions(ids, attn, mask2, 2, None, None)
    row = {int(t): lmask[0, i].tolist() for i, t in enumerate(pos[0])}
    assert row[1] == [True, False]


def test_training_learns_and_resumes_exactly(tmp_path):
    target = tiny_llama(vocab_size=64, seed=5)
    data = synthetic_examples(target, 24, seed=1)
    train, held = data[4:], data[:4]
    cfg = TrainSection(max_steps=8, batch_size=4, lr=3e-3, eval_every=100, save_every=3, positions_per_sequence=8)

    def fresh():
        return Drafter.for_target(target, seed=0, head="tied", num_draft_layers=1)

    d0 = fresh()
    before = evaluate(target, d0, held, 3, 4, 64)
    full = train_drafter(target, d0, train, held, cfg, tmp_path / "full", 3)
    after = full.history[-1]
    assert after["loss"] < before["loss"], (before, after)
    assert after["mean_agreement"] > before["mean_agreement"]

    class Stop(Exception):
        pass

    def interrupt_at_5(e):
        if e["event"] == "step" and e["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_drafter(target, fresh(), train, held, cfg, tmp_path / "cut", 3, on_event=interrupt_at_5)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 5
    with pytest.raises(BadInputError, match="--resume"):
        train_drafter(target, fresh(), train, held, cfg, tmp_path / "cut", 3)
    resumed = train_drafter(target, fresh(), train, held, cfg, tmp_path / "cut", 3, resume=True)
    assert resumed.step == full.step == 8
    a = Drafter.load(tmp_path / "full" / "best").state_dict()
    b = Drafter.load(tmp_path / "cut" / "best").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    assert resumed.history[-1]["agreement"] == full.history[-1]["agreement"]


def test_collate_pads_right():
    ex = [{"input_ids": torch.tensor([1, 2, 3]), "loss_mask": torch.tensor([0, 1, 1], dtype=torch.bool)},
          {"input_ids": torch.tensor([4]), "loss_mask": torch.tensor([1], dtype=torch.bool)}]
    ids, attn, mask, hidden, greedy = collate(ex, 10)
    assert hidden is None and greedy is None
    assert ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert attn.tolist() == [[True, True, True], [True, False, False]]
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_recipes_load_and_validate(tmp_path):
    for name in ("smollm2-135m", "vicuna-7b", "qwen2.5-7b-instruct"):
        r = load_recipe(name)
        assert r.name == name
    assert load_recipe("vicuna-7b").target.model == "lmsys/vicuna-7b-v1.3"
    assert load_recipe("some-org/some-model").target.model == "some-org/some-model"
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {learning_rate: 1}\n")
    with pytest.raises(BadInputError, match="learning_rate"):
        load_recipe(str(bad))
    bad.write_text("trian: {}\n")
    with pytest.raises(BadInputError, match="trian"):
        load_recipe(str(bad))
    with pytest.raises(BadInputError):
        load_recipe(str(tmp_path / "missing.yaml"))
    assert isinstance(recipe_from_dict({}), Recipe)
    for bad_fields, fragment in (({"train": {"freeze_init": True, "weight_decay": 0.1}}, "weight_decay 0"),
                                 ({"drafter": {"context_window": -4}}, "context_window"),
                                 ({"drafter": {"weight_storage": "int4"}}, "weight_storage"),
                                 ({"data": {"held_out": -5}}, "data.held_out must be a finite number >= 0"),
                                 ({"train": {"lr": "abc"}}, "train.lr must be a number, got 'abc'"),
                                 ({"train": {"lr": float("nan")}}, "train.lr"),
                                 ({"train": {"mixed_precision": "fp8"}}, "mixed_precision"),
                                 ({"train": {"max_steps": 0}}, "train.max_steps"),
                                 ({"data": {"top_p": 1.5}}, "data.top_p must be a finite number > 0 and <= 1.0"),
                                 ({"eval": {"bench_prompts": -1}}, "eval.bench_prompts"),
                                 ({"train": {"batch_size": True}}, "train.batch_size must be a whole number, got true"),
                                 # Whole numbers where counts go, strings where names go, caught before any work.
                                 ({"train": {"batch_size": 2.5}}, "train.batch_size must be a whole number, got 2.5"),
                                 ({"data": {"num_prompts": 10.5}}, "data.num_prompts must be a whole number or null"),
                                 ({"drafter": {"num_layers": 1.5}}, "drafter.num_layers must be a whole number"),
                                 ({"eval": {"bench_max_new_tokens": 3.5}}, "eval.bench_max_new_tokens"),
                                 ({"target": {"model": 5}}, "target.model must be a string, got 5"),
                                 ({"target": {"dtype": ["float32"]}}, "target.dtype must be a string"),
                                 ({"target": {"device": "tpu"}}, r"target.device \(--device\) must be one of"),
                                 # Battery 19: whole numbers too large for a float, or for torch's 64-bit seeds.
                                 ({"train": {"epochs": 10**400}}, "train.epochs must be a finite number > 0 and <= "),
                                 ({"train": {"max_steps": 10**26}}, "train.max_steps must be a finite number >= 1 and"),
                                 ({"train": {"seed": 2**70}}, "train.seed must be a finite number >= 0 and <= 4294967295"),
                                 ({"data": {"seed": 2**40}}, "data.seed must be"),
                                 ({"data": {"source": ["a", "b"]}}, "data.source must be a string"),
                                 ({"data": {"cache_hidden": "notabool"}}, "data.cache_hidden must be true or false"),
                                 ({"data": {"sampled_answers": 1, "sampled_top_p": 5}}, "data.sampled_top_p"),
                                 ({"data": {"written_prompts": 2, "written_temperature": float("inf")}},
                                  "data.written_temperature"),
                                 ({"drafter": {"head": "own", "draft_vocab_size": 1}}, "smaller than beam.width"),
                                 ({"beam": {"width": 2, "length": 3, "lookup": 1, "lookup_length": 1000}},
                                  "beam.lookup_length"),
                                 ({"name": "/tmp/victim"}, "recipe name must be"),
                                 ({"name": "../../evil"}, "recipe name must be"),
                                 ({"name": None}, "recipe name must be a string"),
                                 ({"name": ["a", "b"]}, "recipe name must be a string")):
        with pytest.raises(BadInputError, match=fragment):
            recipe_from_dict(bad_fields)
    # A model path or id names its recipe by its last part, made safe for a folder name.
    assert load_recipe("/tmp/my model/").name == "my-model" and load_recipe("Org/Model-7B").name == "Model-7B"
    # Battery 19: a recipe changed in Python after it loaded gets the checks a YAML file or a flag gets, before
    # any work (these failed after the model loaded, or after training, or as a torch traceback).
    from redraft_cli.distill.recipe import check_recipe

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("name: r\ntarget: {model: smollm2-135m}\n")
    assert load_recipe(recipe_file).name == "r"  # (a Path, as well as a str)
    with pytest.raises(BadInputError, match="a recipe is a name, a YAML path or a model id/path, got NoneType"):
        load_recipe(None)
    for section, name, value, fragment in (("train", "dropout", 5.0, r"train.dropout must be in \[0, 1\)"),
                                           ("drafter", "weight_storage", "fp8", "drafter.weight_storage must be"),
                                           ("beam", "width", 0, "beam.width must be >= 1"),
                                           ("drafter", "head", "shared", "drafter.head"),
                                           ("train", "freeze_init", True, "train.freeze_init needs a drafter")):
        changed = load_recipe(recipe_file)
        setattr(getattr(changed, section), name, value)
        with pytest.raises(BadInputError, match=fragment):
            check_recipe(changed)
    changed = load_recipe(recipe_file)
    changed.drafter.dropout = 0.1  # (battery 20: a field of another section, set from Python, changed nothing)
    with pytest.raises(BadInputError, match=r"drafter has no field 'dropout' \(it is train.dropout\)"):
        check_recipe(changed)
    changed = load_recipe(recipe_file)
    changed.eval = None
    with pytest.raises(BadInputError, match="recipe.eval must be an EvalSection, got null"):
        check_recipe(changed)
    import numpy as np

    changed = load_recipe(recipe_file)  # numpy's numbers become Python's (recipe.yaml is written from them)
    changed.train.lr, changed.train.max_steps, changed.beam.width = np.float32(0.5), np.int64(7), np.int8(2)
    changed.data.system, changed.data.cache_hidden = np.str_("Be brief."), np.False_  # (battery 23: np.str_ crashed
    check_recipe(changed)                                                            # the YAML after the model loaded)
    assert (type(changed.train.lr), type(changed.train.max_steps), type(changed.beam.width)) == (float, int, int)
    assert (type(changed.data.system), changed.data.cache_hidden) == (str, False)
    assert "max_steps: 7" in yaml.safe_dump(dataclasses.asdict(changed))
    changed.train.kl_weight = np.bool_(True)
    with pytest.raises(BadInputError, match="train.kl_weight must be a number"):
        check_recipe(changed)
    with pytest.raises(BadInputError, match="a key must be a name, not a list"):
        (tmp_path / "key.yaml").write_text("name: r\n? [a, b]\n: 1\n")
        load_recipe(str(tmp_path / "key.yaml"))


def test_distill_pipeline_end_to_end(tmp_path):
    """Recipe -> generated data -> training -> final drafter that bench can load."""
    from redraft_cli.distill.pipeline import distill

    target = tiny_chat_llama(seed=2)
    recipe = tiny_recipe()
    recipe.drafter.weight_storage = "bfloat16"  # the shipped recipe's: the final file in bfloat16
    events = []
    result = distill(recipe, tmp_path / "out", on_event=events.append, target=target, data_dir=tmp_path / "data")
    out = result.out
    for name in ("config.json", "model.safetensors", "recipe.yaml", "metrics.json"):
        assert (out / name).is_file(), name
    d = Drafter.load(out)
    assert d.rnn_w.weight.dtype == torch.bfloat16 and Drafter.load(out / "best").rnn_w.weight.dtype == torch.float32
    assert (d.config.beam_width, d.config.beam_length, d.config.predict_tokens) == (2, 3, 2)
    d.check_target(target.hidden_size, target.vocab_size)
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 3 and len(m["history"]) == 2 and "agreement" in m["history"][0]
    assert m["bench"]["identical_outputs"] == 1
    # Greedy data with cached hidden states: tokens per step simulated on every held-out answer.
    assert m["simulated"]["answers"] >= 2 and m["simulated"]["tokens_per_step"] >= 1.0
    assert (m["simulated"]["beam_width"], m["simulated"]["beam_length"]) == (2, 3)
    kinds = {e["event"] for e in events}
    assert {"data", "step", "eval", "finished"} <= kinds


@pytest.mark.parametrize("greedy", [False, True])
def test_hidden_cache_interrupted_mid_chunk_resumes_at_the_next_batch(tmp_path, greedy):
    """Ctrl-C inside a chunk keeps its finished batches; the rerun computes only the rest, and the
    chunk equals one written without interruption. A temporary left by a kill in mid-save is removed."""
    from redraft_cli.distill.hidden_cache import attach_hidden, build_hidden_cache

    target = tiny_llama(vocab_size=64, seed=7)
    data = synthetic_examples(target, 10, seed=3)
    build_hidden_cache(target, data, tmp_path / "whole", batch_size=2, chunk_size=8, greedy=greedy)
    attach_hidden(data, tmp_path / "whole", target.name)
    whole = [(e.pop("hidden"), e.pop("greedy", None)) for e in data]

    seen = []

    def interrupt(done, total):
        seen.append(done)
        if done == 6:  # three batches of the first chunk are done
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_hidden_cache(target, data, tmp_path / "h", batch_size=2, chunk_size=8, greedy=greedy, progress=interrupt)
    assert len(list((tmp_path / "h").glob("*.partial.safetensors"))) == 1
    stale = tmp_path / "h" / ".hidden-00000.safetensors.tmp99999"  # what a kill -9 in the middle of a save leaves
    stale.write_bytes(b"\0" * 64)
    seen.clear()
    build_hidden_cache(target, data, tmp_path / "h", batch_size=2, chunk_size=8, greedy=greedy,
                       progress=lambda done, total: seen.append(done))
    assert seen == [8, 10]  # the first chunk's last batch, then the second chunk
    assert not list((tmp_path / "h").glob("*.partial.safetensors")) and not stale.exists()
    attach_hidden(data, tmp_path / "h", target.name)
    for e, (hidden, labels) in zip(data, whole):
        assert torch.equal(e["hidden"], hidden)
        if greedy:
            assert torch.equal(e["greedy"], labels)


def test_hidden_cache_round_trip_resume_and_training_without_target_forward(tmp_path):
    from redraft_cli.distill.hidden_cache import attach_hidden, build_hidden_cache, is_cached

    target = tiny_llama(vocab_size=64, seed=7)
    data = synthetic_examples(target, 10, seed=3)
    calls = []
    assert not is_cached(data, tmp_path / "h", target.name, chunk_size=4)
    build_hidden_cache(target, data, tmp_path / "h", batch_size=3, chunk_size=4,
                       progress=lambda done, total: calls.append(done))
    assert calls[-1] == 10
    assert is_cached(data, tmp_path / "h", target.name, chunk_size=4)
    assert not is_cached(data, tmp_path / "h", target.name, chunk_size=4, greedy=True)  # another layout
    assert not is_cached(data + synthetic_examples(target, 1, seed=5), tmp_path / "h", target.name, chunk_size=4)
    manifest = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert sorted(manifest["chunks"]) == ["0", "1", "2"]
    # A rerun finds every chunk done and computes nothing.
    build_hidden_cache(target, data, tmp_path / "h", batch_size=3, chunk_size=4,
                       progress=lambda done, total: pytest.fail("recomputed a finished chunk"))
    attach_hidden(data, tmp_path / "h", target.name)
    for e in data:
        with torch.no_grad():
            ref = target.base(input_ids=e["input_ids"][None]).last_hidden_state[0]
        torch.testing.assert_close(e["hidden"].float(), ref, atol=0.05, rtol=0.02)
    with pytest.raises(BadInputError):
        attach_hidden(data[:5], tmp_path / "h", target.name)
    # More data (more shards generated): the full chunks are kept, only the changed last one and new ones run.
    more = data + synthetic_examples(target, 5, seed=4)
    calls.clear()
    build_hidden_cache(target, more, tmp_path / "h", batch_size=3, chunk_size=4,
                       progress=lambda done, total: calls.append(done))
    assert min(calls) > 8 and calls[-1] == 15
    attach_hidden(more, tmp_path / "h", target.name)
    torch.testing.assert_close(more[3]["hidden"], data[3]["hidden"])
    # The smaller set's partial last chunk is still there: a short and a full run share the cache
    # without recomputing each other's chunks.
    build_hidden_cache(target, data, tmp_path / "h", batch_size=3, chunk_size=4,
                       progress=lambda done, total: pytest.fail("recomputed the smaller set's chunk"))
    attach_hidden(data, tmp_path / "h", target.name)

    def no_forward(*a, **k):
        raise AssertionError("the target must not run when hidden states are cached")

    base = target.base
    target.base = no_forward
    try:
        cfg = TrainSection(max_steps=3, batch_size=4, eval_every=100, save_every=100, positions_per_sequence=8)
        state = train_drafter(target, Drafter.for_target(target, seed=0), data[2:], data[:2], cfg, tmp_path / "o", 2)
        assert state.step == 3 and "agreement" in state.history[-1]
    finally:
        target.base = base


def test_agreement_counts_labels_outside_the_draft_vocabulary_as_misses():
    target = tiny_llama(vocab_size=64, seed=5)
    data = synthetic_examples(target, 4, seed=2)
    full = evaluate(target, Drafter.for_target(target, seed=0), data, 2, 4, 64, positions_per_sequence=None)
    labels = set(torch.cat([e["input_ids"][e["loss_mask"]] for e in data]).tolist())
    unused = [t for t in range(64) if t not in labels]
    small = Drafter.for_target(target, seed=0, draft_vocab_size=len(unused))
    small.draft_vocab.copy_(torch.tensor(unused))  # no label can ever be drafted
    none = evaluate(target, small, data, 2, 4, 64, positions_per_sequence=None)
    assert none["positions"] == full["positions"] > 0
    assert none["agreement"] == [0.0, 0.0]


def sampled_examples(target, n: int, seed: int = 0, length: int = 20) -> list[dict]:
    """Sequences whose 'response' half is sampled from the target (temperature 1), not greedy."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, target.vocab_size, (5,), generator=gen).tolist()
        with torch.no_grad():
            for _ in range(length - 5):
                probs = torch.softmax(target.model(torch.tensor([ids])).logits[0, -1], -1)
                ids.append(int(torch.multinomial(probs, 1, generator=gen)))
        mask = torch.zeros(length, dtype=torch.bool)
        mask[5:] = True
        out.append({"input_ids": torch.tensor(ids), "loss_mask": mask, "conv_index": i})
    return out


def test_collate_fills_greedy_labels_of_greedy_examples_with_their_own_tokens():
    ex = [{"input_ids": torch.tensor([1, 2, 3]), "loss_mask": torch.tensor([0, 1, 1], dtype=torch.bool),
           "greedy": torch.tensor([1, 7, 8])},
          {"input_ids": torch.tensor([4, 5]), "loss_mask": torch.tensor([1, 1], dtype=torch.bool)}]
    greedy = collate(ex, 10)[4]
    assert greedy.tolist() == [[1, 7, 8], [4, 5, 0]]


def test_positions_take_labels_from_greedy_and_inputs_from_the_sampled_tokens():
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    greedy = torch.tensor([[10, 21, 22, 23, 24, 25, 26, 27]])
    attn = torch.ones(1, 8, dtype=torch.bool)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    pos, inputs, labels, lmask = drafter_positions(ids, attn, mask, 2, None, None, greedy)
    # t = 2 (first eligible, label x_4 generated): inputs x_3, x_4; labels greedy[4], greedy[5].
    row = pos[0].tolist().index(2)
    assert inputs[0, row].tolist() == [13, 14]
    assert labels[0, row].tolist() == [24, 25]


def test_hidden_cache_stores_the_targets_greedy_token_per_position_and_training_can_compute_it_instead(tmp_path):
    from redraft_cli.distill.hidden_cache import attach_hidden, build_hidden_cache
    from redraft_cli.distill.train import batch_loss

    target = tiny_llama(vocab_size=64, seed=11)
    data = sampled_examples(target, 6, seed=1)
    build_hidden_cache(target, data, tmp_path / "h", batch_size=4, chunk_size=4, greedy=True)
    attach_hidden(data, tmp_path / "h", target.name)
    sampled_not_greedy = 0
    for e in data:
        with torch.no_grad():
            argmax = target.model(e["input_ids"][None]).logits[0].argmax(-1)
        assert e["greedy"][0] == e["input_ids"][0]
        assert e["greedy"][1:].tolist() == argmax[:-1].tolist()
        sampled_not_greedy += int((e["input_ids"][1:] != e["greedy"][1:])[e["loss_mask"][1:]].sum())
    assert sampled_not_greedy > 0  # the labels really differ from the sampled tokens
    # A cache built without greedy labels is rebuilt, not mixed, when they are asked for.
    build_hidden_cache(target, data, tmp_path / "h2", batch_size=4, chunk_size=4)
    plain = [dict(e) for e in data]
    for e in plain:
        e.pop("greedy")
    attach_hidden(plain, tmp_path / "h2", target.name)
    assert all("greedy" not in e for e in plain)
    build_hidden_cache(target, plain, tmp_path / "h2", batch_size=4, chunk_size=4, greedy=True)
    attach_hidden(plain, tmp_path / "h2", target.name)
    assert all("greedy" in e for e in plain)

    # Without a cache the labels are marked -1 and batch_loss computes the same argmax from the target.
    drafter = Drafter.for_target(target, seed=0)
    ids, attn, mask, hidden, greedy = collate(data, 64)
    unknown = [{**e, "greedy": torch.full_like(e["input_ids"], -1)} for e in data]
    for e in unknown:
        e.pop("hidden")
    ids2, attn2, mask2, hidden2, greedy2 = collate(unknown, 64)
    assert hidden2 is None and (greedy2[attn2] == -1).all()
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    _, cached = batch_loss(target, drafter, drafter, ids, attn, mask, 2, 8, gen(), hidden=hidden, greedy=greedy)
    _, computed = batch_loss(target, drafter, drafter, ids2, attn2, mask2, 2, 8, gen(), greedy=greedy2)
    _, as_sampled = batch_loss(target, drafter, drafter, ids, attn, mask, 2, 8, gen(), hidden=hidden)
    assert cached["count"].tolist() == computed["count"].tolist()
    assert cached["correct"].tolist() == computed["correct"].tolist()
    torch.testing.assert_close(cached["loss_sum"], computed["loss_sum"], atol=0.05, rtol=0.01)
    assert not torch.allclose(cached["loss_sum"], as_sampled["loss_sum"])


def test_distill_pipeline_with_sampled_answers(tmp_path):
    """data.sampled_answers: sampled answers to the training conversations join the training set,
    labelled with the target's greedy tokens; held-out conversations never get any."""
    target = tiny_chat_llama(seed=2)
    recipe = tiny_recipe({"sampled_answers": 1, "sampled_prompts": 5, "sampled_max_new_tokens": 6}, every=3)
    events, done = distill_events(recipe, target, tmp_path)
    assert (done["train"], done["sampled"], done["held_out"]) == (8, 5, 2)
    sampled_dirs = list((tmp_path / "data").glob("sampled-*"))
    assert len(sampled_dirs) == 1
    manifest = json.loads((sampled_dirs[0] / "manifest.json").read_text())
    assert manifest["config"]["temperature"] == 0.7 and manifest["config"]["max_new_tokens"] == 6
    assert manifest["num_conversations"] == 8  # the training conversations only
    hidden_manifest = json.loads(next(sampled_dirs[0].glob("hidden-*/manifest.json")).read_text())
    assert hidden_manifest["greedy"] is True
    # A second run with the same data settings finds every shard it needs: no generation at all.
    events, done = distill_events(recipe, target, tmp_path, out="out2")
    assert not [e for e in events if e["event"] in ("data_start", "data")]
    assert done["sampled"] == 5
    # Another held-out count trains on other conversations: their sampled answers are another set (they
    # shared one folder, whose check then refused the run as "a different prompt set").
    import dataclasses

    other = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, held_out=3))
    events, done = distill_events(other, target, tmp_path, out="out3")
    assert (done["train"], done["held_out"]) == (7, 3) and len(list((tmp_path / "data").glob("sampled-*"))) == 2
    with pytest.raises(BadInputError, match="sampled_temperature"):
        recipe_from_dict({"data": {"sampled_answers": 1, "sampled_temperature": 0}})


def test_short_run_computes_the_extra_sets_hidden_states_while_training(tmp_path):
    """A run shorter than one pass over the greedy set sees each sampled answer about once: no
    cache for them (their greedy labels come from the target during training); the greedy set and
    the held-out slice keep theirs."""
    target = tiny_chat_llama(seed=2)
    recipe = tiny_recipe({"sampled_answers": 1, "sampled_prompts": 5, "sampled_max_new_tokens": 6}, max_steps=1)
    events, done = distill_events(recipe, target, tmp_path)
    assert done["sampled"] == 4  # the shard a 1-step run needs
    sampled_dir = next((tmp_path / "data").glob("sampled-*"))
    assert not list(sampled_dir.glob("hidden-*"))
    assert list((tmp_path / "data").glob("hidden-*/manifest.json"))
    assert [e["examples"] for e in events if e["event"] == "hidden_start"] == [8]
    assert any(e["event"] == "finished" for e in events)


def test_dropout_acts_only_while_training_and_is_reset_after(tmp_path):
    target = tiny_llama(vocab_size=64, seed=5)
    d = Drafter.for_target(target, seed=0)
    h, tokens = torch.randn(2, 3, target.hidden_size), torch.randint(0, 64, (2, 3, 2))
    d.dropout = 0.5
    d.train()
    a, b = d(h, tokens), d(h, tokens)
    assert not torch.allclose(a, b)
    d.eval()
    torch.testing.assert_close(d(h, tokens), d(h, tokens))
    data = synthetic_examples(target, 4, seed=2)
    cfg = TrainSection(max_steps=2, batch_size=2, eval_every=100, save_every=100, dropout=0.3)
    fresh = Drafter.for_target(target, seed=0)
    train_drafter(target, fresh, data[1:], data[:1], cfg, tmp_path / "a", 2)
    assert fresh.dropout == 0.0
    with pytest.raises(BadInputError, match="dropout"):
        TrainSection(max_steps=1, dropout=1.0)


def test_hidden_cache_written_before_files_were_named_by_fingerprint_still_loads(tmp_path):
    """A cache from before `files` (one file per chunk index, recorded in `chunks`) attaches as it is,
    and growing it writes new files beside the old ones."""
    from redraft_cli.distill.hidden_cache import attach_hidden, build_hidden_cache

    target = tiny_llama(vocab_size=64, seed=7)
    data = synthetic_examples(target, 6, seed=3)
    build_hidden_cache(target, data, tmp_path / "h", batch_size=3, chunk_size=4)
    mpath = tmp_path / "h" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    for c, fp in manifest["chunks"].items():  # back to the old layout
        (tmp_path / "h" / manifest["files"][fp]).rename(tmp_path / "h" / f"hidden-{int(c):05d}.safetensors")
    del manifest["files"]
    mpath.write_text(json.dumps(manifest))
    build_hidden_cache(target, data, tmp_path / "h", batch_size=3, chunk_size=4,
                       progress=lambda done, total: pytest.fail("recomputed an old chunk"))
    attach_hidden(data, tmp_path / "h", target.name)
    more = data + synthetic_examples(target, 3, seed=4)
    build_hidden_cache(target, more, tmp_path / "h", batch_size=3, chunk_size=4)
    attach_hidden(more, tmp_path / "h", target.name)
    attach_hidden(data, tmp_path / "h", target.name)
    assert (tmp_path / "h" / "hidden-00001.safetensors").is_file()  # the old partial chunk is kept


def test_a_chat_template_file_is_saved_into_the_drafters_recipe(tmp_path):
    """A recipe's chat_template given as a Jinja file renders the data, and the drafter's recipe.yaml
    holds its text, so bench and chat find it from any directory (chat_templates.template_for_drafter)."""
    from redraft_cli.chat_templates import template_for_drafter
    from redraft_cli.distill.recipe import recipe_from_dict

    target = tiny_chat_llama(seed=3)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    path = tmp_path / "plain.jinja"
    path.write_text(template)
    recipe = recipe_from_dict({**tiny_recipe(max_steps=1).to_dict(), "target": {"chat_template": str(path)}})
    events, _ = distill_events(recipe, target, tmp_path)
    assert target.tokenizer.decode(target.encode_chat("Hi.")) == "<|user|>Hi.\n<|assistant|>"
    path.unlink()
    assert template_for_drafter(tmp_path / "out") == template


def test_a_max_seq_len_that_cuts_every_answer_is_refused_and_one_that_cuts_some_is_noted(tmp_path):
    """train.max_seq_len below every prompt's length trained on nothing (loss 0.000, a drafter 'written');
    now a one-line error naming the field. One that cuts part of the answers says how much."""
    target = tiny_chat_llama(seed=2)
    base = tiny_recipe(max_steps=1).to_dict()
    short = recipe_from_dict({**base, "train": {**base["train"], "max_seq_len": 8}})
    with pytest.raises(BadInputError, match="train.max_seq_len 8 cuts every training conversation"):
        distill_events(short, target, tmp_path)
    from redraft_cli.distill.data import load_dataset

    starts = [int(e["loss_mask"].nonzero()[0, 0]) for e in load_dataset(tmp_path / "data") if e["conv_index"] >= 2]
    assert min(starts) < max(starts)  # the longest prompt's answer is cut, the shortest's kept
    partial = recipe_from_dict({**base, "train": {**base["train"], "max_seq_len": max(starts) + 1}})
    events, _ = distill_events(partial, target, tmp_path, out="out2")
    assert any(e["event"] == "note" and "leaves" in e["text"] and "max_seq_len" in e["text"] for e in events)


def test_resume_takes_this_runs_learning_rate_and_weight_decay(tmp_path):
    """The checkpoint's optimizer and scheduler states restored the old peak lr, so `--resume --lr` (what a
    diverged run's message advises) changed nothing; now the new values count from the resumed step, and say so."""
    target = tiny_llama(vocab_size=64, seed=5)
    data = synthetic_examples(target, 6, seed=2)
    cfg = dict(batch_size=2, warmup_ratio=0.0, eval_every=100, save_every=100)
    fresh = lambda: Drafter.for_target(target, seed=0)  # noqa: E731
    train_drafter(target, fresh(), data[1:], data[:1], TrainSection(max_steps=2, lr=1e-3, **cfg), tmp_path, 2)
    events = []
    cut = TrainSection(max_steps=4, lr=1e-5, weight_decay=0.1, **cfg)
    train_drafter(target, fresh(), data[1:], data[:1], cut, tmp_path, 2, resume=True, on_event=events.append)
    lrs = [e["lr"] for e in events if e["event"] == "step"]
    assert len(lrs) == 2 and 0 < lrs[0] <= 1e-5, lrs  # cosine from step 2 of 4 at a peak of 1e-5, not 1e-3
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert any("resuming with lr 1e-05 and weight_decay 0.1" in n for n in notes), notes


def test_a_context_too_short_for_every_prompt_is_named_with_cached_hidden_states(tmp_path):
    """A target whose context leaves no room for any prompt (a generic model capped one short of its
    sliding window, say) once failed on the empty hidden-state cache ('does not match this data;
    delete it'), which no deletion fixes; now the one line that names the room and the fields."""
    target = tiny_chat_llama(seed=2, max_positions=24)
    recipe = tiny_recipe(max_steps=1)
    assert recipe.data.cache_hidden
    with pytest.raises(BadInputError, match="every training conversation was skipped: no prompt fits in 16 tokens"):
        distill_events(recipe, target, tmp_path)


def test_a_resume_on_other_data_reports_the_coverage_of_the_vocabulary_it_keeps(tmp_path, one_thread):
    """A resume restores the checkpoint's draft vocabulary; the coverage it reports is that vocabulary's
    share of this run's labels (it described a vocabulary picked from the new data and then dropped)."""
    from redraft_cli.distill.data import load_dataset
    from redraft_cli.distill.pipeline import _label_counts

    target = tiny_chat_llama(seed=2)
    base = tiny_recipe(max_steps=2).to_dict()
    base["drafter"] = {**base["drafter"], "draft_vocab_size": 40}
    first, _ = distill_events(recipe_from_dict(base), target, tmp_path)
    vocab = Drafter.load(tmp_path / "out" / "checkpoint").draft_vocab.clone()
    other = recipe_from_dict({**base, "data": {**base["data"], "num_prompts": 14, "max_new_tokens": 12},
                              "train": {**base["train"], "max_steps": 4}})
    events, _ = distill_events(other, target, tmp_path / "second", out="../out", resume=True)
    reported = next(e for e in events if e["event"] == "draft_vocab")["coverage"]
    assert torch.equal(Drafter.load(tmp_path / "out").draft_vocab, vocab)  # the resumed run kept it
    # This run's training labels, counted again.
    train = [e for e in load_dataset(tmp_path / "second" / "data") if e["conv_index"] >= other.data.held_out]
    counts = _label_counts(train, target.vocab_size)
    assert reported == pytest.approx(float(counts[vocab].sum()) / float(counts.sum()))


def test_a_run_waits_while_another_makes_the_same_data(tmp_path, one_thread):
    """Two runs into different --out folders share one data folder; the second waits for the first's
    data (saying so), then uses it, instead of making it again and overwriting the first's manifest."""
    from filelock import FileLock

    from redraft_cli.distill.pipeline import distill

    target = tiny_chat_llama(seed=2)
    data = tmp_path / "data"
    data.mkdir()
    other_run = FileLock(str(data / ".lock"))
    other_run.acquire()
    events: list[dict] = []

    def on_event(e):
        events.append(e)
        if e.get("event") == "note" and "is making the data" in e["text"]:
            other_run.release()  # the other run is done: this one goes on

    distill(tiny_recipe(max_steps=1), tmp_path / "out", on_event=on_event, target=target, data_dir=data, bench=False)
    notes = [e["text"] for e in events if e["event"] == "note"]
    assert any("another redraft distill is making the data" in n for n in notes)
    assert not other_run.is_locked and (tmp_path / "out" / "model.safetensors").exists()


from pathlib import Path


def _history(state):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in state.history]


def _resume_setup(max_steps: int, eval_every: int, save_every: int):
    """A tiny target, its synthetic data (12 to train on, 4 held out), a training config with a high
    learning rate (so that the best step is not a tie) and a maker of identical fresh drafters."""
    target = tiny_llama(vocab_size=64, seed=5)
    data = synthetic_examples(target, 16, seed=1)
    cfg = TrainSection(max_steps=max_steps, batch_size=4, lr=3e-2, eval_every=eval_every, save_every=save_every,
                       positions_per_sequence=8)
    return target, data[4:], data[:4], cfg, lambda: Drafter.for_target(target, seed=0, head="tied", num_draft_layers=1)


def test_gradient_accumulation_counts_steps_shows_micro_batches_and_resumes_exactly(tmp_path):
    """train.grad_accum 3: an epoch of 12 examples in batches of 2 is 6 micro-batches, so 2 epochs are 4
    optimiser steps; each micro-batch is an event (the progress of a long step); a run stopped inside a
    step resumes at that step's start and ends as the uninterrupted run does."""

    target, train_set, held, cfg, fresh = _resume_setup(max_steps=6, eval_every=2, save_every=2)
    cfg = dataclasses.replace(cfg, max_steps=None, epochs=2, batch_size=2, grad_accum=3)
    events: list[dict] = []
    full = train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "full", 3, on_event=events.append)
    assert full.step == 4
    micro = [(e["step"], e["micro"]) for e in events if e["event"] == "micro"]
    assert micro == [(s, m) for s in range(4) for m in (1, 2, 3)]
    assert all(e["grad_accum"] == 3 and e["total_steps"] == 4 for e in events if e["event"] == "micro")

    def stop_inside_step_3(e):
        if e["event"] == "micro" and (e["step"], e["micro"]) == (2, 2):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "cut", 3, on_event=stop_inside_step_3)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    resumed = train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "cut", 3, resume=True)
    assert _history(resumed) == _history(full)
    a, b = (Drafter.load(tmp_path / run / "best").state_dict() for run in ("full", "cut"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    plain = []
    train_drafter(target, fresh(), train_set, held, dataclasses.replace(cfg, grad_accum=1, max_steps=2), tmp_path / "one",
                  3, on_event=plain.append)
    assert not any(e["event"] == "micro" for e in plain)  # (one micro-batch a step: the step event says it all)


@pytest.mark.parametrize("stop_at", ["evaluate", "save_best"])
def test_an_interrupted_evaluation_is_made_again_by_the_resume(tmp_path, monkeypatch, stop_at):
    from redraft_cli.distill import train

    target, train_set, held, cfg, fresh = _resume_setup(max_steps=6, eval_every=2, save_every=4)

    full = train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "full", 3)
    real_evaluate, real_save = train.evaluate, Drafter.save

    def stop_in_evaluate(*a, **kw):
        raise KeyboardInterrupt

    def stop_in_save(self, path, *a, **kw):
        if Path(path).name == "best":  # best/ half written (its new weights, the old config)
            real_save(self, path, *a, **kw)
            (path / "model.safetensors").write_bytes(b"cut")
            raise KeyboardInterrupt
        return real_save(self, path, *a, **kw)

    calls = []
    if stop_at == "evaluate":
        monkeypatch.setattr(train, "evaluate", lambda *a, **kw: calls.append(1) or (
            stop_in_evaluate() if len(calls) == 2 else real_evaluate(*a, **kw)))
    else:
        monkeypatch.setattr(Drafter, "save", stop_in_save)
    with pytest.raises(KeyboardInterrupt):
        train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "cut", 3)
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    monkeypatch.setattr(Drafter, "save", real_save)
    resumed = train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "cut", 3, resume=True)
    assert _history(resumed) == _history(full)
    assert resumed.best_step == full.best_step
    a = Drafter.load(tmp_path / "full" / "best").state_dict()
    b = Drafter.load(tmp_path / "cut" / "best").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_a_resume_reports_the_same_training_loss_as_an_uninterrupted_run(tmp_path):
    target, train_set, held, cfg, fresh = _resume_setup(max_steps=6, eval_every=3, save_every=3)

    full = train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "full", 3)

    def interrupt_at_4(e):
        if e["event"] == "step" and e["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "cut", 3, on_event=interrupt_at_4)
    resumed = train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "cut", 3, resume=True)
    assert _history(resumed) == _history(full)


def test_ctrl_c_during_the_optimizers_step_stops_after_the_step(tmp_path, monkeypatch):
    import os
    import signal

    target, train_set, held, cfg, fresh = _resume_setup(max_steps=5, eval_every=5, save_every=5)
    # Python's own Ctrl-C handler, as in the command (a test run before may have left another one).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "full", 3)
    real_step, calls = torch.optim.AdamW.step, []

    def step_then_ctrl_c(self, *a, **kw):
        result = real_step(self, *a, **kw)
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right after the weights changed
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_ctrl_c)
    events = []
    try:
        with pytest.raises(KeyboardInterrupt):
            train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "cut", 3, on_event=events.append)
    finally:
        signal.signal(signal.SIGINT, previous)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    # The last event names the step saved (the command's message said step 2: the last "step" event).
    assert events[-1] == {"event": "interrupted", "step": 3}
    train_drafter(target, fresh(), train_set, held, cfg, tmp_path / "cut", 3, resume=True)
    a = Drafter.load(tmp_path / "full" / "best").state_dict()
    b = Drafter.load(tmp_path / "cut" / "best").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_a_checkpoint_half_written_by_a_killed_run_is_removed(tmp_path, one_thread):
    """kill -9 inside save_checkpoint leaves .checkpoint.tmp<PID>; the next run (holding --out, so no
    other writes there) removes it instead of keeping it forever."""
    from redraft_cli.distill.pipeline import distill

    out = tmp_path / "out"
    stale = out / ".checkpoint.tmp99999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    distill(tiny_recipe(max_steps=1), out, target=tiny_chat_llama(seed=2), data_dir=tmp_path / "data", bench=False)
    assert not stale.exists() and (out / "model.safetensors").exists()


def test_a_recipes_relative_paths_are_read_beside_it_from_any_folder(tmp_path, monkeypatch):
    """data.source, target.model, target.chat_template and drafter.init_from name files beside the recipe
    (as a config file's paths do); values that name nothing there (aliases, hub ids, named templates,
    a path from the current folder) stay as they were."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (project / "model").mkdir()
    (project / "chat.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (project / "start").mkdir()
    (project / "vicuna").write_text("not a template")  # a file named like a named template: the name wins
    recipe = project / "r.yaml"
    recipe.write_text("data: {source: data/prompts.jsonl}\ntarget: {model: ./model, chat_template: chat.jinja}\n"
                      "drafter: {init_from: start}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(str(recipe))
    assert r.data.source == str(project / "data" / "prompts.jsonl")
    assert r.target.model == str(project / "model") and r.target.chat_template == str(project / "chat.jinja")
    assert r.drafter.init_from == str(project / "start")
    (elsewhere / "mine.jsonl").write_text('{"prompt": "hi"}\n')
    recipe.write_text("data: {source: mine.jsonl}\ntarget: {model: smollm2-135m, chat_template: vicuna}\n"
                      "drafter: {init_from: data/prompts.jsonl}\n")  # (a file, not a drafter folder: left alone)
    r = load_recipe(str(recipe))
    assert (r.data.source, r.target.model, r.target.chat_template) == ("mine.jsonl", "smollm2-135m", "vicuna")
    assert r.drafter.init_from == "data/prompts.jsonl"
    recipe.write_text("target: {model: some-org/some-model}\ndata: {source: builtin}\n")
    r = load_recipe(str(recipe))
    assert (r.target.model, r.data.source) == ("some-org/some-model", "builtin")


def test_with_dropout_a_resumed_run_equals_an_uninterrupted_one_and_other_held_out_prompts_are_refused(tmp_path):
    """Dropout draws from a generator seeded per micro-batch (it drew from the process's, so a resumed
    run differed from an uninterrupted one); the checkpoint keeps what identifies its held-out
    conversations, and a resume with others is refused. A longer schedule on resume is noted."""
    target = tiny_llama(vocab_size=64, seed=5)
    data = synthetic_examples(target, 24, seed=1)
    train, held = data[4:], data[:4]
    cfg = TrainSection(max_steps=6, batch_size=4, lr=3e-3, eval_every=100, save_every=100, positions_per_sequence=8,
                       dropout=0.3)

    def fresh():
        return Drafter.for_target(target, seed=0, head="tied", num_draft_layers=1)

    torch.manual_seed(1)
    train_drafter(target, fresh(), train, held, cfg, tmp_path / "full", 3, held_out_key="k")

    def interrupt_at_3(e):
        if e["event"] == "step" and e["step"] == 3:
            torch.manual_seed(123)  # (whatever the process's generator does in between changes nothing)
            raise KeyboardInterrupt

    torch.manual_seed(2)
    with pytest.raises(KeyboardInterrupt):
        train_drafter(target, fresh(), train, held, cfg, tmp_path / "cut", 3, on_event=interrupt_at_3, held_out_key="k")
    with pytest.raises(BadInputError, match="held out other conversations"):
        train_drafter(target, fresh(), train, held, cfg, tmp_path / "cut", 3, resume=True, held_out_key="other")
    train_drafter(target, fresh(), train, held, cfg, tmp_path / "cut", 3, resume=True, held_out_key="k")
    a = Drafter.load(tmp_path / "full" / "checkpoint").state_dict()
    b = Drafter.load(tmp_path / "cut" / "checkpoint").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["held_out_key"] == "k" and state["total_steps"] == 6
    events = []
    longer = TrainSection(**{**cfg.__dict__, "max_steps": 8})
    train_drafter(target, fresh(), train, held, longer, tmp_path / "cut", 3, resume=True, held_out_key="k",
                  on_event=events.append)
    assert any("schedule now runs to step 8 (the checkpoint's run: 6)" in e.get("text", "") for e in events)


def test_a_checkpoint_caught_between_its_renames_comes_back_as_the_latest_complete_one(tmp_path):
    """kill -9 between save_checkpoint's two renames: no checkpoint/, the previous one as .checkpoint.old*
    and the new, complete one as .checkpoint.tmp*. The folder's holder takes the newer complete one and
    removes the rest; without holding it, only .old* (a .tmp* may be another process's, half written)."""
    from redraft_cli.distill.train import recover_checkpoint

    def save(name: str, step: int | None) -> None:
        (tmp_path / name).mkdir()
        if step is not None:
            (tmp_path / name / "trainer_state.json").write_text(json.dumps({"step": step}))

    save(".checkpoint.old11", 20)
    save(".checkpoint.tmp11", 30)
    save(".checkpoint.tmp12", None)  # half written: no trainer_state.json
    recover_checkpoint(tmp_path)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 20
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint.old11")
    recover_checkpoint(tmp_path, clean=True)
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_sigterm_during_the_optimizers_step_stops_after_it(monkeypatch):
    """`redraft distill` turns SIGTERM into KeyboardInterrupt (a checkpoint is saved, as for Ctrl-C); inside
    the optimizer's step it waits for the step to end, as Ctrl-C does."""
    import os
    import signal

    from redraft_cli.distill.train import _ctrl_c_after

    seen = []

    def stop(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _ctrl_c_after():
                os.kill(os.getpid(), signal.SIGTERM)
                seen.append("step done")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == ["step done", signal.SIGTERM]


def test_data_rendered_through_another_chat_template_is_cached_apart(tmp_path, monkeypatch):
    """The data cache was keyed without the chat template: a run with --chat-template vicuna and one without
    shared one folder, so the second trained on the first's Vicuna-rendered prompts. Data made with the
    tokenizer's own template keeps the key it had (the shipped data still seeds it)."""
    from dataclasses import replace

    from redraft_cli.distill.data import GenerationConfig
    from redraft_cli.distill.seeding import default_data_dir
    from redraft_cli.distill.recipe import recipe_from_dict

    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    recipe = tiny_recipe(max_steps=1)
    base = GenerationConfig()
    assert "chat_template" not in base.fingerprint()
    assert default_data_dir(recipe, "m", [["Hi."]], replace(base, chat_template="ab" * 32)) != \
        default_data_dir(recipe, "m", [["Hi."]], base)
    dirs = []
    for template in (None, "vicuna"):
        target = tiny_chat_llama(seed=3)
        r = recipe_from_dict({**recipe.to_dict(), "target": {"chat_template": template}})
        events: list = []
        from redraft_cli.distill.pipeline import distill

        distill(r, tmp_path / f"out-{template}", on_event=events.append, target=target, bench=False, data_only=True)
        dirs.append(sorted(p.name for p in (tmp_path / "cache" / "distill-data").iterdir()))
    assert len(dirs[0]) == 1 and len(dirs[1]) == 2, dirs


def test_init_from_a_tied_drafter_with_another_draft_vocabulary_and_what_it_refuses(tmp_path):
    """A tied head has no rows of its own: its draft vocabulary is the new run's (it was refused as
    'tensor draft_vocab'). A context-attention drafter into a plain one names the window."""
    from redraft_cli.distill.warm_start import warm_start

    target = tiny_chat_llama(seed=3)
    src = Drafter.for_target(target, seed=1, head="tied", draft_vocab_size=16)
    src.save(tmp_path / "tied16")
    mine = Drafter.for_target(target, seed=2, head="tied", draft_vocab_size=24)
    vocab = mine.draft_vocab.clone()
    copied = warm_start(mine, tmp_path / "tied16")
    assert "draft_vocab" not in copied and torch.equal(mine.draft_vocab, vocab)
    assert torch.equal(mine.rnn_w.weight, src.rnn_w.weight)
    Drafter.for_target(target, seed=1, context_window=8).save(tmp_path / "cw8")
    with pytest.raises(BadInputError, match="context window 8 vs none"):
        warm_start(Drafter.for_target(target, seed=2), tmp_path / "cw8")


def test_a_run_that_fails_before_writing_leaves_no_empty_out_folder(tmp_path):
    from redraft_cli.distill.pipeline import distill
    from redraft_cli.distill.recipe import recipe_from_dict

    target = tiny_chat_llama(seed=3)
    base = tiny_recipe(max_steps=1).to_dict()
    bad = recipe_from_dict({**base, "drafter": {**base["drafter"], "draft_vocab_size": 10 ** 6}})
    with pytest.raises(BadInputError, match="larger than"):
        distill(bad, tmp_path / "new" / "out", target=target, data_dir=tmp_path / "data", bench=False)
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "kept").mkdir()  # a folder the user made stays
    with pytest.raises(BadInputError):
        distill(bad, tmp_path / "kept", target=target, data_dir=tmp_path / "data", bench=False)
    assert (tmp_path / "kept").is_dir()
    with pytest.raises(BadInputError, match="context_window 1 keeps beams to g0 alone"):
        distill(recipe_from_dict({**base, "drafter": {**base["drafter"], "context_window": 1}}), tmp_path / "o",
                target=target, data_dir=tmp_path / "data", bench=False)


def test_a_damaged_trainer_state_is_refused_field_by_field():
    """Battery 15: a trainer_state.json without "step" resumed from step 0 (the run trained again from the
    start without a word), and recent_losses of [null, "a"] ended in a TypeError reported as a bug."""
    from redraft_cli.distill.train import trainer_state

    good = {"step": 278, "best_step": 200, "best_agreement": 0.2, "seconds": 20.5, "total_steps": 300,
            "history": [{"step": 100, "train_loss": 14.7}, {"step": 200, "train_loss": 12.9}],
            "recent_losses": [12.0, 11.5], "held_out_key": "abc"}
    assert trainer_state(good).step == 278
    old = {k: good[k] for k in ("step", "best_step", "best_agreement", "seconds", "history")}
    assert trainer_state(old).total_steps == 0  # a checkpoint from before total_steps and the losses were kept
    cases = {"'step' is missing": {k: v for k, v in good.items() if k != "step"},
             "'recent_losses' is [null, \"a\"]": {**good, "recent_losses": [None, "a"]},
             "'history' holds an entry": {**good, "history": [{"x": 1}]},
             "'history' is \"x\"": {**good, "history": "x"},
             "'step' is -5": {**good, "step": -5},
             "'step' is true": {**good, "step": True},
             "past the 300 steps": {**good, "step": 10**12},
             "'best_step' is 1000000, past its 'step'": {**good, "best_step": 10**6},
             "'total_steps' is \"300\"": {**good, "total_steps": "300"},
             "'zzz' is not a field": {**good, "zzz": 1},
             "holds list": [good]}
    for match, data in cases.items():
        with pytest.raises(ValueError, match=re.escape(match)):
            trainer_state(data)


def test_a_second_ctrl_c_does_not_cut_the_checkpoint_the_first_one_saves():
    """Battery 16: two Ctrl-Cs 20 ms apart during training interrupted the checkpoint the first one was
    saving, while the message said it was saved (the resume went back 10 steps). The save after a
    Ctrl-C holds further ones off; a block that is not stopping yet still stops at its end."""
    import os
    import signal

    from redraft_cli.distill.train import _ctrl_c_after

    # (A shell's background job, `nohup make test &`, starts Python with SIGINT ignored: set Python's own.)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        finished = []
        with _ctrl_c_after(swallow=True):
            os.kill(os.getpid(), signal.SIGINT)
            finished.append(True)
        assert finished == [True] and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            with _ctrl_c_after():
                os.kill(os.getpid(), signal.SIGINT)
                finished.append(True)
        assert finished == [True, True]
    finally:
        signal.signal(signal.SIGINT, before)
