"""The CLI through Typer's CliRunner: bench end to end, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama, tiny_model_dir
from redraft_cli.drafter import Drafter
from redraft_cli.cli.app import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *fragments: str, code: int = 2) -> None:
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out, out
    assert out.strip().startswith("error:"), out
    for f in fragments:
        assert f in out, out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    p.write_text('{"turns": ["Name three colours."]}\n{"prompt": "What is 2 + 2?"}\n')
    return p


def test_help_lists_all_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for cmd in ("distill", "chat", "bench", "sweep"):
        assert cmd in result.output


def test_bench_random_drafter_json(tmp_path, prompt_file):
    out = tmp_path / "b.json"
    result = invoke("bench", "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 2,
                    "--max-new-tokens", 8, "--beam-width", 2, "--beam-length", 3, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    for key in ("model", "drafter", "accept", "temperature", "beam_width", "beam_length", "num_prompts",
                "max_new_tokens", "baseline", "redraft", "speedup", "identical_outputs", "baseline_hf", "speedup_vs_hf"):
        assert key in data, key
    for key in ("tokens", "seconds", "tokens_per_s", "steps", "tokens_per_step", "acceptance_rate",
                "mean_tree_nodes", "draft_s", "verify_s", "accept_s"):
        assert key in data["redraft"], key
    assert data["identical_outputs"] == 2 and data["batch_invariant"] is True  # the embedded default on CPU
    assert data["baseline"]["tokens"] == data["redraft"]["tokens"] == data["baseline_hf"]["tokens"] == 16
    assert [r["redraft_tokens"] for r in data["per_prompt"]] == [8, 8]
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert all(n.startswith("note: ReDrafter ran at") for n in notes), notes  # only the timing-dependent one
    assert all(1.0 <= r["tokens_per_step"] <= 3.0 for r in data["per_prompt"])  # at most g0 + 2 drafted per step
    assert "ReDrafter" in result.output
    assert "2 prompts x 8 tokens" in " ".join(result.output.split())
    # No terminal here: the progress bar is a line per path instead (it printed nothing for minutes in a log).
    logged = [line for line in result.output.splitlines() if line.startswith("bench: ")]
    assert logged[-1].startswith("bench: 9/9 runs ("), logged  # 3 paths x (2 prompts + a warm-up)
    assert any("redraft" in line for line in logged) and len(logged) <= 9, logged


def test_bench_and_sweep_send_a_prompt_file_s_own_system_turns(tmp_path, smollm2):
    """A prompt's own system turn (an OpenAI system message) goes with it; prompts without one send the run's
    (here the template's default). --system replaces them all, raw text cannot carry them, and one that alone
    fills the context is named as that prompt's."""
    path = tmp_path / "sys.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": "Answer in French."},
                                             {"role": "user", "content": "Name three colours."}]})
                    + "\n" + json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    common = ("--drafter", "random", "--prompts", path, "--max-new-tokens", 4, "--no-warmup")
    result = invoke("bench", *common, "--no-hf-baseline", "--json", tmp_path / "b.json")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert f"note: 1 of 2 prompts in {path} sends its own system turn; the other 1 sends the chat template's " \
           f"default (--system overrides)" in said, said
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["prompt_systems"] == 1 and data["system"] is None and data["identical_outputs"] == 2
    target = smollm2
    assert [r["prompt_tokens"] for r in data["per_prompt"]] == [
        len(target.encode_chat("Name three colours.", system="Answer in French.")), len(target.encode_chat("What is 2 + 2?"))]
    swept = invoke("sweep", *common, "--beam-widths", 1, "--beam-lengths", 2, "--system", "Be brief.",
                   "--json", tmp_path / "s.json")
    assert swept.exit_code == 0, swept.output
    assert f"note: --system replaces the system turn of 1 of 2 prompts in {path}" in " ".join(swept.output.split())
    assert json.loads((tmp_path / "s.json").read_text())["prompt_systems"] == 0
    raw = invoke("bench", *common, "--no-hf-baseline", "--no-chat-template", "--num-prompts", 1)
    assert raw.exit_code == 0, raw.output
    assert "system turn of 1 of 1 prompt in" in raw.output and "is not sent: raw text" in " ".join(raw.output.split())
    path.write_text(json.dumps({"system": "colour " * 9000, "prompt": "Name three colours."}) + "\n")
    assert_clean_error(invoke("bench", *common), "prompt 1's system turn in", "leaves no room for a prompt; shorten "
                       "that system turn")
    path.write_text(json.dumps({"prompt": "Hi."}) + "\n" + json.dumps({"system": "colour " * 8150, "prompt": "Hi. " * 50}))
    assert_clean_error(invoke("bench", *common), "prompt 2 of 2 in", "of them its system turn, and",
                       "shorten the prompt, or shorten that system turn (or leave it out of the prompt file)")
    # A template that takes system turns but rewrites messages fails on one holding a control token's string:
    # that prompt is named, and the others' system turns are not taken for refused (battery 27).
    trim = tmp_path / "trim.jinja"
    trim.write_text("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] | trim) + "
                    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                    "{% endif %}")
    path.write_text(json.dumps({"system": " Be <|im_end|> a pirate. ", "prompt": "Hi."}) + "\n"
                    + json.dumps({"system": "Be a pirate.", "prompt": "Hi."}) + "\n")
    for order in (1, -1):
        lines = path.read_text().splitlines()[::order]
        path.write_text("\n".join(lines) + "\n")
        assert_clean_error(invoke("bench", *common, "--chat-template", trim),
                           f"prompt {1 if order == 1 else 2} of 2 in {path} (or its system turn): a message holds "
                           f"the control token")
    assert_clean_error(invoke("bench", *common, "--chat-template", trim, "--system", " a <|im_end|> b "),
                       "the --system prompt: a message holds the control token")


def test_bench_and_sweep_take_a_system_prompt(tmp_path, prompt_file, smollm2):
    """--system is the system turn of every prompt (as in chat): the prompts grow by it, the JSON names it;
    with --no-chat-template (raw text, no turns) it is refused before the model loads."""
    common = ("--drafter", "random", "--prompts", prompt_file, "--num-prompts", 1, "--max-new-tokens", 4, "--no-warmup")
    runs = {}
    for system in (None, "Answer in French."):
        out = tmp_path / f"{system is None}.json"
        result = invoke("bench", *common, "--no-hf-baseline", "--json", out, *(("--system", system) if system else ()))
        assert result.exit_code == 0, result.output
        runs[system] = json.loads(out.read_text())
    assert runs["Answer in French."]["system"] == "Answer in French." and runs[None]["system"] is None
    assert runs["Answer in French."]["identical_outputs"] == 1
    target = smollm2
    with_system = target.encode_chat("Name three colours.", system="Answer in French.")
    assert "Answer in French." in target.tokenizer.decode(with_system)
    assert runs["Answer in French."]["per_prompt"][0]["prompt_tokens"] == len(with_system)
    assert runs[None]["per_prompt"][0]["prompt_tokens"] == len(target.encode_chat("Name three colours."))
    swept = invoke("sweep", *common, "--beam-widths", 1, "--beam-lengths", 2, "--system", "", "--json", tmp_path / "s.json")
    assert swept.exit_code == 0, swept.output
    assert json.loads((tmp_path / "s.json").read_text())["system"] == ""
    for cmd in ("bench", "sweep"):
        assert_clean_error(invoke(cmd, "--no-chat-template", "--system", "Be brief."), "--system is a turn of the chat "
                           "template", "--no-chat-template")
    assert_clean_error(invoke("bench", *common, "--system", "word " * 9000), "the --system prompt is 9015 tokens in "
                       "the chat template, and smollm2-135m's context is 8192: it leaves no room for a prompt; shorten "
                       "--system")
    assert_clean_error(invoke("bench", "--num-prompts", 2, "--system", "word " * 8150),
                       "prompt 1 of 2 is 8194 tokens, 8165 of them the --system prompt, and smollm2-135m's context "
                       "is 8192: shorten the prompt, or shorten --system")


