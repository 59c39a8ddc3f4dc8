"""The drafter's context attention: training and decoding compute the same c_t, and decoding stays lossless."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_prompts
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.distill.warm_start import warm_start
from redraft_cli.distill.recipe import TrainSection
from redraft_cli.distill.train import batch_loss
from redraft_cli.drafter import DrafterConfig
from redraft_cli.errors import BadInputError, DrafterLoadError
from redraft_cli.simulate import simulate_greedy
from test_simulate import greedy_examples

pytestmark = pytest.mark.usefixtures("one_thread")


def context_drafter(H: int = 32, V: int = 50, window: int = 6, seed: int = 0) -> Drafter:
    """A random drafter with context attention whose output projection is not the initial zero."""
    torch.manual_seed(seed)
    d = Drafter(DrafterConfig(hidden_size=H, vocab_size=V, head="own", context_window=window)).reset_parameters(seed)
    d.attach(torch.randn(V, H), torch.randn(V, H))
    with torch.no_grad():
        d.context.out.weight.normal_(std=0.3)
    return d


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, T[, H]) at idx (B, m) -> (B, m[, H])."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]) if x.dim() == 3 else idx)


def test_cache_equals_training_forward():
    """A ragged prefill (rows of 10 and 4 positions, window 6) then ragged steps give, at each
    row's last position, the c_t that training computes over the whole sequence."""
    d = context_drafter()
    T = 24
    hidden, ids = torch.randn(2, T, 32), torch.randint(0, 50, (2, T))
    nxt = F.pad(ids[:, 1:], (0, 1))
    full = d.context_states(hidden, ids)  # (2, T, H)
    pos = torch.arange(T - 1).expand(2, -1)
    assert torch.allclose(full[:, : T - 1], d.context(hidden, d.embed(nxt), pos), atol=1e-6)
    cache = d.context_cache(2)
    lens = torch.tensor([10, 4])
    start = (lens - 6).clamp_min(0)  # only the window's positions go into the cache
    idx = (start.unsqueeze(1) + torch.arange(6)).clamp_max(T - 1)
    c = cache.extend(gather_rows(hidden, idx), d.embed(gather_rows(nxt, idx)), start, lens - start)
    assert torch.allclose(c, full[torch.arange(2), lens - 1], atol=1e-5)
    cur = lens.clone()
    for counts in ([3, 1], [1, 5], [2, 2], [6, 3]):
        cnt = torch.tensor(counts)
        idx = (cur.unsqueeze(1) + torch.arange(int(cnt.max()))).clamp_max(T - 1)
        c = cache.extend(gather_rows(hidden, idx), d.embed(gather_rows(nxt, idx)), cur, cnt)
        cur = cur + cnt
        assert torch.allclose(c, full[torch.arange(2), cur - 1], atol=1e-5), counts
    # Dropping a row keeps the other's state.
    cache.select([1])
    idx = cur[1:].unsqueeze(1) + torch.arange(1)
    c = cache.extend(gather_rows(hidden[1:], idx), d.embed(gather_rows(nxt[1:], idx)), cur[1:], torch.tensor([1]))
    assert torch.allclose(c, full[1, cur[1]], atol=1e-5)


def test_window_limits_what_is_seen():
    """c_t does not change when tokens more than W-1 positions before t change, and does when closer ones do."""
    d = context_drafter(window=4)
    hidden, ids = torch.randn(1, 12, 32), torch.randint(0, 50, (1, 12))
    base = d.context_states(hidden, ids)[0, 9]
    far = hidden.clone()
    far[0, :6] += 1.0
    assert torch.allclose(d.context_states(far, ids)[0, 9], base, atol=1e-6)
    near = hidden.clone()
    near[0, 6] += 1.0
    assert not torch.allclose(d.context_states(near, ids)[0, 9], base, atol=1e-3)


def test_fresh_block_is_identity_and_plain_drafter_untouched():
    H, V = 32, 50
    d = Drafter(DrafterConfig(hidden_size=H, vocab_size=V, context_window=8)).reset_parameters(0)
    d.attach(torch.randn(V, H), torch.randn(V, H))
    hidden, ids = torch.randn(1, 9, H), torch.randint(0, V, (1, 9))
    assert torch.equal(d.context_states(hidden, ids), hidden)  # out starts at zero: c = h
    plain = Drafter(DrafterConfig(hidden_size=H, vocab_size=V))
    assert plain.context is None and not any(k.startswith("context") for k in plain.state_dict())
    assert plain.context_states(hidden, ids) is hidden and plain.context_cache(2) is None


def test_config_checks_and_round_trip(tmp_path):
    with pytest.raises(DrafterLoadError, match="context_window"):
        DrafterConfig(hidden_size=32, vocab_size=50, context_window=-1)
    with pytest.raises(DrafterLoadError, match="context_heads"):
        DrafterConfig(hidden_size=32, vocab_size=50, context_window=8, context_heads=3)
    assert DrafterConfig(hidden_size=576, vocab_size=50, context_window=8).context_heads == 9  # head size 64
    d = context_drafter()
    d.save(tmp_path / "d")
    back = Drafter.load(tmp_path / "d").attach(d._embed, d._head)
    assert back.config.context_window == 6 and back.config.context_heads == d.config.context_heads
    hidden, ids = torch.randn(1, 9, 32), torch.randint(0, 50, (1, 9))
    assert torch.equal(back.context_states(hidden, ids), d.context_states(hidden, ids))


