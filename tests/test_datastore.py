"""Datastore beams: continuations of the context's last n-gram in the target's training answers."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts
from redraft_cli import DecodeConfig, Drafter, Generator
from redraft_cli.beam_search import DraftBeams
from redraft_cli.chat import ChatSession
from redraft_cli.datastore import DATASTORE_NAME, Datastore, with_datastore_beams
from redraft_cli.errors import BadInputError, DrafterLoadError
from redraft_cli.sampling import SamplingConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ANSWERS = [[4, 7, 1, 2], [4, 7, 1, 3], [9, 7, 5]]


def test_worked_example():
    ds = Datastore.from_answers(ANSWERS, vocab_size=10, ngram_max=2)
    assert ds.tokens.tolist() == [4, 7, 1, 2, -1, 4, 7, 1, 3, -1, 9, 7, 5, -1]
    assert ds.answers == 3
    # [4, 7] occurs twice: 1 twice, then 2 and 3 once each (the smaller id), then the answers end.
    assert ds.continuations([0, 4, 7], num_beams=2, length=3) == [[1, 2]]
    # [8, 7] never occurs, and a 1-gram is too weak a query by default (ngram_min = 2) ...
    assert ds.continuations([8, 7], num_beams=2, length=3) == []
    # ... but with ngram_min = 1 the 1-gram [7] occurs three times (1, 1, 5).
    ds1 = Datastore.from_answers(ANSWERS, vocab_size=10, ngram_max=2, ngram_min=1)
    assert ds1.continuations([8, 7], num_beams=2, length=3) == [[1, 2], [5]]
    assert ds1.continuations([6], num_beams=2, length=3) == []
    tokens, found = ds1.beams([[0, 4, 7], [8, 7], [6]], num_beams=2, beam_length=4)
    assert tokens.tolist() == [[[7, 1, 2, -1], [7, -1, -1, -1]],
                               [[7, 1, 2, -1], [7, 5, -1, -1]],
                               [[6, -1, -1, -1], [6, -1, -1, -1]]]
    assert found.tolist() == [[True, False], [True, True], [False, False]]


def test_a_continuation_stops_where_too_few_rows_agree():
    # After [4, 7]: 1 in all 10 rows, then 5 in 4 rows, 2 and 3 in 3 each, then 6 in 2 of the 4.
    answers = [[4, 7, 1, 2]] * 3 + [[4, 7, 1, 3]] * 3 + [[4, 7, 1, 5, 6]] * 2 + [[4, 7, 1, 5, 8]] * 2
    ds = Datastore.from_answers(answers, vocab_size=10, ngram_max=2)
    assert ds.continuations([0, 4, 7], 1, 4) == [[1, 5]]  # 6 has 2 of 10 rows, under min_share 0.3
    assert Datastore(ds.tokens, 10, ngram_max=2, min_share=0.5).continuations([0, 4, 7], 1, 4) == [[1]]
    assert Datastore(ds.tokens, 10, ngram_max=2, min_share=0.0).continuations([0, 4, 7], 1, 4) == [[1, 5, 6]]
    # A first token that too few rows share is not proposed: 2 and 3 each follow [1] in 3 of 10 rows.
    assert Datastore(ds.tokens, 10, ngram_max=2, min_share=0.35).continuations([7, 1], 3, 2) == [[5]]


def test_longest_ngram_wins_and_most_recent_rows_are_kept():
    # [1, 2] is followed by 3 twice, [5, 1, 2] once by 9: the 3-gram decides.
    ds = Datastore.from_answers([[1, 2, 3], [1, 2, 3], [5, 1, 2, 9]], vocab_size=10, ngram_max=3)
    assert ds.continuations([5, 1, 2], 1, 1) == [[9]]
    assert ds.continuations([0, 1, 2], 1, 1) == [[3]]
    # With room for one row only, the latest occurrence of [2] decides.
    assert Datastore(ds.tokens, 10, max_rows=1).continuations([1, 2], 1, 1) == [[9]]


def test_keys_are_exact_and_ngram_max_fits_the_vocabulary():
    V = 2**20
    a, b = V - 1, V - 2
    ds = Datastore.from_answers([[a, b, 7], [b, a, 8]], vocab_size=V, ngram_max=5)
    assert ds.ngram_max == 62 // 20  # 3 ids of 20 bits fit one int64 key
    assert ds.continuations([a, b], 1, 1) == [[7]]
    assert ds.continuations([b, a], 1, 1) == [[8]]
    assert ds.continuations([3, V + 5], 1, 1) == []  # ids outside the vocabulary never match


def test_from_examples_takes_each_generated_run():
    ex = {"input_ids": torch.tensor([9, 9, 4, 7, 1, 9, 5, 6]),
          "loss_mask": torch.tensor([0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)}
    ds = Datastore.from_examples([ex], vocab_size=10)
    assert ds.tokens.tolist() == [4, 7, 1, -1, 5, 6, -1] and ds.answers == 2


@pytest.mark.parametrize("vocab_size", [10, 2**17])
def test_save_and_load(tmp_path, vocab_size):
    ds = Datastore.from_answers([[0, 3, 9], [vocab_size - 1, 2]], vocab_size=vocab_size)
    path = ds.save(tmp_path / DATASTORE_NAME)
    back = Datastore.load(path)
    assert back.tokens.tolist() == ds.tokens.tolist() and back.vocab_size == vocab_size and back.answers == 2
    assert back.continuations([0, 3], 1, 2) == [[9]]
    assert [p.name for p in tmp_path.iterdir()] == [DATASTORE_NAME]  # no temporary file left behind


def test_corrupt_datastore_is_a_clear_error(tmp_path):
    path = tmp_path / DATASTORE_NAME
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(DrafterLoadError, match="datastore .* is corrupt"):
        Datastore.load(path)
    Datastore.from_answers([[5, 6]], vocab_size=100).save(path)
    with pytest.raises(DrafterLoadError, match="outside its vocabulary"):
        _with_vocab(path, 4)
    from safetensors.torch import save_file

    save_file({"tokens": torch.tensor([6.0, 7.0, 0.0])}, str(path), metadata={"format": "pt", "vocab_size": "100"})
    with pytest.raises(DrafterLoadError, match="tokens are torch.float32, not token ids"):  # (battery 15: taken)
        Datastore.load(path)


def _with_vocab(path, vocab_size: int):
    """Rewrite a datastore's metadata with another vocabulary size, then load it."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"format": "pt", "vocab_size": str(vocab_size)})
    return Datastore.load(path)


