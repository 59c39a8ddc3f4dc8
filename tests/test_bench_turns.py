"""Multi-turn bench (MT-Bench's protocol): a Dialogue's turn k is asked after each path's own answer to
turn k - 1; a later turn that cannot be asked is left out with the rest of its dialogue."""

from __future__ import annotations

import pytest

from conftest import tiny_chat_llama
from redraft_cli import DecodeConfig, Generator
from redraft_cli.bench import BenchConfig, run_bench
from redraft_cli.dialogue import Dialogue
from redraft_cli.errors import BadInputError
from redraft_cli.sampling import SamplingConfig

from test_decode_greedy import OracleProposer

pytestmark = pytest.mark.usefixtures("one_thread")

TURNS = [["Name three colours.", "And three more?", "Which is warmest?"],
         ["Say hello."],
         ["Count to five.", "Now backwards."]]


@pytest.fixture(scope="module")
def target():
    return tiny_chat_llama(seed=2, max_positions=256)


def gen_for(target, seed=4):
    return Generator(target, proposer=OracleProposer(target, seed=seed, oracle_beam=1))


def test_a_later_turn_is_the_conversation_so_far_with_the_answer_as_text(target):
    d = Dialogue(["Name three colours.", "And three more?"], system="Be brief.")
    answer = target.encode_raw("Red, green and blue.") + [target.tokenizer.eos_token_id]
    assert len(d) == 2
    assert d.prompt(target, []) == target.encode_chat("Name three colours.", system="Be brief.")
    assert d.prompt(target, [answer]) == target.encode_chat(
        [{"role": "user", "content": "Name three colours."},
         {"role": "assistant", "content": "Red, green and blue."},  # (the end of turn is the template's)
         {"role": "user", "content": "And three more?"}], system="Be brief.")
    with pytest.raises(BadInputError, match="has no turn 3"):
        d.prompt(target, [answer, answer])
    for turns, fragment in (([], "non-empty list"), ("text", "non-empty list"), ([1], "non-empty list")):
        with pytest.raises(BadInputError, match=fragment):
            Dialogue(turns)
    with pytest.raises(BadInputError, match="system turn is a text"):
        Dialogue(["hi"], system=3)
    from conftest import tiny_llama

    with pytest.raises(BadInputError, match="has no tokenizer: pass token ids instead"):
        d.prompt(tiny_llama(), [])


@pytest.mark.parametrize("batch_size", [1, 2])
def test_every_turn_is_answered_in_order_from_each_paths_own_answers(target, batch_size):
    """Greedy: both paths give the same answers turn after turn, so each turn's prompt is the one
    the plain answers make; rows come per answer, by_turn splits the totals, and batch 1 and 2 agree."""
    cfg = BenchConfig(DecodeConfig(max_new_tokens=10, beam_width=2, beam_length=3), warmup=False,
                      hf_baseline=True, batch_size=batch_size)
    dialogues = [Dialogue(t) for t in TURNS]
    r = run_bench(gen_for(target), dialogues, cfg)
    assert r["num_prompts"] == 3 and r["num_answers"] == 6 and r["turns"] == 3 and r["turns_dropped"] == []
    assert sorted((row["prompt"], row["turn"]) for row in r["per_prompt"]) == [(1, 1), (1, 2), (1, 3), (2, 1), (3, 1), (3, 2)]
    assert r["identical_outputs"] == 6 and all(row["identical"] for row in r["per_prompt"])
    assert [(t["turn"], t["answers"], t["identical_outputs"]) for t in r["by_turn"]] == [(1, 3, 3), (2, 2, 2), (3, 1, 1)]
    assert sum(row["redraft_tokens"] for row in r["per_prompt"]) == r["redraft"]["tokens"] == r["baseline"]["tokens"]
    assert r["baseline_hf"]["tokens"] == r["baseline"]["tokens"]  # (HF's own answers, the same greedy ones)
    # Turn 2 of prompt 1 is asked after the answer to turn 1: its prompt holds that answer.
    plain = Generator(target)
    first = plain.generate(dialogues[0].prompt(target, []), DecodeConfig(max_new_tokens=10), mode="plain").tokens
    second = dialogues[0].prompt(target, [first])
    row = next(x for x in r["per_prompt"] if (x["prompt"], x["turn"]) == (1, 2))
    assert row["prompt_tokens"] == len(second) > len(dialogues[0].prompt(target, [])) + 3
    digests = {(x["prompt"], x["turn"]): x["redraft_digest"] for x in r["per_prompt"]}
    one = run_bench(gen_for(target), dialogues, BenchConfig(cfg.decode, warmup=False, hf_baseline=False))
    assert digests == {(x["prompt"], x["turn"]): x["redraft_digest"] for x in one["per_prompt"]}


