"""Drafter: architecture, save/load round trip, interoperable layout, errors."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from redraft_cli.drafter import Drafter, DrafterConfig
from redraft_cli.errors import BadInputError, DrafterLoadError, DrafterMismatchError


@pytest.mark.parametrize("head", ["own", "tied"])
@pytest.mark.parametrize("layers", [0, 2])
def test_save_load_round_trip(tiny_target, tmp_path, head, layers):
    d = Drafter.for_target(tiny_target, seed=3, head=head, num_draft_layers=layers)
    d.save(tmp_path / "d")
    loaded = Drafter.load(tmp_path / "d").attach(tiny_target.embed_weight, tiny_target.lm_head_weight)
    assert loaded.config == d.config
    for k, v in d.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    h = torch.randn(2, tiny_target.hidden_size)
    tokens = torch.randint(0, tiny_target.vocab_size, (2, 1, 3))
    torch.testing.assert_close(d(h.unsqueeze(1), tokens), loaded(h.unsqueeze(1), tokens))


def test_interoperable_layout(tiny_target, tmp_path):
    """Config fields and tensor names of the reference implementation / TensorRT-LLM converter."""
    from safetensors.torch import load_file

    d = Drafter.for_target(tiny_target, head="own", num_draft_layers=2)
    d.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    H, V = tiny_target.hidden_size, tiny_target.vocab_size
    assert cfg["model_type"] == "recurrent_drafting_drafter"
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["exit_dim"], cfg["num_draft_layers"], cfg["rnn"]) == (H, V, 2 * H, 2, True)
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "model.safetensors")).items()}
    assert shapes == {
        "rnn_w.weight": (H, H),
        "rnn_u.weight": (H, H),
        "rnn_u.bias": (H,),
        "lm_head.0.linear.weight": (2 * H, 2 * H),
        "lm_head.0.linear.bias": (2 * H,),
        "lm_head.1.linear.weight": (2 * H, 2 * H),
        "lm_head.1.linear.bias": (2 * H,),
        "lm_head.2.weight": (V, 2 * H),
    }


def test_reference_checkpoint_without_redraft_block_loads_as_own_head(tiny_target, tmp_path):
    d = Drafter.for_target(tiny_target, head="own", num_draft_layers=1)
    d.save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["redraft"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = Drafter.load(tmp_path)
    assert loaded.config.head == "own" and loaded.config.num_draft_layers == 1


def test_recurrence_matches_design(tiny_target):
    """s_k = SiLU(W E(x) + U s_{k-1} + b); z = [h, s]; z += SiLU(A z + c); logits = LMhead(P z) (tied)."""
    d = Drafter.for_target(tiny_target, seed=5, head="tied", num_draft_layers=1)
    E, head = tiny_target.embed_weight, tiny_target.lm_head_weight
    h = torch.randn(tiny_target.hidden_size)
    x0, x1 = 3, 7
    s1 = torch.nn.functional.silu(d.rnn_w.weight @ E[x0] + d.rnn_u.weight @ torch.zeros_like(h) + d.rnn_u.bias)
    s2 = torch.nn.functional.silu(d.rnn_w.weight @ E[x1] + d.rnn_u.weight @ s1 + d.rnn_u.bias)
    for s, k in ((s1, 0), (s2, 1)):
        z = torch.cat([h, s])
        z = z + torch.nn.functional.silu(d.lm_head[0].linear.weight @ z + d.lm_head[0].linear.bias)
        expected = head @ (d.lm_head[1].weight @ z)
        got = d(h.view(1, 1, -1), torch.tensor([[[x0, x1]]]))[0, 0, k]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mismatched_target_is_a_clear_error(tiny_target):
    from conftest import tiny_llama

    other = tiny_llama(vocab_size=80, hidden_size=48)
    d = Drafter.for_target(other)
    with pytest.raises(DrafterMismatchError, match="hidden size 48"):
        d.check_target(tiny_target.hidden_size, tiny_target.vocab_size, tiny_target.name)
    with pytest.raises(DrafterMismatchError):
        d.attach(tiny_target.embed_weight, tiny_target.lm_head_weight)
    from redraft_cli import Generator

    with pytest.raises(DrafterMismatchError):
        Generator(tiny_target, d)


def test_a_folder_that_holds_no_drafter_says_what_it_holds(tmp_path):
    """A distill's --out before its end, a failed distill's --out, a model folder given as a drafter: each
    was 'lacks config.json' or "config.json is a 'llama'" without the folder or what to do."""
    stopped = tmp_path / "stopped"
    (stopped / "checkpoint").mkdir(parents=True)
    (stopped / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(DrafterLoadError, match="stopped before the end .*--resume"):
        Drafter.load(stopped)
    failed = tmp_path / "failed"
    failed.mkdir()
    (failed / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(DrafterLoadError, match="failed before training"):
        Drafter.load(failed)
    (failed / "model.safetensors").write_bytes(b"")  # a finished drafter that lost its config.json
    with pytest.raises(DrafterLoadError, match="lacks config.json"):
        Drafter.load(failed)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "vocab_size": 10}))
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(DrafterLoadError, match=f"{model} is not a redraft drafter: its config.json is a 'llama'"):
        Drafter.load(model)


def test_saved_files_are_readable_as_any_new_file(tiny_target, tmp_path):
    """safetensors made model.safetensors 0o600 while config.json got 0o644: a drafter shared with
    other users (a team folder) could not be read by them."""
    import stat

    from redraft_cli.files import file_mode

    Drafter.for_target(tiny_target).save(tmp_path / "d")
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((tmp_path / "d" / name).stat().st_mode) == file_mode(), name


def test_bad_checkpoints(tiny_target, tmp_path):
    with pytest.raises(DrafterLoadError, match="not a directory"):
        Drafter.load(tmp_path / "missing")
    d = Drafter.for_target(tiny_target)
    d.save(tmp_path / "ok")
    # Corrupt weights.
    bad = tmp_path / "bad"
    d.save(bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 50)
    with pytest.raises(DrafterLoadError, match="corrupt"):
        Drafter.load(bad)
    # Truncated weights file.
    raw = (tmp_path / "ok" / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DrafterLoadError):
        Drafter.load(bad)
    # Corrupt config.
    d.save(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(DrafterLoadError, match="not valid JSON"):
        Drafter.load(bad)
    # Config that disagrees with the weights.
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["hidden_size"] = cfg["hidden_size"] * 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterLoadError):
        Drafter.load(bad)
    # A different model type.
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterLoadError, match="llama"):
        Drafter.load(bad)
    with pytest.raises(DrafterLoadError):
        DrafterConfig(hidden_size=8, vocab_size=10, head="weird")


@pytest.mark.parametrize("field, value, match", [
    ("num_draft_layers", 10**9, "num_draft_layers must be a whole number from 0 to 64"),
    ("num_draft_layers", 3, "blocks"),
    ("hidden_size", 10**8, "hidden_size must be a whole number"),
    ("hidden_size", 1024, "shape"),
    ("hidden_size", 576.9, "hidden_size must be a whole number"),
    ("hidden_size", float("inf"), "hidden_size must be a whole number"),
    ("vocab_size", 10**10, "vocab_size must be a whole number"),
    ("vocab_size", 10**6, "rows"),
])
def test_config_claiming_huge_sizes_fails_before_allocating(tiny_target, tmp_path, field, value, match):
    """A config.json whose sizes disagree with its weights fails from the weights' shapes alone
    (building the model it describes first would exhaust memory)."""
    d = Drafter.for_target(tiny_target, seed=0, head="own")
    path = d.save(tmp_path / "d")
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    if field == "hidden_size" and value == 1024:  # (exit_dim too: alone, it would disagree with hidden_size)
        cfg["exit_dim"] = 2 * value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterLoadError, match=match):
        Drafter.load(path)


def test_save_is_atomic_and_overwrites(tiny_target, tmp_path):
    d1 = Drafter.for_target(tiny_target, seed=1)
    d2 = Drafter.for_target(tiny_target, seed=2)
    d1.save(tmp_path)
    d2.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(Drafter.load(tmp_path).rnn_w.weight, d2.rnn_w.weight)


def test_int8_weight_storage_round_trip(tmp_path):
    """weight_storage int8: the vocabulary projection is stored as int8 rows with a scale each (about
    a quarter of float32's bytes), loads back within half a quantisation step, and drafts alike."""
    torch.manual_seed(0)
    H, V = 32, 3000  # the projection (V, 2H) dominates the file, as in a real drafter
    d = Drafter(DrafterConfig(hidden_size=H, vocab_size=V, head="own")).reset_parameters(0)
    d.attach(torch.randn(V, H), torch.randn(V, H))
    with torch.no_grad():
        d.lm_head[-1].weight.normal_()
    d.save(tmp_path / "f")
    d.config.weight_storage = "int8"
    d.save(tmp_path / "q")
    size = lambda p: (p / "model.safetensors").stat().st_size
    assert size(tmp_path / "q") < 0.35 * size(tmp_path / "f")
    back = Drafter.load(tmp_path / "q").attach(d._embed, d._head)
    assert back.config.weight_storage == "int8" and back.lm_head[-1].weight.dtype == torch.float32
    bw = back.lm_head[-1].weight
    for name, p in d.named_parameters():
        q = dict(back.named_parameters())[name]
        if p.dim() == 2:
            step = p.abs().amax(dim=1, keepdim=True) / 127
            assert ((p - q).abs() <= step / 2 + 1e-7).all(), name
        else:
            assert torch.equal(p, q), name  # biases stay exact
    h, state = torch.randn(5, H), torch.randn(5, H)
    full, quant = d.logits(h, state), back.logits(h, state)
    assert (full - quant).abs().max() < 0.02 * full.abs().max()  # near-ties among 3,000 random rows may swap
    # Saving a loaded int8 drafter again keeps the format; a scale on a float tensor is refused.
    back.save(tmp_path / "q2")
    assert torch.equal(Drafter.load(tmp_path / "q2").lm_head[-1].weight, bw)
    from safetensors.torch import load_file, save_file
    state_f = load_file(str(tmp_path / "f" / "model.safetensors"))
    state_f["lm_head.2.weight_scale"] = torch.ones(V, 1)
    save_file(state_f, str(tmp_path / "f" / "model.safetensors"))
    with pytest.raises(DrafterLoadError, match="not int8"):
        Drafter.load(tmp_path / "f")
    with pytest.raises(DrafterLoadError, match="weight_storage"):
        DrafterConfig(hidden_size=H, vocab_size=V, weight_storage="int4")


def test_a_config_whose_vocabulary_disagrees_with_its_files_is_named(tiny_target, tmp_path):
    """With a draft vocabulary the head's shape does not show vocab_size: the draft vocabulary's ids
    and the datastore do, and the error says the checkpoint's own files disagree."""
    from redraft_cli.datastore import Datastore

    V = tiny_target.vocab_size
    d = Drafter.for_target(tiny_target, seed=0, head="own", draft_vocab_size=8)
    d.draft_vocab.copy_(torch.arange(V - 8, V))
    path = d.save(tmp_path / "d")
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = V - 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterLoadError, match=f"says vocab_size {V - 4}, but its draft vocabulary holds token id {V - 1}"):
        Drafter.load(path)
    d.draft_vocab.copy_(torch.arange(8))
    d.datastore = Datastore.from_answers([[1, 2, 3, 4, 5]], V)
    d.save(path)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DrafterLoadError, match="datastore.safetensors is for a vocabulary of .*files do not match"):
        Drafter.load(path)