def test_training_reaches_the_block():
    """batch_loss on cached hidden states sends gradients into the context block."""
    from conftest import tiny_llama

    target = tiny_llama()
    d = Drafter.for_target(target, seed=1, head="own", context_window=8)
    ids = torch.randint(0, target.vocab_size, (2, 16))
    attn = torch.ones(2, 16, dtype=torch.bool)
    mask = attn.clone()
    mask[:, :3] = False
    with torch.no_grad():
        hidden = target.base(input_ids=ids, use_cache=False).last_hidden_state
    loss, stats = batch_loss(target, d, d, ids, attn, mask, 3, 8, torch.Generator().manual_seed(0), hidden=hidden)
    loss.backward()
    assert d.context.out.weight.grad.abs().sum() > 0  # the zero projection learns first
    assert int(stats["count"][0]) > 0


def test_warm_start_from_plain_drafter(tmp_path, tiny_target):
    plain = Drafter.for_target(tiny_target, seed=3, head="own")
    plain.save(tmp_path / "plain")
    d = Drafter.for_target(tiny_target, seed=4, head="own", context_window=8)
    warm_start(d, tmp_path / "plain")
    assert torch.equal(d.rnn_w.weight, plain.rnn_w.weight) and torch.equal(d.lm_head[-1].weight, plain.lm_head[-1].weight)
    assert d.context.out.weight.abs().sum() == 0  # the new block still starts as c = h
    tied = Drafter.for_target(tiny_target, seed=4, head="tied", context_window=8)
    with pytest.raises(BadInputError, match="init_from"):
        warm_start(tied, tmp_path / "plain")


@pytest.mark.parametrize("shape", [(2, 3, 0, 0, 0), (2, 4, 1, 6, 5)])
def test_decoding_is_lossless_and_matches_simulation(tiny_target, shape):
    """Greedy ReDrafter with a context drafter (window 8, shorter than the prompts plus answers)
    emits the target's own tokens, batched as alone, and the simulation counts the same steps."""
    W, L, lookup, lookup_length, nodes = shape
    prompts = [p * 3 for p in random_prompts(4, tiny_target.vocab_size, seed=5, min_len=2, max_len=5)]
    data = greedy_examples(tiny_target, prompts, 24)
    torch.manual_seed(0)
    drafter = Drafter.for_target(tiny_target, seed=2, head="own", context_window=8)
    with torch.no_grad():
        drafter.context.out.weight.normal_(std=0.3)
    cfg = DecodeConfig(max_new_tokens=24, beam_width=W, beam_length=L, lookup_beams=lookup,
                       lookup_length=lookup_length, tree_nodes=nodes, stop_on_eos=False)
    gen = Generator(tiny_target, drafter)
    runs = [gen.generate(p, cfg, "redraft") for p in prompts]
    for p, run, ex in zip(prompts, runs, data):
        assert run.tokens == ex["input_ids"][len(p):].tolist()
    assert gen.generate_batch(prompts, cfg, "redraft").tokens == [r.tokens for r in runs]
    assert gen.generate_batch(prompts, cfg, "redraft", slots=3).tokens == [r.tokens for r in runs]  # refilled
    steps = [s for r in runs for s in r.decode_steps]
    sim = simulate_greedy(drafter, data, W, L, lookup, lookup_length, tree_nodes=nodes)
    assert (sim.steps, sim.tokens) == (len(steps), sum(len(s.tokens) for s in steps))


def test_beams_longer_than_the_window_are_refused(tiny_target):
    drafter = Drafter.for_target(tiny_target, seed=2, head="own", context_window=4)
    cfg = DecodeConfig(max_new_tokens=8, beam_width=2, beam_length=3, lookup_beams=1, lookup_length=6)
    with pytest.raises(BadInputError, match="context window of 4"):
        list(Generator(tiny_target, drafter).generate([1, 2, 3], cfg, "redraft").tokens)


def test_recipe_fields():
    from redraft_cli.distill.recipe import DrafterSection

    s = DrafterSection(context_window=64, init_from="/x")
    assert s.context_window == 64 and s.init_from == "/x"
    assert TrainSection().positions_per_sequence > 0