def test_a_slower_redrafter_is_explained():
    from redraft_cli.cli.common import slower_note

    assert slower_note(1.2, 1.1, 1, "d") is None and slower_note(None, 1.0, 1, "d") is None
    assert "beams of length 1 (g0 alone) draft nothing" in slower_note(0.9, 1.0, 1, "d", beam_length=1)
    assert "rarely predicts this text (1.10 tokens per step)" in slower_note(0.7, 1.1, 4, "d")
    assert "sweep --batch-size 16 --save-best" in slower_note(0.63, 1.94, 16, "d")
    assert "ran at 0.90x" in slower_note(0.9, 2.5, 1, "d") and "sweep --save-best" in slower_note(0.9, 2.5, 1, "d")
    assert "untrained (--drafter random)" in slower_note(0.5, 1.0, 1, "random (seed 0)")
    assert "CUDA graphs" in slower_note(0.68, 3.0, 1, "d", graphed=True)  # the H200's case: drafting is the cost
    assert slower_note(0.8, 2.0, 1, "d", subject="the fastest shape tried").startswith(
        "note: the fastest shape tried ran at 0.80x")
    # Answers the context (or the end of text) cut to a step or two: their length is the reason, not the drafter.
    short = slower_note(0.6, 1.0, 1, "d", steps_per_answer=1.0)
    assert "took only 1.0 decode steps each" in short and "rarely predicts" not in short
    assert "rarely predicts" in slower_note(0.6, 1.0, 1, "d", steps_per_answer=40.0)


def test_bench_names_answers_the_context_cut_short(tmp_path, monkeypatch):
    """A prompt that leaves 3 tokens of the context: the answer takes a step or two, and the note on a
    slower ReDrafter is given that length (it blamed the drafter's predictions)."""
    import redraft_cli.cli.bench as bench_cli

    model_dir, tok, _ = tiny_model_dir(tmp_path / "tiny-ctx", layers=1)
    text = " ".join(["word"] * 600)
    ids = tok(text, add_special_tokens=False)["input_ids"][:509]
    (tmp_path / "long.txt").write_text(tok.decode(ids) + "\n")
    seen = []
    monkeypatch.setattr(bench_cli, "slower_note", lambda *a, **k: seen.append(k["steps_per_answer"]))
    r = invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", tmp_path / "long.txt",
               "--max-new-tokens", 32, "--no-hf-baseline", "--no-warmup", "--no-chat-template")
    assert r.exit_code == 0, r.output
    assert "answers stop where the context ends" in r.output
    assert seen and seen[0] <= 2, seen


def test_bench_ctrl_c_keeps_the_finished_prompts(tmp_path, prompt_file, monkeypatch):
    """Ctrl-C during the second prompt: the first prompt's paths are the result (table and --json,
    marked interrupted), the exit code 130."""
    from redraft_cli import bench

    real, calls = bench._run_path, []

    def run_path(gen, path, group, d, slots, done=None):
        calls.append(path)
        if len(calls) == 3 + 3 + 1:  # the first path of prompt 2, after the warm-up and prompt 1 (3 paths each)
            raise KeyboardInterrupt
        return real(gen, path, group, d, slots, done)

    monkeypatch.setattr(bench, "_run_path", run_path)
    out = tmp_path / "b.json"
    result = invoke("bench", "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 2,
                    "--max-new-tokens", 4, "--beam-width", 2, "--beam-length", 2, "--json", out)
    assert result.exit_code == 130, result.output
    data = json.loads(out.read_text())
    assert data["interrupted"] and data["num_prompts"] == 1 and data["prompts_asked"] == 2
    assert data["baseline"]["tokens"] == data["redraft"]["tokens"] == 4 and len(data["per_prompt"]) == 1
    assert "cover the 1 of 2 prompts" in " ".join(result.output.split())


def test_bench_batch_matches_batch_one(tmp_path):
    """--batch-size 2 decodes 3 prompts through 2 slots on every path (the third takes the first
    free slot); each row's output is the batch-1 output."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name three colours.\nWhat is 2 + 2?\nSay hello in French.\n")
    outs = {}
    for b in (1, 2):
        out = tmp_path / f"b{b}.json"
        result = invoke("bench", "--drafter", "random", "--prompts", prompts, "--num-prompts", 3,
                        "--max-new-tokens", 8, "--beam-width", 2, "--beam-length", 3, "--batch-size", b,
                        "--no-warmup", "--json", out)
        assert result.exit_code == 0, result.output
        outs[b] = json.loads(out.read_text())
    assert outs[2]["batch_size"] == 2 and outs[2]["identical_outputs"] == 3
    assert [r["plain_digest"] for r in outs[1]["per_prompt"]] == [r["plain_digest"] for r in outs[2]["per_prompt"]]
    assert [r["redraft_digest"] for r in outs[1]["per_prompt"]] == [r["redraft_digest"] for r in outs[2]["per_prompt"]]
    assert outs[2]["baseline_hf"]["tokens"] == 24
    assert "batch 2" in result.output and "busy rows per pass of 2" in result.output
    assert_clean_error(invoke("bench", "--drafter", "random", "--prompts", prompts, "--batch-size", 0), "--batch-size")


def test_bench_batch_takes_the_drafters_batch_shape(tmp_path, prompt_file, smollm2):
    """--batch-size 2 takes the drafter's saved shape for batches of 2 and more; a recommended value
    out of range is a one-line error that points at config.json, not at an option never given."""
    from redraft_cli.drafter import CONFIG_NAME, Drafter

    path = tmp_path / "drafter"
    Drafter.for_target(smollm2, seed=1).save(path)
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg["redraft"]["batch_shapes"] = {"2": {"beam_width": 1, "beam_length": 2, "lookup_beams": 0}}
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    runs = {}
    for b in (1, 2):
        out = tmp_path / f"b{b}.json"
        result = invoke("bench", "--drafter", path, "--prompts", prompt_file, "--num-prompts", 2, "--max-new-tokens", 4,
                        "--batch-size", b, "--no-warmup", "--no-hf-baseline", "--json", out)
        assert result.exit_code == 0, result.output
        runs[b] = json.loads(out.read_text())
    assert (runs[2]["beam_width"], runs[2]["beam_length"], runs[2]["lookup_beams"]) == (1, 2, 0)
    assert (runs[1]["beam_width"], runs[1]["beam_length"]) == (cfg["redraft"]["beam_width"], cfg["redraft"]["beam_length"])
    cfg["redraft"]["batch_shapes"] = {"2": {"lookup_length": 99}}
    (path / CONFIG_NAME).write_text(json.dumps(cfg))
    assert_clean_error(invoke("bench", "--drafter", path, "--prompts", prompt_file, "--batch-size", 2),
                       "got 99", "config.json recommends")


def test_bench_rejection_sampling_runs(prompt_file, tmp_path):
    out = tmp_path / "s.json"
    result = invoke("bench", "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 2,
                    "--max-new-tokens", 6, "--accept", "rejection", "--temperature", 0.7, "--top-p", 0.9,
                    "--no-hf-baseline", "--no-warmup", "--batch-size", 2, "--json", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())  # sampled outputs are not compared: null, not a failed comparison
    assert data["identical_outputs"] is None and [r["identical"] for r in data["per_prompt"]] == [None, None]
    assert "per pass" in result.output and "per step" not in result.output  # (a batched pass: several rows' steps)
    more = invoke("bench", "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 5,
                  "--max-new-tokens", 2, "--no-hf-baseline", "--no-warmup")
    assert more.exit_code == 0 and "note: --num-prompts 5, but the prompts hold 2; using 2" in more.output, more.output


def test_accept_auto_samples_and_typical_settings_are_recorded(tmp_path, prompt_file):
    """--temperature alone samples losslessly (auto: rejection); greedy + temperature is refused; a typical
    run's JSON keeps epsilon and delta; a sampling rule at temperature 0 says it decodes greedily."""
    args = ("bench", "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 1, "--max-new-tokens", 4,
            "--no-hf-baseline", "--no-warmup", "--beam-width", 2, "--beam-length", 2)
    out = tmp_path / "t.json"
    auto = invoke(*args, "--temperature", 0.7, "--json", out)
    assert auto.exit_code == 0 and json.loads(out.read_text())["accept"] == "rejection", auto.output
    assert_clean_error(invoke(*args, "--temperature", 0.7, "--accept", "greedy"), "--accept greedy decodes greedily")
    typical = invoke(*args, "--temperature", 0.7, "--accept", "typical", "--epsilon", 0.2, "--json", out)
    data = json.loads(out.read_text())
    assert typical.exit_code == 0 and (data["typical_epsilon"], data["typical_delta"]) == (0.2, 0.3)
    greedy = invoke(*args, "--accept", "typical")
    assert greedy.exit_code == 0 and "--accept typical changes nothing" in " ".join(greedy.output.split())
    # --epsilon / --delta without --accept typical were ignored without a word (said before the model loads).
    ignored = invoke(*args, "--temperature", 0.7, "--epsilon", 0.2, "--delta", 0.5, "--json", tmp_path / "no" / "x.json")
    assert ignored.exit_code == 2 and "loading" not in ignored.output.lower(), ignored.output
    assert "with --accept auto, --epsilon and --delta change nothing" in " ".join(ignored.output.split())