def test_each_path_goes_on_from_its_own_answers(target, monkeypatch):
    """Sampling: the paths' answers differ, and each path's next turn is asked after its own."""
    asked = []
    real = Dialogue.prompt

    def spy(self, t, answers):
        asked.append([list(a) for a in answers])
        return real(self, t, answers)

    monkeypatch.setattr(Dialogue, "prompt", spy)
    cfg = BenchConfig(DecodeConfig(max_new_tokens=8, beam_width=2, beam_length=3, accept="rejection",
                                   sampling=SamplingConfig(temperature=1.0, seed=3)), warmup=False, hf_baseline=False)
    r = run_bench(gen_for(target), [Dialogue(TURNS[2])], cfg)
    assert r["num_answers"] == 2 and r["identical_outputs"] is None
    later = [a for a in asked if len(a) == 1]  # turn 2's prompt, once for each path
    assert len(later) == 2 and later[0] != later[1]  # the plain answer, then ReDrafter's


def test_a_later_turn_past_the_context_is_left_out_with_the_rest_of_its_dialogue(monkeypatch):
    small = tiny_chat_llama(seed=2, max_positions=96)
    long_turn = "Tell me more about it, please. " * 20  # ~160 tokens: turn 2 cannot fit 96
    dialogues = [Dialogue(["Hi.", long_turn, "Thanks."]), Dialogue(["Count to five.", "Again."])]
    for batch_size in (1, 2):
        cfg = BenchConfig(DecodeConfig(max_new_tokens=6, beam_width=2, beam_length=3), warmup=False,
                          hf_baseline=False, batch_size=batch_size)
        ticks = []
        r = run_bench(gen_for(small), dialogues, cfg, progress=lambda done, total, label: ticks.append((done, total)))
        assert sorted((x["prompt"], x["turn"]) for x in r["per_prompt"]) == [(1, 1), (2, 1), (2, 2)]
        assert [(x["prompt"], x["turn"]) for x in r["turns_dropped"]] == [(1, 2)]
        assert "the conversation up to turn 2 is" in r["turns_dropped"][0]["why"]  # (no prompt of the user's to shorten)
        assert "lower --max-new-tokens or shorten the turns before it" in r["turns_dropped"][0]["why"]
        second = next(x for x in r["per_prompt"] if x["turn"] == 2)
        assert r["turns_cut_short"] == int(second["prompt_tokens"] + 6 > 96)
        assert ticks[-1][0] == ticks[-1][1] == 10  # the left-out turns count as done: the bar ends full
    # A later turn that fits but leaves less than max_new_tokens: its answer stops at the context, counted.
    cut = run_bench(gen_for(small), [Dialogue(["Hi.", "Again."])],
                    BenchConfig(DecodeConfig(max_new_tokens=40, beam_width=2, beam_length=3), warmup=False,
                                hf_baseline=False))
    assert [(x["turn"], x["prompt_tokens"] + x["redraft_tokens"]) for x in cut["per_prompt"]] == [(1, 72), (2, 96)]
    assert cut["turns_cut_short"] == 1 and cut["turns_dropped"] == []
    with pytest.raises(BadInputError, match="context"):  # turn 1 past the context is the caller's error
        run_bench(gen_for(small), [Dialogue([long_turn])], cfg)
    # sweep: every cell leaves the turn out, and the result lists it once (the CLI notes it, as bench does)
    from redraft_cli.sweep import SweepConfig, run_sweep

    s = run_sweep(gen_for(small), dialogues, SweepConfig(decode=DecodeConfig(max_new_tokens=6), beam_widths=[1, 2],
                                                         beam_lengths=[3], warmup=False))
    assert s["turns"] == 3 and [(x["prompt"], x["turn"]) for x in s["turns_dropped"]] == [(1, 2)]
    assert s["turns_answered"] == 2  # (battery 31: the title said "up to 3 turns" when no turn 3 ran)
    assert [c["answers"] for c in s["cells"]] == [3, 3] and all(len(c["turns_dropped"]) == 1 for c in s["cells"])