def test_decode_config_is_the_recommended_shape(tiny_target):
    """drafter.decode_config(): the saved shape for the batch size, datastore beams only with a datastore,
    any DecodeConfig field on top."""
    from redraft_cli.datastore import Datastore

    drafter = Drafter.for_target(tiny_target, beam_width=3, beam_length=4, tree_nodes=5, lookup_beams=1,
                                 lookup_length=9, datastore_beams=2)
    drafter.config.batch_shapes = {"4": {"beam_width": 2, "beam_length": 2, "tree_nodes": 0}}
    cfg = drafter.decode_config(max_new_tokens=7)
    assert (cfg.beam_width, cfg.beam_length, cfg.tree_nodes, cfg.lookup_beams, cfg.lookup_length) == (3, 4, 5, 1, 9)
    assert cfg.datastore_beams == 0 and cfg.max_new_tokens == 7  # no datastore loaded
    assert (drafter.decode_config(batch_size=8).beam_width, drafter.decode_config(batch_size=8).tree_nodes) == (2, 0)
    drafter.datastore = Datastore.from_answers([[1, 2, 3]], tiny_target.vocab_size)
    assert drafter.decode_config(accept="typical").datastore_beams == 2


def test_save_where_it_cannot_is_one_line(tmp_path, tiny_target):
    d = Drafter.for_target(tiny_target, seed=0)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(BadInputError, match="is a file"):
        d.save(tmp_path / "a.csv")
    with pytest.raises(BadInputError, match="is a file"):
        d.save(tmp_path / "a.csv" / "drafter")
    if os.geteuid() != 0:  # (root writes anywhere)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(BadInputError, match="cannot save the drafter"):
            d.save(ro / "drafter")