@pytest.mark.parametrize("args,fragments", [
    (["--model", "no-such-org/no-such-model-xyz"], ["no-such-org/no-such-model-xyz"]),
    (["--model", "/no/such/dir"], ["not found"]),
    (["--beam-width", "0"], ["--beam-width must be >= 1, got 0"]),
    (["--beam-length", "0"], ["--beam-length must be >= 1"]),
    (["--beam-width", "2", "--beam-length", "3", "--nodes", "5"], ["--nodes 5", "2x3"]),
    (["--accept", "sometimes"], ["--accept"]),
    (["--temperature", "-1"], ["temperature"]),
    (["--temperature", "inf"], ["finite"]),
    (["--dtype", "float8"], ["--dtype"]),
    (["--quantize", "3bit"], ["--quantize"]),
    (["--num-prompts", "0"], ["--num-prompts"]),
    (["--json", "/no/such/folder/out.json"], ["does not exist"]),
    (["--json", "/proc/redraft-out.json"], ["cannot write /proc/redraft-out.json"]),  # refused before the run
    (["--accept", "rejection", "--temperature", "0.7", "--seed", "99999999999999999999"], ["seed must be between"]),
    (["--accept", "typical", "--temperature", "0.7", "--delta", "nan"], ["--delta (typical acceptance) must be a finite"]),
    # A bad value is the error, with no note before it that the option changes nothing here.
    (["--epsilon", "-1"], ["--epsilon (typical acceptance) must be in (0, 1], got -1.0"]),
    (["--top-p", "0"], ["top-p must be in (0, 1], got 0.0"]),
])
def test_bad_options(args, fragments, prompt_file):
    assert_clean_error(invoke("bench", "--drafter", "random", "--prompts", prompt_file, *args), *fragments)


def test_bad_files(tmp_path, prompt_file):
    assert_clean_error(invoke("bench", "--prompts", tmp_path / "missing.jsonl"), "not found")
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    assert_clean_error(invoke("bench", "--model", gguf, "--prompts", prompt_file), "GGUF")
    bad = tmp_path / "drafter"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "model.safetensors").write_bytes(b"junk")
    assert_clean_error(invoke("bench", "--drafter", bad, "--prompts", prompt_file), "drafter")
    assert_clean_error(invoke("bench", "--drafter", tmp_path / "nope", "--prompts", prompt_file), "not a directory")
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\x00\x00\x00garbage")  # the magic, then a header cut short
    assert_clean_error(invoke("bench", "--model", short, "--prompts", prompt_file), "short.gguf")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_clean_error(invoke("bench", "--model", empty, "--prompts", prompt_file), "empty.gguf")
    (tmp_path / "not-a-model").mkdir()
    assert_clean_error(invoke("bench", "--model", tmp_path / "not-a-model", "--prompts", prompt_file),
                       "not a model directory")
    (tmp_path / "not-a-model" / "config.json").write_text('{"model_type": "llama"}')
    assert_clean_error(invoke("bench", "--model", tmp_path / "not-a-model", "--prompts", prompt_file),
                       "has no tokenizer", "tokenizer.json")
    for name, block, fragment in (("list", [1, 2], "'redraft' must be a mapping"),
                                  ("str", {"beam_width": "x"}, "redraft.beam_width must be int"),
                                  ("vocab", {"draft_vocab_size": "lots"}, "must be int or null"),
                                  ("zero", {"predict_tokens": 0}, "predict_tokens")):
        d = tmp_path / f"drafter-{name}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"hidden_size": 576, "vocab_size": 49152, "redraft": block}))
        (d / "model.safetensors").write_bytes(b"junk")  # never read: the config is refused first
        assert_clean_error(invoke("bench", "--drafter", d, "--prompts", prompt_file), fragment)


def test_version_needs_no_command():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("redraft "), result.output


def test_mismatched_drafter(tmp_path, tiny_target, prompt_file):
    from redraft_cli.drafter import Drafter

    Drafter.for_target(tiny_target).save(tmp_path / "tiny")
    assert_clean_error(invoke("bench", "--drafter", tmp_path / "tiny", "--prompts", prompt_file),
                       "does not match", "hidden size 32")


def test_only_an_alias_names_a_shipped_drafter(tmp_path):
    """A model given by absolute path never takes a packaged drafter of the same name (it used to
    resolve to the model directory itself); nor does a hub id."""
    from redraft_cli.shipped import shipped_drafter_dir

    assert shipped_drafter_dir("smollm2-135m") is not None
    for name in (str(tmp_path), "/tmp", "HuggingFaceTB/SmolLM2-135M-Instruct", "", ".", "..", "no-such-alias"):
        assert shipped_drafter_dir(name) is None, name