def test_drafter_saves_and_loads_its_datastore(tiny_target, tmp_path):
    drafter = Drafter.for_target(tiny_target, seed=0)
    drafter.datastore = Datastore.from_answers(ANSWERS, vocab_size=tiny_target.vocab_size)
    drafter.save(tmp_path / "d")
    back = Drafter.load(tmp_path / "d")
    assert back.datastore.tokens.tolist() == drafter.datastore.tokens.tolist()
    assert Drafter.load(_copy_without_datastore(tmp_path)).datastore is None
    # A datastore for another vocabulary does not load with this drafter.
    Datastore.from_answers(ANSWERS, vocab_size=tiny_target.vocab_size + 1).save(tmp_path / "d" / DATASTORE_NAME)
    with pytest.raises(DrafterLoadError, match="vocabulary"):
        Drafter.load(tmp_path / "d")


def _copy_without_datastore(tmp_path):
    import shutil

    shutil.copytree(tmp_path / "d", tmp_path / "plain", ignore=shutil.ignore_patterns(DATASTORE_NAME))
    return tmp_path / "plain"


def test_with_datastore_beams_appends_and_falls_back():
    ds = Datastore.from_answers(ANSWERS, vocab_size=10)
    drafted = DraftBeams(torch.tensor([[[7, 3, 4]], [[6, 2, 2]]]), torch.full((2, 1, 2), -1.0))
    out = with_datastore_beams(drafted, [[4, 7], [6]], ds, num_beams=1, length=4)
    assert out.tokens.tolist() == [[[7, 3, 4, -1], [7, 1, 2, -1]],
                                   [[6, 2, 2, -1], [6, 2, 2, -1]]]  # a miss copies the first drafted beam
    assert out.logprobs.shape == (2, 2, 3) and out.logprobs[:, 1].eq(0).all()
    assert with_datastore_beams(drafted, [[4, 7], [6]], ds, 0) is drafted


def _own_answers(gen: Generator, prompts: list[list[int]], n: int) -> list[list[int]]:
    cfg = DecodeConfig(max_new_tokens=n, stop_on_eos=False)
    return [gen.generate(p, cfg, "plain").tokens for p in prompts]