def test_a_ctrl_c_in_a_later_turn_keeps_the_answers_before_it(target, monkeypatch):
    from redraft_cli import bench

    real, calls = bench._run_path, []

    def run_path(gen, path, group, d, slots, done=None):
        calls.append(path)
        if len(calls) == 3:  # turn 2's first path
            raise KeyboardInterrupt
        return real(gen, path, group, d, slots, done)

    monkeypatch.setattr(bench, "_run_path", run_path)
    cfg = BenchConfig(DecodeConfig(max_new_tokens=6, beam_width=2, beam_length=3), warmup=False, hf_baseline=False)
    r = run_bench(gen_for(target), [Dialogue(TURNS[2]), Dialogue(TURNS[1])], cfg)
    assert r["interrupted"] and r["answers_asked"] == 3 and r["prompts_asked"] == 2
    assert [(x["prompt"], x["turn"]) for x in r["per_prompt"]] == [(1, 1)] and r["num_answers"] == 1


def test_bench_turns_on_the_command_line(tmp_path):
    """`redraft bench --turns all` on the embedded default: every turn answered, the table and JSON
    say so; a bad --turns, or --turns with raw text, is a one-line error before any model loads."""
    import json

    from test_cli import assert_clean_error, invoke

    prompts = tmp_path / "mt.jsonl"
    prompts.write_text('{"turns": ["Name three colours.", "Three more?"]}\n{"prompt": "What is 2 + 2?"}\n')
    out = tmp_path / "b.json"
    result = invoke("bench", "--drafter", "random", "--prompts", prompts, "--turns", "all", "--max-new-tokens", 6,
                    "--beam-width", 2, "--beam-length", 3, "--no-hf-baseline", "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["turns_asked"] == "all" and data["turns"] == 2 and data["num_answers"] == 3 and data["num_prompts"] == 2
    assert data["identical_outputs"] == 3 and [t["answers"] for t in data["by_turn"]] == [2, 1]
    text = " ".join(result.output.split())
    assert "2 prompts (3 answers, up to 2 turns) x 6 tokens" in text and "identical outputs 3/3" in text
    assert f"note: --turns all: 1 of 2 prompts in {prompts} goes on past its first turn, 3 answers in all" in text
    one = invoke("bench", "--drafter", "random", "--prompts", prompts, "--turns", "1", "--max-new-tokens", 6,
                 "--beam-width", 2, "--beam-length", 3, "--no-hf-baseline", "--json", out)
    assert one.exit_code == 0, one.output
    data = json.loads(out.read_text())
    assert data["turns_asked"] == 1 and data["num_answers"] == 2 and "by_turn" not in data
    for bad in ("0", "two", "-1", "\u00b2", "\u0661", "1.5"):  # (a superscript two passed isdigit(), then int() failed)
        assert_clean_error(invoke("bench", "--turns", bad), "--turns takes a whole number >= 1 or 'all'")
    assert_clean_error(invoke("bench", "--turns", "2", "--no-chat-template"), "--no-chat-template sends raw text")


def test_sweep_answers_every_turn_in_every_cell(target):
    from redraft_cli.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(decode=DecodeConfig(max_new_tokens=6), beam_widths=[1, 2], beam_lengths=[3], warmup=True)
    ticks = []
    r = run_sweep(gen_for(target), [Dialogue(t) for t in TURNS], cfg,
                  progress=lambda done, total, label: ticks.append((done, total)))
    assert [(c["answers"], c["identical_outputs"]) for c in r["cells"]] == [(6, 6), (6, 6)]
    assert ticks[-1] == (2 + 2 * 2 * 6, 2 + 2 * 2 * 6)  # warm-up, then 2 cells x 2 paths x 6 answers


def test_a_ctrl_c_before_any_row_of_a_later_batched_turn_keeps_the_hf_baseline(target, monkeypatch):
    """Battery 30: at --batch-size 2 a Ctrl-C in turn 2 before any of its rows finished counts nothing of
    that turn, so the HF baseline of the turns before stands (it was thrown away)."""
    from redraft_cli import bench
    from redraft_cli.decode import BatchRun

    cfg = BenchConfig(DecodeConfig(max_new_tokens=6, beam_width=2, beam_length=3), warmup=False, hf_baseline=True,
                      batch_size=2)
    dialogues = [Dialogue(TURNS[0][:2]), Dialogue(TURNS[2])]
    real_step, real_hf, state = BatchRun.step, bench.hf_generate, {"turn": 0}

    def hf(*args):
        state["turn"] += 1  # HF runs once a turn, after the two paths
        return real_hf(*args)

    def step(self):
        if state["turn"] == 1:  # turn 2's first pass
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(BatchRun, "step", step)
    monkeypatch.setattr(bench, "hf_generate", hf)
    r = run_bench(gen_for(target), dialogues, cfg)
    assert r["interrupted"] and r["num_answers"] == 2 and r["answers_asked"] == 4
    assert r["baseline_hf"]["tokens"] == 12 == r["baseline"]["tokens"] and r["speedup_vs_hf"] is not None


def test_a_sampled_turn_draws_from_its_own_seed(target, monkeypatch):
    """Battery 31: every turn sampled from --seed, so turn 2 drew turn 1's numbers and now and then repeated
    its answer word for word. Turn k samples from seed + k - 1, on every path alike."""
    from redraft_cli import bench

    seeds, real = [], bench._run_path

    def run_path(gen, path, group, d, slots, done=None):
        seeds.append((path, d.sampling.seed))
        return real(gen, path, group, d, slots, done)

    monkeypatch.setattr(bench, "_run_path", run_path)
    cfg = BenchConfig(DecodeConfig(max_new_tokens=4, beam_width=2, beam_length=3, accept="rejection",
                                   sampling=SamplingConfig(temperature=1.0, seed=7)), warmup=False, hf_baseline=True)
    run_bench(gen_for(target), [Dialogue(TURNS[0])], cfg)
    assert sorted(seeds) == sorted((p, 7 + k) for k in range(3) for p in ("plain", "redraft", "hf"))


def test_a_template_that_leaves_the_earlier_turns_out_is_noted(tmp_path):
    from test_cli import invoke

    prompts = tmp_path / "mt.jsonl"
    prompts.write_text('{"turns": ["Name three colours.", "Three more?"]}\n')
    last_only = "{{ messages[-1]['content'] }}\n"  # (renders the last message alone: no history)
    result = invoke("bench", "--drafter", "random", "--prompts", prompts, "--turns", "all", "--max-new-tokens", 4,
                    "--beam-width", 2, "--beam-length", 3, "--no-hf-baseline", "--chat-template", last_only)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "note: the chat template leaves the earlier turns out of a later turn's prompt" in said
    plain = invoke("bench", "--drafter", "random", "--prompts", prompts, "--turns", "all", "--max-new-tokens", 4,
                   "--beam-width", 2, "--beam-length", 3, "--no-hf-baseline")
    assert plain.exit_code == 0 and "leaves the earlier turns out" not in plain.output