def test_prompt_longer_than_context(tmp_path):
    long = tmp_path / "long.txt"
    long.write_text(" ".join(["word"] * 9000) + "\n")
    assert_clean_error(invoke("bench", "--drafter", "random", "--prompts", long), "context", "prompt 1 of 1 in",
                       "long.txt: the prompt is")  # (battery 15: the file was not named)
    long.write_text("Hello there.\n" + " ".join(["word"] * 9000) + "\nWhat is 2 + 2?\n")  # which one of the file
    assert_clean_error(invoke("bench", "--drafter", "random", "--prompts", long), "prompt 2 of 3 in",
                       "long.txt: the prompt is", "leave it out of the prompt file")


def test_local_model_directory_and_missing_chat_template(tmp_path, prompt_file):
    """A local HF directory loads; a tokenizer without a chat template is a clear error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir, tok, cfg = tiny_model_dir(tmp_path / "tiny-local", layers=1)
    ok = invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file,
                "--num-prompts", 1, "--max-new-tokens", 4, "--no-hf-baseline")
    assert ok.exit_code == 0, ok.output
    tok.chat_template = None
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    data = json.loads(cfg_path.read_text())
    data.pop("chat_template", None)
    cfg_path.write_text(json.dumps(data))
    assert_clean_error(invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file),
                       "no chat template", "--chat-template", "--no-chat-template")
    raw = invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file,
                 "--num-prompts", 1, "--max-new-tokens", 4, "--no-hf-baseline", "--no-chat-template")
    assert raw.exit_code == 0, raw.output
    # --chat-template renders prompts (a name here); a drafter distilled with a named template brings it along.
    run = ("bench", "--model", model_dir, "--prompts", prompt_file, "--num-prompts", 1, "--max-new-tokens", 4,
           "--no-hf-baseline", "--no-warmup")
    named = invoke(*run, "--drafter", "random", "--chat-template", "vicuna")
    assert named.exit_code == 0, named.output
    from redraft_cli.cli.common import load_models
    from redraft_cli.loading import TargetSpec, load_target

    drafter_dir = tmp_path / "vicuna-drafter"
    Drafter.for_target(load_target(TargetSpec(str(model_dir))), seed=0).save(drafter_dir)
    (drafter_dir / "recipe.yaml").write_text("target:\n  model: x\n  chat_template: vicuna\n")
    saved = invoke(*run, "--drafter", drafter_dir, "--json", tmp_path / "saved.json")
    assert saved.exit_code == 0 and "distilled with (vicuna)" in " ".join(saved.output.split()), saved.output
    assert json.loads((tmp_path / "saved.json").read_text())["chat_template"] == "vicuna"  # (the one rendered)
    said = invoke("chat", "--model", model_dir, "--drafter", drafter_dir, "-p", "Hi", "--max-new-tokens", 2, "--json")
    assert said.exit_code == 0 and json.loads(said.stdout)["chat_template"] == "vicuna", said.output
    loaded = load_models(str(model_dir), str(drafter_dir), "auto", "cpu", "none", 0)
    rendered = loaded.target.tokenizer.decode(loaded.target.encode_chat("Name a colour."))
    assert rendered.endswith("USER: Name a colour. ASSISTANT:") and rendered.startswith("A chat between")
    assert_clean_error(invoke(*run, "--drafter", "random", "--chat-template", "no-such-template"),
                       "unknown chat template 'no-such-template'", "vicuna")
    assert_clean_error(invoke(*run, "--drafter", "random", "--chat-template", "vicuna", "--no-chat-template"),
                       "exclude each other")
    # A tokenizer whose ids run past the model's vocabulary: a clear error, not an IndexError in the embedding.
    small = tmp_path / "tiny-small-vocab"
    LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "vocab_size": 1000})).save_pretrained(small)
    tok.save_pretrained(small)
    assert_clean_error(invoke("bench", "--model", small, "--drafter", "random", "--prompts", prompt_file,
                              "--no-chat-template"), "outside", "vocabulary of 1000")


def test_targets_that_may_round_trees_differently_are_noted(tmp_path, prompt_file):
    """On CPU a Llama-family target is batch-invariant (no note); a generic-path model is not, and says so."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir, tok, _ = tiny_model_dir(tmp_path / "tiny-llama", layers=1)
    args = ("--drafter", "random", "--prompts", prompt_file, "--num-prompts", 1, "--max-new-tokens", 4,
            "--no-hf-baseline", "--no-warmup", "--device", "cpu")
    r = invoke("bench", "--model", model_dir, *args)
    assert r.exit_code == 0 and "near-ties" not in r.output, r.output
    gpt2 = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok))).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    r = invoke("bench", "--model", gpt2, *args)
    assert r.exit_code == 0, r.output
    assert "gpt2 models run the generic Hugging Face path" in r.output and "near-ties" in r.output


def test_an_encoder_is_refused_as_a_target(tmp_path, prompt_file):
    """AutoModelForCausalLM loads BERT too (BertLMHeadModel); it sees later tokens, so it is no target."""
    from transformers import BertConfig, BertLMHeadModel

    _, tok, _ = tiny_model_dir(tmp_path / "llama", layers=1)
    bert = tmp_path / "bert"
    torch.manual_seed(0)  # (a tiny random BERT's first position moves little with the second token: 1 seed in 40
    # stays within the check's rounding tolerance, so the test took whatever RNG state the tests before it left)
    BertLMHeadModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(bert)
    tok.save_pretrained(bert)
    assert_clean_error(invoke("bench", "--model", bert, "--prompts", prompt_file, "--num-prompts", 1),
                       "is not a causal language model")


def test_a_seq2seq_model_and_an_unreadable_eos_are_one_line(tmp_path, prompt_file):
    """A T5 has no causal LM (was: "Unrecognized configuration class <class '...'> for this kind of AutoModel");
    an eos_token_id that is no token id was a ValueError reported as a bug (exit 1); a file without an entry
    its reader needs was only the entry's name."""
    from transformers import T5Config, T5ForConditionalGeneration

    model_dir, tok, _ = tiny_model_dir(tmp_path / "llama", layers=1)
    t5 = tmp_path / "t5"
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                        d_kv=16)).save_pretrained(t5)
    tok.save_pretrained(t5)
    args = ("--prompts", prompt_file, "--num-prompts", 1, "--max-new-tokens", 2, "--no-hf-baseline", "--device", "cpu")
    assert_clean_error(invoke("bench", "--model", t5, *args), "T5Config has no causal language model",
                       "decoder-only")
    generation = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": "two"}))
    assert_clean_error(invoke("bench", "--model", model_dir, "--drafter", "random", *args),
                       "generation_config.json has eos_token_id 'two'; it takes a token id")
    # A tokenizer.json without its entries was "cannot load model ...: 'added_tokens'".
    (model_dir / "tokenizer.json").write_text("{}")
    assert_clean_error(invoke("bench", "--model", model_dir, "--drafter", "random", *args),
                       "lacks the entry 'added_tokens': damaged or hand-edited?")


MISTRAL = {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}