@pytest.mark.parametrize("accept", ["greedy", "rejection"])
def test_decoding_with_datastore_beams_stays_identical(tiny_target, accept):
    drafter = Drafter.for_target(tiny_target, seed=0)
    gen = Generator(tiny_target, drafter)
    prompts = random_prompts(4, tiny_target.vocab_size, seed=5, min_len=2, max_len=6)
    # The target's own greedy answers to the same prompts: what a datastore from distillation holds.
    drafter.datastore = Datastore.from_answers(_own_answers(gen, prompts, 40), tiny_target.vocab_size)
    sampling = {} if accept == "greedy" else {"sampling": SamplingConfig(temperature=0.8, seed=3)}
    cfg = DecodeConfig(max_new_tokens=32, beam_width=2, beam_length=3, lookup_length=8, datastore_beams=2,
                       stop_on_eos=False, accept=accept, **sampling)
    out = gen.generate_batch(prompts, cfg, "redraft")
    assert all(len(g.tokens) == 32 for g in out.rows)
    steps = [s for g in out.rows for s in g.decode_steps]
    assert max(s.tree_nodes for s in steps) <= 2 * 3 + 2 * 8
    if accept == "greedy":
        assert out.tokens == [gen.generate(p, cfg, "plain").tokens for p in prompts]
        # An untrained drafter accepts little; the datastore holds these very answers.
        plain_drafts = DecodeConfig(max_new_tokens=32, beam_width=2, beam_length=3, stop_on_eos=False)
        before = [s for p in prompts for s in gen.generate(p, plain_drafts, "redraft").decode_steps]
        assert sum(len(s.tokens) for s in steps) / len(steps) > 2 * sum(len(s.tokens) for s in before) / len(before)


def test_from_answers_refuses_what_is_not_a_token_id_of_the_vocabulary(tiny_target):
    """Battery 14: ids past the vocabulary went in (and uint16 storage wrapped 10**6 to 16960 on save);
    decoding with them ended in an IndexError from the embedding. Now from_answers refuses them, and a
    datastore set from Python for another vocabulary is refused before decoding."""
    v = tiny_target.vocab_size
    for answers, match in (([[1, 2, v]], f"answer 1 holds token id {v}, outside the vocabulary of {v}"),
                           ([[1], [3, -5]], "answer 2 holds token id -5"),
                           ([[1.5, 2.0]], "float32 values, not token ids"),
                           ([["a"]], "answer 1 is not a list of token ids")):
        with pytest.raises(BadInputError, match=match):
            Datastore.from_answers(answers, v)
    with pytest.raises(BadInputError, match="vocab_size must be a positive int"):
        Datastore.from_answers([[1]], 0)
    drafter = Drafter.for_target(tiny_target, seed=0)
    gen = Generator(tiny_target, drafter)
    cfg = DecodeConfig(max_new_tokens=8, beam_width=2, beam_length=3, datastore_beams=1)
    drafter.datastore = Datastore.from_answers([[1, 2, v + 5]], v + 10)
    with pytest.raises(BadInputError, match=f"datastore is for a vocabulary of {v + 10}"):
        gen.generate([1, 2, 3], cfg, "redraft")
    drafter.datastore = [[1, 2, 3]]
    with pytest.raises(BadInputError, match="datastore must be a Datastore"):
        gen.generate([1, 2, 3], cfg, "redraft")
    drafter.datastore = Datastore.from_answers([[1, 2, 3, 4]], v)
    assert gen.generate([1, 2, 3], cfg, "redraft").tokens == gen.generate([1, 2, 3], cfg, "plain").tokens


def test_datastore_beams_need_a_datastore(tiny_target):
    gen = Generator(tiny_target, Drafter.for_target(tiny_target, seed=0))
    cfg = DecodeConfig(max_new_tokens=8, beam_width=2, beam_length=3, datastore_beams=1)
    with pytest.raises(BadInputError, match="--datastore needs a drafter saved with a datastore"):
        gen.generate([1, 2, 3], cfg, "redraft")
    session = ChatSession(gen, DecodeConfig(beam_width=2, beam_length=3))
    with pytest.raises(BadInputError, match="^datastore needs a drafter saved with a datastore"):  # (/set's name)
        session.set("datastore", "2")
    assert session.cfg.datastore_beams == 0
    with pytest.raises(BadInputError, match="--datastore must be between 0 and 16"):
        DecodeConfig(datastore_beams=17)
    assert DecodeConfig(beam_length=3, datastore_beams=1, lookup_length=8).tree_depth == 8