def test_warm_start_into_a_larger_draft_vocabulary(tmp_path, tiny_target):
    """Rows of an own head move to the same token ids in a larger draft vocabulary; new tokens keep fresh rows."""
    src = Drafter.for_target(tiny_target, seed=3, head="own", draft_vocab_size=8)
    src.draft_vocab.copy_(torch.tensor([1, 3, 5, 7, 9, 11, 13, 15]))
    src.save(tmp_path / "src")
    d = Drafter.for_target(tiny_target, seed=4, head="own", draft_vocab_size=12)
    d.draft_vocab.copy_(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23]))
    fresh = d.lm_head[-1].weight.detach().clone()
    warm_start(d, tmp_path / "src")
    w, sw = d.lm_head[-1].weight, src.lm_head[-1].weight
    for i, tok in enumerate(d.draft_vocab.tolist()):
        if tok in (1, 3, 5, 7):
            assert torch.equal(w[i], sw[[1, 3, 5, 7, 9, 11, 13, 15].index(tok)])
        else:
            assert torch.equal(w[i], fresh[i])
    assert torch.equal(d.rnn_u.weight, src.rnn_u.weight)
    assert d.draft_vocab.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22, 23]


def test_distill_with_context_attention_int8_head_and_warm_start(tmp_path):
    """The pipeline trains a context drafter, stores the final head as int8 (checkpoints stay float),
    the result decodes losslessly in the held-out bench, and a second run starts from it."""
    from conftest import tiny_chat_llama, tiny_recipe
    from redraft_cli.distill.pipeline import distill

    target = tiny_chat_llama(seed=2)
    recipe = tiny_recipe()
    recipe.drafter.head, recipe.drafter.context_window, recipe.drafter.weight_storage = "own", 16, "int8"
    result = distill(recipe, tmp_path / "a", target=target, data_dir=tmp_path / "data")
    d = Drafter.load(result.out)
    assert d.config.context_window == 16 and d.config.weight_storage == "int8"
    assert Drafter.load(result.out / "checkpoint").config.weight_storage == "float"
    assert result.metrics["bench"]["identical_outputs"] == 1 and result.metrics["simulated"]["tokens_per_step"] >= 1.0
    recipe.drafter.init_from = str(result.out)
    recipe.drafter.weight_storage = "float"
    events = []
    distill(recipe, tmp_path / "b", target=target, data_dir=tmp_path / "data", bench=False, on_event=events.append)
    assert any(e["event"] == "init_from" for e in events)


def test_freeze_copied_trains_only_new_rows_and_blocks(tmp_path, tiny_target):
    """After a warm start into a larger draft vocabulary plus a context block, one optimiser step
    moves only the new rows and the new block."""
    from redraft_cli.distill.warm_start import freeze_copied

    src = Drafter.for_target(tiny_target, seed=3, head="own", draft_vocab_size=8)
    src.draft_vocab.copy_(torch.arange(8))
    src.save(tmp_path / "src")
    d = Drafter.for_target(tiny_target, seed=4, head="own", draft_vocab_size=12, context_window=8)
    d.draft_vocab.copy_(torch.arange(12))
    copied = warm_start(d, tmp_path / "src")
    assert copied["lm_head.2.weight"].tolist() == [False] * 8 + [True] * 4
    n = freeze_copied(d, copied)
    assert n == 4 * d.lm_head[-1].weight.shape[1] + sum(p.numel() for p in d.context.parameters())
    before = {k: v.clone() for k, v in d.state_dict().items()}
    opt = torch.optim.AdamW([p for p in d.parameters() if p.requires_grad], lr=0.1, weight_decay=0.0)
    ids = torch.randint(0, tiny_target.vocab_size, (2, 12))
    hidden = torch.randn(2, 12, tiny_target.hidden_size)
    logits = d(hidden[:, :4], ids[:, :4, None].expand(-1, -1, 2), hidden=hidden, ids=ids, pos=torch.arange(4).expand(2, 4))
    logits.logsumexp(-1).sum().backward()
    opt.step()
    after = d.state_dict()
    assert torch.equal(after["rnn_w.weight"], before["rnn_w.weight"])
    assert torch.equal(after["lm_head.2.weight"][:8], before["lm_head.2.weight"][:8])
    assert not torch.equal(after["lm_head.2.weight"][8:], before["lm_head.2.weight"][8:])
    assert not torch.equal(after["context.out.weight"], before["context.out.weight"])  # zero at first: it moves first


def test_a_saved_shape_longer_than_the_window_is_recommended_within_it(tiny_target):
    """A drafter saved with copies of 32 tokens and a window of 8 (distill before it fitted the shape) decodes
    at its recommended shape rather than being refused by it."""
    from redraft_cli import Generator

    d = Drafter.for_target(tiny_target, seed=2, head="own", context_window=8, beam_width=3, beam_length=10,
                           lookup_beams=1, lookup_length=32, tree_nodes=20)
    shape = d.recommended_shape()
    assert (shape["beam_length"], shape["lookup_length"], shape["tree_nodes"]) == (8, 8, 20)
    cfg = d.decode_config(max_new_tokens=6)
    Generator(tiny_target, d).check(cfg)
    tiny = Drafter.for_target(tiny_target, seed=2, context_window=1, beam_length=4, lookup_beams=1, lookup_length=6)
    shape = tiny.recommended_shape()
    assert (shape["beam_length"], shape["lookup_length"]) == (1, 0)
    Generator(tiny_target, tiny).check(tiny.decode_config())