@pytest.mark.parametrize("edit,fragment", [
    ({**MISTRAL, "sliding_window": "8"}, "its config.json is invalid: Validation error for field 'sliding_window'"),
    ({**MISTRAL, "sliding_window": -1}, "has sliding_window -1; a window is a positive number"),
    ({"layer_types": ["chunked_attention"]}, "fails its first forward pass: AttributeError"),
    # A config.json of another model size: transformers gave the missing or misshapen weights random values.
    ({"num_hidden_layers": 2}, "its weights lack 9 tensor(s) that its config.json asks for (model.layers.1."),
    ({"hidden_size": 64}, "makes it [49152, 64] (12 weight(s) differ): the config.json is not that of these weights"),
    ({"max_position_embeddings": -5}, "has max_position_embeddings -5; a context holds at least 2 positions"),
])
def test_a_model_config_the_model_cannot_run_is_one_line(tmp_path, prompt_file, edit, fragment):
    """config.json values that transformers rejects, that its code cannot run, or that would mask every
    key (a negative sliding window) are a one-line load error (exit 2), not a bug report or empty text."""
    model_dir, _, _ = tiny_model_dir(tmp_path / "llama", layers=1)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, **edit}))
    assert_clean_error(invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file,
                              "--num-prompts", 1, "--max-new-tokens", 2, "--no-hf-baseline", "--device", "cpu"),
                       fragment)


@pytest.mark.parametrize("layers,edit,fragment", [
    (2, {"num_hidden_layers": 1}, "its weights hold 9 tensor(s) that its config.json has no place for (model.layers.1."),
    (1, {"attention_bias": False}, "has no place for (model.layers.0.self_attn.k_proj.bias, ...)"),
])
def test_weights_the_config_has_no_place_for_are_one_line(tmp_path, prompt_file, layers, edit, fragment):
    """Weights of a layer past the config's count, or a bias the config turns off, were dropped silently:
    transformers loaded a different model than the checkpoint (fewer layers, no attention biases)."""
    model_dir, _, _ = tiny_model_dir(tmp_path / "llama", layers=layers)
    cfg = json.loads((model_dir / "config.json").read_text())
    if "attention_bias" in edit:  # save the model with biases, then a config.json without them
        from transformers import LlamaConfig, LlamaForCausalLM
        LlamaForCausalLM(LlamaConfig(**{**cfg, "attention_bias": True})).save_pretrained(model_dir)
    (model_dir / "config.json").write_text(json.dumps({**cfg, **edit}))
    assert_clean_error(invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file,
                              "--num-prompts", 1, "--max-new-tokens", 2, "--no-hf-baseline", "--device", "cpu"),
                       fragment)


def test_outputs_never_overwrite_inputs_or_each_other(tmp_path, prompt_file):
    before = prompt_file.read_text()
    assert_clean_error(invoke("bench", "--prompts", prompt_file, "--json", prompt_file), "--prompts and --json both name")
    assert prompt_file.read_text() == before
    same = tmp_path / "same.out"
    assert_clean_error(invoke("sweep", "--beam-widths", 1, "--beam-lengths", 2, "--json", same, "--csv", same),
                       "--json and --csv both name")
    drafter = tmp_path / "drafter"
    Drafter.for_target(tiny_llama(), seed=0).save(drafter)
    assert_clean_error(invoke("bench", "--model", drafter), "is a redraft drafter", "--drafter")
    # A report never replaces a file of the drafter or model it reads (sweep --save-best would lose both).
    config = (drafter / "config.json").read_text()
    assert_clean_error(invoke("bench", "--drafter", drafter, "--json", drafter / "config.json"),
                       "file of the --drafter folder")
    assert_clean_error(invoke("sweep", "--drafter", drafter, "--save-best", "--csv", drafter / "model.safetensors"),
                       "--csv", "file of the --drafter folder")
    assert (drafter / "config.json").read_text() == config
    assert_clean_error(invoke("bench", "--model", tmp_path, "--json", drafter / "config.json"), "file of the --model folder")
    assert_clean_error(invoke("bench", "--json", ""), "--json needs a file path")
    # Nor a file of the package's data, such as the built-in prompts a run without --prompts reads.
    from pathlib import Path

    import redraft_cli
    builtin = Path(redraft_cli.__file__).parent / "data" / "bench_prompts.jsonl"
    shipped = builtin.read_bytes()
    assert_clean_error(invoke("bench", "--drafter", "random", "--json", builtin), "file of the built-in data folder")
    assert_clean_error(invoke("sweep", "--drafter", "random", "--beam-widths", 1, "--beam-lengths", 2, "--csv", builtin),
                       "file of the built-in data folder")
    assert builtin.read_bytes() == shipped
    linked = tmp_path / "linked.json"
    linked.hardlink_to(prompt_file)
    assert_clean_error(invoke("bench", "--json", linked), "is a hard link")
    assert_clean_error(invoke("bench", "--drafter", ""), "--drafter needs a folder")
    assert_clean_error(invoke("bench", "--drafter", drafter / "config.json"), "is a file; pass the drafter's folder")
    assert_clean_error(invoke("bench", "--model", drafter / "config.json"), "is a file; pass the model's folder")


def test_one_token_answers_say_the_speedup_means_little(prompt_file, tmp_path):
    """No draft step: the ratios over steps are undefined, so the JSON has null and the table '-', never 0."""
    report = tmp_path / "r.json"
    r = invoke("bench", "--prompts", prompt_file, "--num-prompts", 1, "--max-new-tokens", 1, "--no-hf-baseline",
               "--no-warmup", "--json", report)
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "took no draft step" in text, r.output
    assert "tokens/step - | acceptance - | tree nodes - | split draft - / verify - / accept - | per step -" in text
    red = json.loads(report.read_text())["redraft"]
    assert red["steps"] == 0 and red["tokens"] == 1
    for key in ("tokens_per_step", "acceptance_rate", "mean_tree_nodes", "draft_share", "verify_share", "accept_share"):
        assert red[key] is None, (key, red)
    assert json.loads(report.read_text())["per_prompt"][0]["tokens_per_step"] is None


def test_a_truncated_gguf_is_named_as_such(tmp_path):
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF\n")
    assert_clean_error(invoke("bench", "--model", fake), "not a valid GGUF file")


def test_save_best_into_the_shipped_drafter_says_so(tmp_path, prompt_file, monkeypatch):
    import shutil

    import redraft_cli.cli.sweep as sweep_cli
    from redraft_cli.shipped import shipped_drafter_dir

    copy = tmp_path / "shipped-copy"
    shutil.copytree(shipped_drafter_dir("smollm2-135m"), copy)
    monkeypatch.setattr(sweep_cli, "shipped_drafter_dir", lambda name: copy)  # stands in for the package's folder
    r = invoke("sweep", "--drafter", copy, "--beam-widths", 1, "--beam-lengths", 2, "--prompts", prompt_file,
               "--num-prompts", 1, "--max-new-tokens", 4, "--no-warmup", "--save-best")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "writes into the drafter shipped with redraft" in text and "its shipped shape is 4x4 best 7 nodes" in text


def test_a_failed_result_write_names_the_file(tmp_path, prompt_file):
    from pathlib import Path

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny", layers=1)
    r = invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 1,
               "--max-new-tokens", 4, "--no-hf-baseline", "--no-warmup", "--json", "/dev/full", "--device-map", "auto")
    assert r.exit_code == 2 and "No space left on device: /dev/full" in r.output, r.output
    if not torch.cuda.is_available():
        assert "no CUDA GPU here" in r.output