def test_save_refuses_a_model_folder_and_another_targets_drafter_and_drops_a_stale_datastore(tiny_target, tmp_path):
    """Drafter.save into the target's own folder replaced the model's config.json and weights (the model was
    lost); into another target's distilled drafter it left that drafter's datastore and recipe beside it
    (the new one then loaded with another model's datastore)."""
    from redraft_cli.datastore import Datastore

    model_dir = tmp_path / "model"
    tiny_target.model.save_pretrained(model_dir)
    before = (model_dir / "config.json").read_text()
    drafter = Drafter.for_target(tiny_target, seed=0)
    with pytest.raises(BadInputError, match="holds a model .*'llama'"):
        drafter.save(model_dir)
    assert (model_dir / "config.json").read_text() == before
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    with pytest.raises(BadInputError, match="a tokenizer is there"):
        drafter.save(tmp_path / "tok")
    other = Drafter.for_target(tiny_target, seed=1)
    other.config.target_model = "another/model"
    other.datastore = Datastore.from_answers([[1, 2, 3, 4]], tiny_target.vocab_size)
    other.save(tmp_path / "d")
    (tmp_path / "d" / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(BadInputError, match="holds a drafter for another/model with its datastore.safetensors, recipe"):
        drafter.save(tmp_path / "d")
    other.datastore = None  # the same target's drafter saved again without one: the old one is not kept
    other.save(tmp_path / "d")
    assert Drafter.load(tmp_path / "d").datastore is None
    drafter.save(tmp_path / "d2")
    drafter.save(tmp_path / "d2")  # (over itself: fine)


def test_save_refuses_the_package_and_another_drafters_distilled_folder(tiny_target, tmp_path):
    """Battery 14: Drafter.save(shipped_drafter_dir(...)) replaced the shipped drafter's weights and dropped
    its datastore, and a new drafter saved over a distilled one left that run's recipe.yaml and
    metrics.json beside it, describing another drafter. The drafter a folder was loaded from (or saved
    to) may still be saved back there."""
    from redraft_cli.files import PACKAGE_DIR

    drafter = Drafter.for_target(tiny_target, seed=0)
    inside = PACKAGE_DIR / "data" / "drafters" / "no-such-drafter"
    with pytest.raises(BadInputError, match="inside the redraft package"):
        drafter.save(inside)
    assert not inside.exists()
    run = tmp_path / "run"
    distilled = Drafter.for_target(tiny_target, seed=1)
    distilled.save(run)
    (run / "recipe.yaml").write_text("name: x\n")
    (run / "metrics.json").write_text("{}")
    weights = (run / "model.safetensors").read_bytes()
    with pytest.raises(BadInputError, match="holds a distilled drafter with its recipe.yaml, metrics.json"):
        drafter.save(run)
    assert (run / "model.safetensors").read_bytes() == weights
    distilled.save(run)  # saved there before: its own folder
    loaded = Drafter.load(run)
    loaded.save(run)  # loaded from there: saved back (a new datastore, a bfloat16 copy, ...)
    drafter.save(tmp_path / "elsewhere")
    with pytest.raises(BadInputError, match="holds a distilled drafter"):
        drafter.save(run)


def test_a_damaged_config_or_weights_are_refused_naming_the_file(tiny_target, tmp_path):
    """Battery 15: NaN weights, a draft vocabulary listing a token twice or stored as floats, "rnn": "yes",
    an exit_dim other than 2H, a predict_tokens of 10**12 and a coverage of "high" all loaded without a
    word; a config.json that is a list was "lacks hidden_size/vocab_size" with no path."""
    from safetensors.torch import load_file, save_file

    cfg = DrafterConfig(hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size, draft_vocab_size=16)
    good = tmp_path / "good"
    Drafter(cfg).save(good)
    config, state = json.loads((good / "config.json").read_text()), load_file(str(good / "model.safetensors"))

    def damaged(name, edit_config=None, edit_state=None):
        d = tmp_path / name
        d.mkdir()
        c, w = json.loads(json.dumps(config)), dict(state)
        c = edit_config(c) if edit_config else c
        w = edit_state(w) if edit_state else w
        (d / "config.json").write_text(json.dumps(c))
        save_file(w, str(d / "model.safetensors"))
        return d

    def nan(w):
        w["rnn_u.weight"] = w["rnn_u.weight"].clone()
        w["rnn_u.weight"][0, 0] = float("nan")
        return w

    cases = {
        "holds NaN or infinite values": damaged("nan", edit_state=nan),
        "lists a token id twice": damaged("dup", edit_state=lambda w: {**w, "draft_vocab": torch.zeros(16, dtype=torch.long)}),
        "draft vocabulary is torch.float32": damaged("fv", edit_state=lambda w: {**w, "draft_vocab": w["draft_vocab"].float()}),
        "got rnn 'yes'": damaged("rnn", lambda c: {**c, "rnn": "yes"}),
        "exit_dim must be 2 x hidden_size": damaged("exit", lambda c: {**c, "exit_dim": 10**12}),
        "predict_tokens must be from 1 to 1,024": damaged("pt", lambda c: {**c, "redraft": {**c["redraft"],
                                                                                             "predict_tokens": 10**12}}),
        "draft_vocab_coverage must be a share": damaged("cov", lambda c: {**c, "draft_vocab_coverage": "high"}),
        "holds list, not an object": damaged("list", lambda c: [c]),
        "lacks redraft.draft_vocab_size": damaged("nodv", lambda c: {**c, "redraft": {k: v for k, v in c["redraft"].items()
                                                                                      if k != "draft_vocab_size"}}),
    }
    for match, folder in cases.items():
        with pytest.raises(DrafterLoadError, match=re.escape(match)) as got:
            Drafter.load(folder)
        assert str(folder) in str(got.value)
    assert Drafter.load(good).draft_vocab_size == 16
