"""The Python API answers misuse with a one-line BadInputError, not a raw internal error
(AttributeError on None, TypeError from pathlib, a RuntimeError from torch)."""

from __future__ import annotations

import pytest
import torch

from redraft_cli import DecodeConfig, Drafter, DrafterConfig, Generator
from redraft_cli.errors import BadInputError, DrafterLoadError

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [1, 2, 3]


@pytest.fixture(scope="module")
def drafter(tiny_target):
    return Drafter.for_target(tiny_target, seed=0)


@pytest.fixture(scope="module")
def gen(tiny_target, drafter):
    return Generator(tiny_target, drafter)


def refused(call, match: str, kind: type[Exception] = BadInputError) -> str:
    with pytest.raises(kind, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, "API errors are one line"
    return message


CALLS = {  # every public Generator method that takes a config, with a good prompt (or prompts)
    "generate": lambda g, cfg: g.generate(IDS, cfg),
    "redraft": lambda g, cfg: list(g.redraft(IDS, cfg)),
    "plain": lambda g, cfg: list(g.plain(IDS, cfg)),
    "generate_batch": lambda g, cfg: g.generate_batch([IDS, IDS], cfg),
    "redraft_batch": lambda g, cfg: list(g.redraft_batch([IDS, IDS], cfg)),
    "plain_batch": lambda g, cfg: list(g.plain_batch([IDS, IDS], cfg)),
    "check": lambda g, cfg: g.check(cfg),
}


@pytest.mark.parametrize("bad_cfg", [None, {"max_new_tokens": 8}, 8], ids=["None", "dict", "int"])
@pytest.mark.parametrize("method", list(CALLS))
def test_a_config_that_is_not_a_decode_config(gen, method, bad_cfg):
    message = refused(lambda: CALLS[method](gen, bad_cfg), "needs a DecodeConfig as cfg")
    assert message.endswith(f"got {type(bad_cfg).__name__}")
    assert message.startswith("Generator.check" if method == "check" else method)


@pytest.mark.parametrize("edit,match", [
    (lambda c: setattr(c.sampling, "temperature", -1.0), "temperature must be a finite number >= 0"),
    (lambda c: setattr(c, "accept", "foo"), "--accept must be one of"),
    (lambda c: setattr(c, "max_new_tokens", -3), "--max-new-tokens must be >= 1"),
    (lambda c: setattr(c, "sampling", None), "DecodeConfig.sampling must be a SamplingConfig"),
], ids=["temperature", "accept", "max_new_tokens", "sampling"])
@pytest.mark.parametrize("method", list(CALLS))
def test_a_config_changed_after_it_was_made_is_checked_again(gen, method, edit, match):
    """A notebook's `cfg.sampling.temperature = -1` sampled from the inverted distribution; `cfg.accept = "foo"`
    was ignored; a negative max_new_tokens overflowed the plain path's cache."""
    cfg = DecodeConfig(max_new_tokens=4, beam_width=2, beam_length=3)
    edit(cfg)
    refused(lambda: CALLS[method](gen, cfg), match)


def test_checks_run_when_the_method_is_called_not_on_first_iteration(gen):
    for call in (lambda: gen.plain_batch([IDS], None), lambda: gen.redraft(IDS, None), lambda: gen.plain(IDS, None)):
        refused(call, "needs a DecodeConfig")


@pytest.mark.parametrize("method", ["generate_batch", "redraft_batch", "plain_batch"])
def test_batch_methods_check_their_prompts_list_and_slots(gen, method):
    cfg = DecodeConfig(max_new_tokens=2)
    run = {"generate_batch": lambda p, **kw: gen.generate_batch(p, cfg, **kw),
           "redraft_batch": lambda p, **kw: list(gen.redraft_batch(p, cfg, **kw)),
           "plain_batch": lambda p, **kw: list(gen.plain_batch(p, cfg, **kw))}[method]
    refused(lambda: run(IDS), f"{method} takes a list of prompts .* one flat list of ints; wrap a single prompt as \\[ids\\]")
    for bad, kind in ((None, "NoneType"), (5, "int"), ("Hello", "str"), ((p for p in [IDS]), "generator")):
        refused(lambda: run(bad), f"{method} takes a list of prompts \\(each a list of token ids\\), got {kind}$")
    for slots, kind in (("2", "str"), (2.0, "float"), (True, "bool")):
        refused(lambda: run([IDS], slots=slots), f"{method}'s slots must be an int or None, got {kind}$")
    assert run(([1, 2], (3, 4)), slots=1)  # a tuple of prompts, a tuple prompt, one slot: fine


def test_generate_batch_mode_and_callbacks(gen):
    cfg = DecodeConfig(max_new_tokens=2)
    refused(lambda: gen.generate_batch([IDS], cfg, on_row_done="print"), "on_row_done must be callable or None, got str")
    refused(lambda: gen.generate(IDS, cfg, on_step=1), "on_step must be callable or None, got int")
    refused(lambda: gen.generate([IDS, IDS], cfg), "generate takes one prompt .* use generate_batch")
    refused(lambda: list(gen.plain([IDS], cfg)), "plain takes one prompt .* use plain_batch")


@pytest.mark.parametrize("target", [None, "smollm2-135m", 0], ids=["None", "str", "int"])
def test_generator_needs_a_target(drafter, target):
    msg = f"^Generator needs a Target \\(from load_target\\), got {type(target).__name__}$"
    refused(lambda: Generator(target, drafter), msg)
    refused(lambda: Generator(target), msg)


def test_generator_proposer_must_be_callable(tiny_target):
    refused(lambda: Generator(tiny_target, proposer="beams"), "proposer must be callable .* got str")


@pytest.mark.parametrize("path", [None, 123, ["d"]], ids=["None", "int", "list"])
def test_drafter_load_needs_a_path(path):
    message = refused(lambda: Drafter.load(path), "Drafter.load needs a path to a drafter folder", DrafterLoadError)
    assert f"got {type(path).__name__}" in message
    assert ("shipped_drafter_dir returns None" in message) == (path is None)


def test_drafter_load_save_map_location(tmp_path, drafter):
    refused(lambda: drafter.save(None), "Drafter.save needs a path .* got NoneType")
    drafter.save(tmp_path / "d")
    for bad in (None, "gpu", 1.5):
        refused(lambda: Drafter.load(tmp_path / "d", map_location=bad), "Drafter.load's map_location must be a device")
    assert Drafter.load(str(tmp_path / "d"), map_location="cpu").config == drafter.config


def test_drafter_for_target_and_constructor(tiny_target):
    for bad in (None, "smollm2-135m"):
        refused(lambda: Drafter.for_target(bad), f"^Drafter.for_target needs a Target \\(from load_target\\), "
                                                  f"got {type(bad).__name__}$")
    refused(lambda: Drafter.for_target(tiny_target, seed="1"), "Drafter.for_target's seed must be an int, got '1'")
    refused(lambda: Drafter.for_target(tiny_target, beams=4), "Drafter.for_target got 'beams', which is not a DrafterConfig")
    refused(lambda: Drafter.for_target(tiny_target, hidden_size=8), "got 'hidden_size'.* come from the target")
    refused(lambda: Drafter.for_target(tiny_target, num_draft_layers="2"), "DrafterConfig.num_draft_layers must be int")
    refused(lambda: DrafterConfig(hidden_size="32", vocab_size=64), "DrafterConfig.hidden_size must be int, got '32'")
    refused(lambda: DrafterConfig(hidden_size=32, vocab_size=64, draft_vocab_size="8"), "draft_vocab_size must be int or None")
    refused(lambda: Drafter(None), "Drafter needs a DrafterConfig, got NoneType")
    refused(lambda: Drafter({"hidden_size": 32}), "Drafter needs a DrafterConfig, got dict")
    refused(lambda: Drafter.for_target(tiny_target).attach(None, None), "attach needs .* \\(tensors\\), got NoneType")


@pytest.mark.parametrize("batch_size", [0, -1, "4", None, 4.0, True])
def test_decode_config_batch_size(drafter, batch_size):
    refused(lambda: drafter.decode_config(batch_size=batch_size), "Drafter.decode_config's batch_size must be an int >= 1")


def test_decode_config_unknown_override_and_a_saved_batch_shape(tmp_path, drafter):
    refused(lambda: drafter.decode_config(beams=4), "Drafter.decode_config got 'beams', which is not a DecodeConfig field")
    shaped = Drafter(DrafterConfig(hidden_size=32, vocab_size=64, batch_shapes={"4": {"tree_nodes": 3}}))
    refused(lambda: shaped.decode_config(batch_size="4"), "batch_size must be an int >= 1, got '4'")
    assert shaped.decode_config(batch_size=4, max_new_tokens=8).tree_nodes == 3
    assert shaped.decode_config().tree_nodes == 0


@pytest.mark.parametrize("spec", [None, 123, "", "   "])
def test_load_target_needs_a_model(spec):
    from redraft_cli import load_target

    refused(lambda: load_target(spec), "load_target needs a model")


@pytest.mark.parametrize("messages", [None, [], ["hi"], [{"role": "user"}], [{"role": "user", "content": None}], 5])
def test_encode_chat_takes_text_or_messages(messages):
    from conftest import tiny_chat_llama

    refused(lambda: tiny_chat_llama().encode_chat(messages), "encode_chat takes a text")


@pytest.mark.parametrize("device,fragment", [
    ("cuda:x", "--device must be one of auto, cpu, cuda, mps or cuda:N"),
    ("cuda: 0", "or cuda:N"),
    ("cuda:-1", "or cuda:N"),
    ("cuda:0:0", "or cuda:N"),
])
def test_a_malformed_device_is_refused(device, fragment):
    from redraft_cli.loading import TargetSpec

    refused(lambda: TargetSpec(device=device), fragment)


def test_a_cuda_device_on_a_machine_without_one_names_it():
    import torch

    from redraft_cli.loading import resolve_device

    if torch.cuda.is_available():
        refused(lambda: resolve_device(f"cuda:{torch.cuda.device_count()}"), "CUDA device\\(s\\)")
    else:
        refused(lambda: resolve_device("cuda:1"), "--device cuda:1 was asked for but no CUDA device is available")


@pytest.mark.parametrize("value,expected", [(None, True), ("", True), ("0", False), ("false", False), ("No", False),
                                            ("off", False), ("1", True), ("yes", True), ("2", True)])
def test_environment_switches_read_one_way(monkeypatch, value, expected):
    from redraft_cli.env import env_flag

    if value is None:
        monkeypatch.delenv("REDRAFT_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("REDRAFT_TEST_SWITCH", value)
    assert env_flag("REDRAFT_TEST_SWITCH", True) is expected
    assert env_flag("REDRAFT_TEST_SWITCH", False) is (expected if value else False)


def test_specs_configs_and_texts_of_the_wrong_kind(tiny_target, drafter, tmp_path):
    """Battery 9: each wrong argument is a redraft error naming it, not a TypeError from deep inside."""
    from redraft_cli.bench import BenchConfig
    from redraft_cli.sampling import SamplingConfig
    from redraft_cli.loading import TargetSpec, load_target

    refused(lambda: TargetSpec(device=None), "TargetSpec.device must be a str")
    refused(lambda: TargetSpec(device=1), "TargetSpec.device must be a str")
    refused(lambda: load_target("smollm2-135m", device=None), "TargetSpec.device must be a str")
    refused(lambda: load_target("smollm2-135m", foo=1), "'foo', which is not a TargetSpec field")
    refused(lambda: load_target(TargetSpec(), dtype="float32"), "only with a model string")
    for text in (123, None, b"x"):
        refused(lambda text=text: tiny_target.encode_raw(text), "encode_raw takes a text")
    refused(lambda: BenchConfig(batch_size=0), "BenchConfig.batch_size")
    refused(lambda: BenchConfig(decode=None), "BenchConfig.decode must be a DecodeConfig")
    refused(lambda: BenchConfig(warmup="no"), "BenchConfig.warmup must be bool, got 'no'")
    refused(lambda: BenchConfig(hf_baseline=1), "BenchConfig.hf_baseline must be bool, got 1")
    path = drafter.save(tmp_path / "d")
    refused(lambda: Drafter.load(path, map_location="meta"), "not a device this machine has")
    if not torch.cuda.is_available():
        refused(lambda: Drafter.load(path, map_location="cuda"), "not a device this machine has")
    # A temperature so small that logits / T overflow: refused, with the way to the argmax.
    refused(lambda: SamplingConfig(temperature=1e-40), r"temperature must be 0 \(greedy\) or at least 0.0001")
    assert SamplingConfig(temperature=1e-4).temperature == 1e-4


def test_numpy_numbers_become_pythons_so_results_stay_json():
    """A caller's numpy ints and floats (a grid from np.arange, a temperature from np.linspace) are taken
    and kept as Python's int and float: a result holding numpy's int64 would not be JSON-able."""
    import json

    import numpy as np

    from redraft_cli.bench import BenchConfig
    from redraft_cli.sampling import SamplingConfig
    from redraft_cli.sweep import SweepConfig

    d = DecodeConfig(max_new_tokens=np.int64(5), beam_width=np.int32(3), typical_epsilon=np.float32(0.5),
                     sampling=SamplingConfig(temperature=np.float64(0.7), seed=np.int64(1)))
    values = [d.max_new_tokens, d.beam_width, d.typical_epsilon, d.sampling.temperature, d.sampling.seed]
    assert [type(v) for v in values] == [int, int, float, float, int] and values == [5, 3, 0.5, 0.7, 1]
    assert type(BenchConfig(batch_size=np.int64(2)).batch_size) is int
    s = SweepConfig(beam_widths=np.arange(1, 3), beam_lengths=torch.tensor([3]), tree_nodes=range(2), batch_size=np.int8(1))
    assert s.shapes == [(1, 3, 0), (1, 3, 1), (2, 3, 0), (2, 3, 1)] and json.dumps(s.shapes)
    assert all(type(v) is int for v in [*s.beam_widths, *s.beam_lengths, *s.tree_nodes, s.batch_size])
    refused(lambda: SweepConfig(beam_widths=np.array([2.5])), "beam_widths must be a list of whole numbers")
    refused(lambda: SweepConfig(warmup="yes"), "SweepConfig.warmup must be bool")
    # numpy's bools and strings too, and a float field's whole number is a float (1.0 in the JSON, not 1)
    d = DecodeConfig(stop_on_eos=np.False_, accept=np.str_("greedy"), typical_epsilon=1, typical_delta=2)
    assert (type(d.stop_on_eos), type(d.accept), d.typical_epsilon, type(d.typical_delta)) == (bool, str, 1.0, float)
    assert BenchConfig(warmup=np.False_).warmup is False
    refused(lambda: DecodeConfig(typical_delta=10**400), "typical_delta must be a finite number, got a whole number of "
                                                          "401 digits")


def test_damaged_drafter_files_are_load_errors(tiny_target, tmp_path):
    """A draft vocabulary with negative ids, integer weights, a config.json that is not UTF-8 or
    nests past Python's stack: DrafterLoadError, before anything decodes."""
    from safetensors.torch import load_file, save_file

    good = Drafter.for_target(tiny_target, seed=0, head="own", draft_vocab_size=16).save(tmp_path / "good")
    cases = {
        "negative": lambda s: {**s, "draft_vocab": s["draft_vocab"] - 1},
        "ints": lambda s: {k: (v.to(torch.int32) if v.is_floating_point() else v) for k, v in s.items()},
    }
    for name, edit in cases.items():
        import shutil

        d = tmp_path / name
        shutil.copytree(good, d)
        state = load_file(str(d / "model.safetensors"))
        save_file(edit(state), str(d / "model.safetensors"))
        refused(lambda d=d: Drafter.load(d), {"negative": "negative token id", "ints": "not floating point"}[name],
                DrafterLoadError)
    d = tmp_path / "latin1"
    shutil.copytree(good, d)
    (d / "config.json").write_bytes(b'{"hidden_size": 32, "vocab_size": 64, "x": "\xe9"}')
    refused(lambda: Drafter.load(d), "not valid JSON", DrafterLoadError)
    (d / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(lambda: Drafter.load(d), "not valid JSON", DrafterLoadError)


def test_a_custom_proposer_that_breaks_the_beam_contract_is_refused(tiny_target):
    """Beams not starting with g0 would change the output silently; wrong shapes, ids outside the
    vocabulary or no DraftBeams at all would fail deep in verification. Each is a one-line error."""
    from redraft_cli.beam_search import DraftBeams

    def make(edit):
        def propose(h, g0, W, L, context):
            tokens = g0.view(-1, 1, 1).repeat(1, W, L).clone()
            return edit(DraftBeams(tokens, torch.zeros(tokens.shape[0], W, L - 1)))
        return propose

    cfg = DecodeConfig(max_new_tokens=4, beam_width=2, beam_length=3)
    cases = {
        "start with g0": lambda b: DraftBeams(torch.where(torch.arange(3) == 0, b.tokens + 1, b.tokens) % 64, b.logprobs),
        "outside the target's vocabulary": lambda b: DraftBeams(torch.cat([b.tokens[..., :1], b.tokens[..., 1:] + 10**6], -1),
                                                                b.logprobs),
        "expected": lambda b: DraftBeams(b.tokens[:, :1], b.logprobs[:, :1]),
        "must return DraftBeams": lambda b: None,
        "integer token ids": lambda b: DraftBeams(b.tokens.float(), b.logprobs),
        "logprobs must be floats": lambda b: DraftBeams(b.tokens, b.logprobs.long()),
    }
    for fragment, edit in cases.items():
        gen = Generator(tiny_target, proposer=make(edit))
        refused(lambda gen=gen: gen.generate(IDS, cfg), fragment)
    assert len(Generator(tiny_target, proposer=make(lambda b: b)).generate(IDS, cfg).tokens) == 4
    int32 = make(lambda b: DraftBeams(b.tokens.int(), b.logprobs))  # any integer dtype: taken as long
    assert len(Generator(tiny_target, proposer=int32).generate(IDS, cfg).tokens) == 4


@pytest.mark.parametrize("mode", ["redraft", "plain"])
def test_two_streams_of_one_generator_cannot_interleave(tiny_target, drafter, mode):
    """Battery 10: the streams of one Generator share its KV cache. Stepping an older stream after a newer
    one started decoded the newer one's context (or overflowed its cache): it is refused; the newer stream
    and a second Generator's are whole."""
    cfg = DecodeConfig(max_new_tokens=6, beam_width=2, beam_length=3)
    gen = Generator(tiny_target, drafter)
    a, b = [1, 2, 3], [4, 5, 6, 7, 8, 9]
    want_b = gen.generate(b, cfg, mode=mode).tokens
    older, newer = getattr(gen, mode)(a, cfg), getattr(gen, mode)(b, cfg)
    next(older)
    got_b = next(newer).tokens
    refused(lambda: next(older), "started another generation before this one finished")
    assert got_b + [t for s in newer for t in s.tokens] == want_b
    from itertools import zip_longest

    other = Generator(tiny_target, drafter)
    mine, theirs = getattr(gen, mode)(a, cfg), getattr(other, mode)(b, cfg)
    assert [t for _, s in zip_longest(mine, theirs) if s is not None for t in s.tokens] == want_b


def test_numbers_of_numpy_and_misplaced_arguments(tiny_target, drafter):
    """A NumPy seed (np.random.randint) failed torch's manual_seed with a TypeError; a non-str system prompt
    or model name failed inside the template or pathlib."""
    import numpy as np

    from conftest import tiny_chat_llama
    from redraft_cli import shipped_drafter_dir
    from redraft_cli.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=np.float32(0.5), top_k=np.int64(5), seed=np.int64(3))
    assert (type(sampling.temperature), type(sampling.top_k), type(sampling.seed)) == (float, int, int)
    cfg = DecodeConfig(max_new_tokens=3, beam_width=2, beam_length=3, sampling=sampling)
    assert len(Generator(tiny_target, drafter).generate(IDS, cfg).tokens) == 3
    refused(lambda: tiny_chat_llama().encode_chat("hi", system=5), "system prompt must be a text")
    refused(lambda: shipped_drafter_dir(tiny_target), "shipped_drafter_dir takes a model name")


def test_paths_under_the_home_folder(tiny_target, tmp_path, monkeypatch):
    """A quoted "~/..." (or --model=~/x, which the shell leaves as it is) names the home folder; it was
    "model path not found" and "drafter not found" for folders that exist."""
    from conftest import tiny_model_dir
    from redraft_cli import load_target
    from redraft_cli.files import cache_dir

    tiny_model_dir(tmp_path / "model", layers=1)
    Drafter.for_target(tiny_target, seed=0).save(tmp_path / "drafter")
    monkeypatch.setenv("REDRAFT_CACHE", str(cache_dir()))  # (the cache stays where it was)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_target("~/model", device="cpu").name == str(tmp_path / "model")
    assert Drafter.load("~/drafter").config.hidden_size == tiny_target.hidden_size


def test_a_generation_started_in_another_thread_during_a_pass_is_refused(tiny_target, drafter):
    """Battery 14: a second thread's generation could clear the caches while the first ran a pass (only
    the check after each pass stood between them). Passes hold the Generator's lock: a generation that
    starts while another thread's pass runs is refused at once, and the running one is whole."""
    import threading

    cfg = DecodeConfig(max_new_tokens=6, beam_width=2, beam_length=3)
    gen = Generator(tiny_target, drafter)
    want = gen.generate([1, 2, 3], cfg).tokens
    inside, release, got = threading.Event(), threading.Event(), {}

    def slow_draft(*args, **kwargs):  # the first thread's first draft waits until the second has tried
        inside.set()
        release.wait(10)
        return draft(*args, **kwargs)

    draft = gen._propose
    gen._propose = slow_draft
    first = threading.Thread(target=lambda: got.setdefault("first", gen.generate([1, 2, 3], cfg).tokens))
    first.start()
    assert inside.wait(10)
    refused(lambda: gen.generate([4, 5, 6], cfg), "running a generation in another thread")
    release.set()
    first.join(10)
    assert got["first"] == want