def test_answer_cut_by_the_context_is_noted(tmp_path):
    """A prompt that fits but leaves less room than --max-new-tokens runs, says so, and stops at the context."""
    model_dir, tok, cfg = tiny_model_dir(tmp_path / "tiny-ctx", layers=1)  # 512-token context
    prompt = tmp_path / "near-full.txt"
    prompt.write_text(" ".join(["word"] * 500) + "\n")
    n = len(tok(" ".join(["word"] * 500))["input_ids"])
    assert n + 32 > 512 > n
    out = tmp_path / "r.json"
    r = invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt, "--no-chat-template",
               "--max-new-tokens", 32, "--no-hf-baseline", "--no-warmup", "--json", out)
    assert r.exit_code == 0, r.output
    assert "note: 1 prompt(s)" in r.output and "context" in r.output
    data = json.loads(out.read_text())
    assert data["baseline"]["tokens"] == data["redraft"]["tokens"] <= 512 - n


def test_device_map_spreads_a_checkpoint_with_accelerate(tmp_path, prompt_file, monkeypatch):
    """--device-map loads through accelerate's placement (every layer on the CPU here: no GPU) and
    decodes with identical greedy output; impossible combinations are clear errors."""
    import redraft_cli.loading as target_module
    from redraft_cli.loading import TargetSpec, load_target

    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny-mapped", layers=2)
    seen = []
    load = target_module._load_hf_files
    monkeypatch.setattr(target_module, "_load_hf_files", lambda *a, **k: seen.append(a[1]) or load(*a, **k))
    target = load_target(TargetSpec(model=str(model_dir), device_map="auto"))
    assert seen[0]["device_map"] == "auto" and target.devices == ["cpu"]
    monkeypatch.undo()
    out = tmp_path / "r.json"
    ok = invoke("bench", "--model", model_dir, "--device-map", "auto", "--drafter", "random", "--prompts", prompt_file,
                "--num-prompts", 2, "--max-new-tokens", 6, "--no-hf-baseline", "--json", out)
    assert ok.exit_code == 0, ok.output
    assert json.loads(out.read_text())["identical_outputs"] == 2
    assert_clean_error(invoke("chat", "--device-map", "everywhere", "--prompt", "hi"), "--device-map must be one of")
    assert_clean_error(invoke("chat", "--device-map", "auto", "--device", "cpu", "--prompt", "hi"),
                       "cannot be combined with --device cpu")


def documented_commands() -> list[str]:
    """Every `redraft ...` command the README and docs/ show: `$ redraft` lines of examples (with their
    `\\` continuations) and inline `redraft ...` spans, less usage synopses and placeholders (N, FILE)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    found = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = doc.read_text()
        text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
        found += [m.group(1) for m in re.finditer(r"^\$ (redraft [^\n#]*)", text, re.M)]
        found += [m.group(1) for m in re.finditer(r"`(redraft (?:bench|chat|distill|sweep)[^`]*)`", text)]
    placeholder = re.compile(r"^[A-Z][A-Z_.]*$|\.\.\.|^\[|\|")
    commands = {" ".join(c.split()) for c in found if not any(placeholder.search(w) for w in c.split())}
    return sorted(c for c in commands if len(c.split()) > 2)  # a bare `redraft bench` names the command


def test_documented_commands_parse():
    """Each documented command line names a real subcommand with options it has and values of their
    types: documentation that drifted from the CLI fails here (parsed only, nothing runs)."""
    import shlex

    import typer

    cli = typer.main.get_command(app)
    commands = documented_commands()
    assert len(commands) > 10, commands
    for line in commands:
        name, *args = shlex.split(line)[1:]
        assert name in cli.commands, line
        try:
            cli.commands[name].make_context(name, list(args))
        except Exception as exc:  # typer vendors click: its UsageError is not click's
            message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
            raise AssertionError(f"{line!r}: {message}") from None


def test_usage_errors_are_one_line_from_the_command_line():
    """The installed command (app.main): an unknown option or command, or a value of the wrong type, is one
    line naming the command's --help and exit code 2, not Click's boxed usage text."""
    import subprocess
    import sys

    for args, expected in ((["bench", "--foo"], "No such option: --foo"),
                           (["nosuch"], "No such command 'nosuch'"),
                           (["sweep", "--num-prompts", "abc"], "Invalid value for '--num-prompts'"),
                           (["bench", "--datastore"], "Option '--datastore' requires an argument (see 'redraft bench "
                                                      "--help')"),
                           # (python -m redraft_cli is named as the command it runs: redraft)
                           (["chat", "--no-draft", "true"], "unexpected extra argument(s) (true); --no-draft is a "
                                                            "switch: it takes no value (see 'redraft chat --help')"),
                           (["bench", ""], "unexpected extra argument(s) ('', an empty one)"),
                           (["chat", "--json", "out.json", "-p", "hi"], "chat's --json is a switch: the answer's JSON "
                                                                        "goes to standard output, > FILE saves it")):
        run = subprocess.run([sys.executable, "-m", "redraft_cli", *args], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], run.stderr
        assert "--help" in lines[0] and "Traceback" not in run.stderr
    version = subprocess.run([sys.executable, "-m", "redraft_cli", "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("redraft ")


def test_only_a_damaged_cached_conversion_is_converted_again(tmp_path):
    """The embedded default's cached conversion is deleted and rebuilt only when its files are unreadable,
    not when loading failed for another reason (an import cut short by Ctrl-C)."""
    import torch
    from safetensors.torch import save_file

    from redraft_cli.loading import CONVERSION_LIST, _damaged_conversion

    d = tmp_path / "conv"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    (d / "chat_template.jinja").write_text("{{ messages }}")
    save_file({"w": torch.zeros(64)}, str(d / "model.safetensors"))
    listed = json.dumps({"files": ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json"]})
    (d / CONVERSION_LIST).write_text(listed)
    assert not _damaged_conversion(d)
    whole = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(whole[:-40])
    assert _damaged_conversion(d)
    (d / "model.safetensors").write_bytes(whole)
    (d / "tokenizer.json").write_text('{"version": ')
    assert _damaged_conversion(d)
    (d / "tokenizer.json").write_text('{"version": "1.0"}')
    # Battery 15: a deleted chat template read as a model without one ("give it one (--chat-template)"),
    # and a config value of the wrong type failed every load without a word about the cache.
    (d / "chat_template.jinja").unlink()
    assert _damaged_conversion(d)
    (d / "chat_template.jinja").write_text("{{ messages }}")
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": "64"}')
    assert _damaged_conversion(d)
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}')
    (d / CONVERSION_LIST).unlink()  # (a conversion by an older redraft, or one cut short: converted again)
    assert _damaged_conversion(d)


def test_processes_converting_the_embedded_default_at_once_convert_it_once(tmp_path, monkeypatch):
    """On a fresh cache, processes that load the embedded default together (an accelerate launch)
    wait for one conversion instead of replacing each other's folder while another reads it; a
    damaged folder is converted again, a whole one is not."""
    import threading
    import time

    from redraft_cli import loading as target_mod

    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path))
    calls = []

    def slow_convert(alias, out):
        calls.append(alias)
        time.sleep(0.5)
        tmp = out.with_name(out.name + f".tmp{len(calls)}")
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(f'{{"conversion": {len(calls)}}}')
        (tmp / "tokenizer.json").write_text("{}")
        (tmp / "model.safetensors").write_bytes(b"not read here")
        (tmp / target_mod.CONVERSION_LIST).write_text('{"files": ["config.json", "model.safetensors"]}')
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)

    monkeypatch.setattr(target_mod, "_convert_into", slow_convert)
    got = []
    threads = [threading.Thread(target=lambda: got.append(target_mod._convert_embedded("smollm2-135m"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = tmp_path / "models" / "smollm2-135m"
    assert calls == ["smollm2-135m"] and got == [out] * 3
    # Its model file is unreadable (as written here): a load that failed converts it again, once.
    assert target_mod._convert_embedded("smollm2-135m", damaged=True) == out and len(calls) == 2
    monkeypatch.setattr(target_mod, "_damaged_conversion", lambda d: False)
    assert target_mod._convert_embedded("smollm2-135m", damaged=True) == out and len(calls) == 2


def test_the_gguf_readers_bar_is_drawn_on_terminals_only():
    """transformers' GGUF reader has its own tqdm bar, which hub settings leave on: a log file (a stream
    that is not a terminal) gets no bar frames, a terminal keeps the bar of the ~20 s conversion."""
    import io

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    import redraft_cli.loading as target_mod

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    target_mod._gguf_bar_on_terminals_only()
    target_mod._gguf_bar_on_terminals_only()  # once is enough: not wrapped twice
    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        for _ in gguf_utils.tqdm(range(3), desc="Converting", file=stream):
            pass
    assert log.getvalue() == "" and "Converting" in terminal.getvalue()
    assert gguf_utils.tqdm.func is not gguf_utils.tqdm and "partial" not in repr(gguf_utils.tqdm.func)


def test_outputs_never_overwrite_the_chat_template_or_block_on_a_pipe(tmp_path, prompt_file):
    """--json / --csv naming the --chat-template file are refused; a named pipe nobody reads is refused
    at once instead of blocking; a --nodes value of one's own is not blamed on the drafter."""
    import os

    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny", layers=1)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    common = ["--model", model_dir, "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 1,
              "--max-new-tokens", 4, "--no-hf-baseline", "--no-warmup", "--chat-template", template]
    r = invoke("bench", *common, "--json", template)
    assert r.exit_code == 2 and "--chat-template and --json both name" in r.output, r.output
    r = invoke("sweep", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 1,
               "--max-new-tokens", 4, "--no-warmup", "--chat-template", template, "--beam-widths", 1,
               "--beam-lengths", 2, "--csv", template)
    assert r.exit_code == 2 and "--chat-template and --csv both name" in r.output, r.output
    assert template.read_text().startswith("{% for")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    r = invoke("bench", *common, "--json", fifo)
    assert r.exit_code == 2 and "named pipe that no process reads" in r.output, r.output
    r = invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file, "--num-prompts", 1,
               "--max-new-tokens", 4, "--beam-width", 2, "--beam-length", 2, "--nodes", 100)
    assert r.exit_code == 2 and "config.json recommends" not in r.output, r.output


def test_the_slower_note_advises_the_batch_that_ran(tmp_path, prompt_file, monkeypatch):
    """--batch-size above the prompts runs as many rows as prompts: the note's advice (`sweep --batch-size B
    --save-best`, which needs B prompts) names that, not the size asked for."""
    import redraft_cli.cli.bench as bench_cli

    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny", layers=1)
    seen = []
    monkeypatch.setattr(bench_cli, "slower_note", lambda *a, **k: seen.append(a[2]))
    out = tmp_path / "r.json"
    r = invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file, "--max-new-tokens", 4,
               "--no-hf-baseline", "--no-warmup", "--batch-size", 64, "--json", out)
    assert r.exit_code == 0 and seen == [2], (r.output, seen)
    # ... and so do the note, the table's title and the report (they said 64 where 2 rows ran)
    assert "--batch-size 64 with 2 prompts: batches of 2" in r.output and "| batch 2" in r.output, r.output
    assert json.loads(out.read_text())["batch_size"] == 2


def test_a_quantized_model_that_fails_its_first_pass_does_not_blame_only_its_config(tmp_path, prompt_file):
    """bitsandbytes 4-bit cannot run a 32-wide toy model: the message says the quantization may be why."""
    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny", layers=1)
    assert_clean_error(invoke("bench", "--model", model_dir, "--quantize", "4bit", "--drafter", "random",
                              "--prompts", prompt_file, "--num-prompts", 1, "--max-new-tokens", 4),
                       "fails its first forward pass", "load it unquantized")


def test_a_ctrl_c_after_the_command_finished_exits_with_its_code(tmp_path):
    """A Ctrl-C while Python shuts down after a finished command (atexit callbacks) printed "Exception
    ignored in atexit callback ... KeyboardInterrupt" and ended with -2; now it exits with the command's
    own code and no traceback."""
    import subprocess
    import sys

    script = ("import atexit, os, signal, sys, time\n"
              "import redraft_cli.cli.app as app\n"
              "def run(): print('done', flush=True); sys.exit(0)\n"
              "app.main = run\n"
              "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGINT), time.sleep(1)))\n"
              "from redraft_cli.entry import main\n"
              "main()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "done", (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr


def test_prompts_from_stdin_and_json_to_stdout(tmp_path):
    """`--prompts -` reads standard input; `--json -` makes standard output the JSON report alone, with
    the table on standard error (`... --json - | jq`), and the next command prints to stdout again."""
    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny-stdin", layers=1)
    args = ["bench", "--model", str(model_dir), "--drafter", "random", "--prompts", "-", "--max-new-tokens", "4",
            "--no-hf-baseline", "--no-warmup"]
    result = runner.invoke(app, [*args, "--json", "-"], input="Name three colours.\nWhat is 2 + 2?\n")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)  # nothing else on stdout
    assert data["num_prompts"] == 2 and data["redraft"]["tokens"] == 8
    assert "ReDrafter" in result.stderr and "wrote" not in result.output
    again = runner.invoke(app, args, input='{"prompt": "Say hi."}\n')
    assert again.exit_code == 0 and "ReDrafter" in again.stdout, again.output
    assert "1 prompt x 4 tokens" in " ".join(again.stdout.split())
    assert_clean_error(runner.invoke(app, args, input=""), "<stdin> holds no prompts")
    for_distill = runner.invoke(app, ["distill", str(model_dir), "--data", "-", "--out", str(tmp_path / "d")], input="x\n")
    assert_clean_error(for_distill, "standard input", "save the prompts to a file")


def test_a_ctrl_c_while_loading_is_interrupted_whatever_error_it_became(tmp_path, monkeypatch):
    """A Ctrl-C while torch, transformers or accelerate import lazily can surface as an ImportError
    ("cannot load module more than once"), a load error naming a circular import, or nothing at all.
    The entry point remembers it until the models have loaded, and the command says "interrupted"."""
    import signal

    import redraft_cli.entry as entry

    monkeypatch.setattr(entry, "_interrupted_at_startup", True)
    # A load error after the Ctrl-C: "interrupted", 130, not "cannot load model".
    r = invoke("bench", "--model", tmp_path / "no-such-model", "--drafter", "random", "--num-prompts", 1)
    assert_clean_error(r, "interrupted", code=130)
    assert "no-such-model" not in r.output
    # A Ctrl-C that a library swallowed: the command stops once the models have loaded.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (what a fresh process has)
    try:
        entry._remember_startup_sigint()
        assert signal.getsignal(signal.SIGINT) is entry._startup_sigint
        with pytest.raises(KeyboardInterrupt):
            entry.startup_done()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # later ones reach the command
        monkeypatch.setattr(entry, "_interrupted_at_startup", False)
        entry.startup_done()  # nothing pending: returns
        with pytest.raises(KeyboardInterrupt):
            entry._startup_sigint(signal.SIGINT, None)
        assert entry.interrupted_at_startup()
    finally:
        signal.signal(signal.SIGINT, previous)
        entry._interrupted_at_startup = False


def test_a_full_disk_is_one_line_not_a_bug(monkeypatch, capsys):
    """safetensors reports a full disk as its own SafetensorError: not "a bug in redraft", and an error
    no check foresaw is still one line naming REDRAFT_DEBUG."""
    import sys

    from safetensors import SafetensorError

    import redraft_cli.cli.bench as bench_cli
    from redraft_cli.cli.app import main

    def fails(*a, **k):
        raise failure

    monkeypatch.setattr(bench_cli, "load_models", fails)
    monkeypatch.setattr(sys, "argv", ["redraft", "bench", "--num-prompts", "1"])
    for failure, code, said in ((SafetensorError("Error while serializing: No space left on device (os error 28)"),
                                 2, "no space left on device"),
                                (ZeroDivisionError("division by zero"), 1, "a bug in redraft; REDRAFT_DEBUG=1")):
        with pytest.raises(SystemExit) as exit_:
            main()
        err = capsys.readouterr().err
        assert exit_.value.code == code and said in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err


def test_the_cached_conversion_of_the_default_finds_its_shipped_drafter(tmp_path, monkeypatch):
    """`--model ~/.cache/redraft/models/smollm2-135m` (the default's converted folder) is the default model:
    `--drafter auto` takes its shipped drafter, not an untrained one."""
    from redraft_cli.cli.common import converted_alias
    from redraft_cli.shipped import shipped_drafter_dir

    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    assert converted_alias(str(folder)) == "smollm2-135m" and shipped_drafter_dir(converted_alias(str(folder)))
    assert converted_alias(str(tmp_path / "smollm2-135m")) is None  # a folder of that name elsewhere: not it
    assert converted_alias("smollm2-135m") is None and converted_alias("Qwen/Qwen2.5-7B") is None


def test_restating_the_recommended_shape_keeps_its_node_budget(tiny_target):
    """-w 4 -l 4 with a drafter that recommends 4x4 best 7 runs 4x4 best 7, as plain bench does; another
    shape verifies every beam unless --nodes says otherwise."""
    from dataclasses import replace

    from redraft_cli.cli.common import with_drafter_shape
    from redraft_cli.decode import DecodeConfig

    d = Drafter.for_target(tiny_target, seed=0)
    d.config = replace(d.config, beam_width=4, beam_length=4, tree_nodes=7)
    base = DecodeConfig(max_new_tokens=8)
    for w, length, nodes, want in ((None, None, None, 7), (4, 4, None, 7), (4, None, None, 7), (None, 4, None, 7),
                                   (4, 5, None, 0), (2, None, None, 0), (4, 4, 0, 0), (4, 5, 3, 3)):
        got = with_drafter_shape(base, d, w, length, nodes=nodes)
        assert got.tree_nodes == want, (w, length, nodes, got)


def test_a_drafter_distilled_with_a_template_brings_it_to_a_model_with_its_own(tmp_path, prompt_file):
    """distill --chat-template vicuna on a model that has a template of its own: its data was rendered as
    Vicuna, so bench and chat render prompts so too (noted), not silently with the model's own."""
    from redraft_cli.cli.common import load_models
    from redraft_cli.loading import TargetSpec, load_target

    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny", layers=1)
    own = load_target(TargetSpec(str(model_dir)))
    assert own.tokenizer.chat_template
    drafter_dir = tmp_path / "vicuna-drafter"
    Drafter.for_target(own, seed=0).save(drafter_dir)
    (drafter_dir / "recipe.yaml").write_text("target:\n  model: x\n  chat_template: vicuna\n")
    r = invoke("bench", "--model", model_dir, "--drafter", drafter_dir, "--prompts", prompt_file, "--num-prompts", 1,
               "--max-new-tokens", 4, "--no-hf-baseline", "--no-warmup")
    assert r.exit_code == 0 and "distilled with (vicuna), not" in " ".join(r.output.split()), r.output
    loaded = load_models(str(model_dir), str(drafter_dir), "auto", "cpu", "none", 0)
    assert loaded.target.tokenizer.decode(loaded.target.encode_chat("Hi.")).endswith("USER: Hi. ASSISTANT:")
    # --chat-template overrides it; a recipe that names no template leaves the model's own
    loaded = load_models(str(model_dir), str(drafter_dir), "auto", "cpu", "none", 0, chat_template="vicuna")
    (drafter_dir / "recipe.yaml").write_text("target:\n  model: x\n")
    loaded = load_models(str(model_dir), str(drafter_dir), "auto", "cpu", "none", 0)
    assert loaded.target.tokenizer.chat_template == own.tokenizer.chat_template


def test_a_beam_longer_than_the_drafter_learned_is_noted(tmp_path, prompt_file):
    """predict_tokens is what distill trained; a longer --beam-length (bench, chat) or --beam-lengths (sweep)
    drafts past it, which is allowed (the target checks every draft) but noted once; the trained depth is not."""
    from dataclasses import replace as dc_replace

    model_dir, _, cfg = tiny_model_dir(tmp_path / "tiny", layers=1)
    d = Drafter.for_target(tiny_llama(vocab_size=cfg.vocab_size, hidden_size=32), seed=0)
    d.config = dc_replace(d.config, predict_tokens=2)
    d.save(tmp_path / "d")
    common = ("--model", model_dir, "--drafter", tmp_path / "d", "--prompts", prompt_file, "--max-new-tokens", 4)
    past = "drafts 3 tokens a beam, but this drafter learned to predict 2 (a beam length of 3"
    r = invoke("bench", *common, "--num-prompts", 1, "--no-hf-baseline", "--no-warmup", "-l", 4)
    assert r.exit_code == 0 and f"--beam-length 4 {past}" in " ".join(r.output.split()), r.output
    r = invoke("bench", *common, "--num-prompts", 1, "--no-hf-baseline", "--no-warmup", "-l", 3)
    assert r.exit_code == 0 and "learned to predict" not in r.output, r.output
    r = invoke("sweep", *common, "--num-prompts", 1, "--no-warmup", "--beam-widths", 1, "--beam-lengths", "2,4")
    assert r.exit_code == 0 and "--beam-lengths up to 4 draft up to 3 tokens a beam" in " ".join(r.output.split())
    r = runner.invoke(app, ["chat", *map(str, common[:4]), "--max-new-tokens", "2", "-l", "4"], input="Hi\n")
    assert r.exit_code == 0 and f"--beam-length 4 {past}" in " ".join(r.output.split()), r.output
    r = invoke("bench", "--model", model_dir, "--drafter", "random", "--prompts", prompt_file, "--max-new-tokens", 4,
               "--num-prompts", 1, "--no-hf-baseline", "--no-warmup", "-l", 8)
    assert r.exit_code == 0 and "learned to predict" not in r.output, r.output  # an untrained drafter learned nothing
