"""`redraft distill` through the CLI: a tiny local target end to end, resume rules, offline errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_chat_llama
from redraft_cli.cli.app import app
from redraft_cli.distill.recipe import load_recipe
from redraft_cli.drafter import Drafter
from redraft_cli.errors import BadInputError

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    target = tiny_chat_llama(seed=4)
    model_dir = root / "tiny-model"
    target.model.save_pretrained(model_dir)
    target.tokenizer.save_pretrained(model_dir)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me fact number {i} about the sea." for i in range(10)) + "\n")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""
name: tiny
target: {{model: {model_dir}, dtype: float32}}
data: {{source: {prompts}, held_out: 2, max_new_tokens: 6, gen_batch_size: 4, shard_size: 4}}
drafter: {{head: tied, num_layers: 1, predict_tokens: 2}}
train: {{batch_size: 4, eval_every: 2, save_every: 1, positions_per_sequence: 4}}
eval: {{bench_prompts: 1, bench_max_new_tokens: 4}}
beam: {{width: 2, length: 3, datastore: 1, lookup_length: 4}}
""")
    return root, recipe


def test_distill_tiny_recipe_and_resume_rules(tiny_recipe, monkeypatch):
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache"))
    out = root / "out"
    report = root / "report.json"
    first = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "2", "--json", str(report)])
    assert first.exit_code == 0, first.output
    assert "drafter written to" in first.output
    # No terminal: log lines, not the bars' last frame squeezed into the log ("training ━━ 5… 0… 0… loss").
    assert not [line for line in first.output.splitlines() if "━" in line and "┃" not in line and "┏" not in line
                and "┡" not in line and "└" not in line and "┗" not in line], first.output
    metrics = json.loads(report.read_text())
    assert metrics["steps"] == 2 and metrics["bench"]["identical_outputs"] == 1
    assert metrics["bench"]["datastore_beams"] == 1
    assert (metrics["bench"]["system"], metrics["bench"]["prompt_systems"]) == (None, 0)  # (as bench's JSON)
    # The datastore holds the 8 training conversations' answers, not the 2 held out.
    drafter = Drafter.load(out)
    assert drafter.config.datastore_beams == 1 and drafter.datastore.answers == 8
    again = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "2"])
    assert again.exit_code == 2 and "--resume" in again.output and "Traceback" not in again.output
    more = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "3", "--resume", "--no-bench"])
    assert more.exit_code == 0, more.output
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
    # Resuming with another shape names the difference; resuming past --max-steps says there is nothing to do.
    other = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "4", "--resume",
                                "--num-layers", "2", "--no-bench"])
    assert other.exit_code == 2 and "num_draft_layers 1 (this run: 2)" in " ".join(other.output.split())
    done = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "2", "--resume", "--no-bench"])
    assert done.exit_code == 0 and "nothing left to train" in " ".join(done.output.split()), done.output
    assert "resuming training at step 3 of 2" not in " ".join(done.output.split()), done.output
    ok = runner.invoke(app, ["bench", "--model", str(root / "tiny-model"), "--drafter", str(out), "--prompts",
                             str(root / "prompts.txt"), "--num-prompts", "1", "--max-new-tokens", "4", "--no-hf-baseline"])
    assert ok.exit_code == 0, ok.output
    # --resume where nothing was saved yet starts a new run, and says so.
    fresh = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "fresh"), "--max-steps", "1", "--resume",
                                "--no-bench"])
    assert fresh.exit_code == 0, fresh.output
    assert "holds no checkpoint" in " ".join(fresh.output.split())
    # Too few prompts for the held-out slice: an error before the model loads.
    few = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "few"), "--num-prompts", "2"])
    assert few.exit_code == 2 and "nothing left to train on" in few.output and "loading target" not in few.output
    none = runner.invoke(app, ["bench", "--model", str(root / "tiny-model"), "--drafter", "random", "--datastore", "1",
                               "--prompts", str(root / "prompts.txt"), "--num-prompts", "1", "--max-new-tokens", "4"])
    assert none.exit_code == 2 and "--datastore needs a drafter saved with a datastore" in none.output
    assert "Traceback" not in none.output


def test_distill_refuses_to_overwrite_a_folder_of_other_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "config"}')
    result = runner.invoke(app, ["distill", "smollm2-135m", "--max-steps", "1", "--out", str(mine)])
    assert result.exit_code == 2 and "already holds files" in result.output, result.output
    assert (mine / "config.json").read_text() == '{"my": "config"}'


def test_a_folder_left_with_only_the_recipe_by_a_failed_run_can_be_retried(tmp_path):
    """A run that stopped before training leaves recipe.yaml alone; the retry may use the folder."""
    from redraft_cli.distill.pipeline import distill

    from redraft_cli.distill.pipeline import RECIPE_HEADER

    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text(RECIPE_HEADER + "name: earlier\n")
    recipe = load_recipe("smollm2-135m")
    recipe.data.source = str(tmp_path / "missing.jsonl")
    with pytest.raises(BadInputError) as info:
        distill(recipe, out, target=object(), data_dir=tmp_path / "data", bench=False)
    assert "already holds files" not in str(info.value)  # it failed later, on the missing prompt file


def test_a_users_own_recipe_in_out_is_not_replaced(tmp_path):
    """`redraft distill out/recipe.yaml --out out`: the run would write its recipe.yaml over the user's."""
    own = "# my notes\ntarget: {model: smollm2-135m}\ntrain: {max_steps: 1}\n"
    out = tmp_path / "out"
    out.mkdir()
    (out / "recipe.yaml").write_text(own)
    result = runner.invoke(app, ["distill", str(out / "recipe.yaml"), "--out", str(out)])
    assert result.exit_code == 2 and "a recipe redraft did not write" in " ".join(result.output.split()), result.output
    assert (out / "recipe.yaml").read_text() == own


def test_distill_offline_data_set_is_named(monkeypatch, tmp_path):
    import redraft_cli.distill.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_hub_reachable", lambda: False)
    result = runner.invoke(app, ["distill", "smollm2-135m", "--data", "hf://foo/bar/x.json", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "the data set foo/bar/x.json" in text and "is not a recipe" not in text


def test_a_recipe_whose_model_path_is_missing_says_so(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\ntarget: {{model: {tmp_path / 'nope.gguf'}}}\n")
    result = runner.invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "target model path not found" in result.output, result.output
    assert "network" not in result.output


def test_distill_offline_names_what_it_needs(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["distill", "vicuna-7b", "--out", str(tmp_path / "v")])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "lmsys/vicuna-7b-v1.3" in text and "ShareGPT" in text and "Traceback" not in text
    assert "the model's directory as target.model in a copy of the recipe" in text and "--data FILE" in text
    # Given local data, only the model is asked for; given a model id, no recipe copy is.
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    text = " ".join(runner.invoke(app, ["distill", "vicuna-7b", "--data", str(prompts)]).output.split())
    assert "lmsys/vicuna-7b-v1.3" in text and "--data" not in text and "ShareGPT" not in text, text
    text = " ".join(runner.invoke(app, ["distill", "some-org/some-model", "--data", str(prompts)]).output.split())
    assert text.endswith("or pass the model's directory"), text


def test_a_prompt_file_given_as_the_recipe_is_named_and_leaves_no_folder(tmp_path, monkeypatch):
    """`distill p.jsonl` (the data where the recipe or model goes): one line that points at --data, and
    no drafters/ folder left in the working directory by a run that failed before its work."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    result = runner.invoke(app, ["distill", "p.jsonl"])
    assert result.exit_code == 2 and "--data p.jsonl" in " ".join(result.output.split()), result.output
    (tmp_path / "empty-model").mkdir()
    result = runner.invoke(app, ["distill", "empty-model"])  # a folder that is no model fails at load
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-model", "p.jsonl"]
    assert not any((tmp_path / "empty-model").iterdir())


def test_a_peer_process_lost_in_a_launch_names_the_checkpoint(tmp_path, monkeypatch):
    """Under accelerate launch, rank 0 sees a killed peer as a gloo/NCCL error: one line saying so and
    pointing at --resume of the last checkpoint, not a bug line; rank 0's own errors stay its own."""
    import torch.distributed as dist

    import redraft_cli.cli.distill as distill_cli

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(distill_cli, "launched_rank", lambda: 0)
    (tmp_path / "o" / "checkpoint").mkdir(parents=True)

    def lost(*a, **k):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1234: "
                           "Connection reset by peer\nmore")

    monkeypatch.setattr(distill_cli, "run_distill", lost)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["distill", "smollm2-135m", "--out", str(tmp_path / "o")])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "another process of the launch stopped" in text, result.output
    assert "[../third_party/gloo/gloo/transport/tcp/pair.cc:537]" in text and "--resume" in text, text

    def own(*a, **k):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(distill_cli, "run_distill", own)
    result = runner.invoke(app, ["distill", "smollm2-135m", "--out", str(tmp_path / "o")])
    assert "another process" not in result.output and "mat1 and mat2" in str(result.exception), result.output


@pytest.mark.parametrize("args,fragment", [
    (["no-such-recipe.yaml"], "not found"),
    (["smollm2-135m", "--head", "huge"], "--head"),
    (["smollm2-135m", "--predict-tokens", "0"], "--predict-tokens"),
    (["smollm2-135m", "--predict-tokens", "1000"], "<= 63"),
    (["smollm2-135m", "--num-layers", "20000"], "drafter.num_layers must be a finite number >= 0 and <= 64"),
    (["smollm2-135m", "--sampled-answers", "-1"], "sampled_answers"),
    (["smollm2-135m", "--dropout", "1.5"], "dropout"),
    (["smollm2-135m", "--context-window", "-1"], "--context-window"),
    (["smollm2-135m", "--init-from", "/no/such/drafter"], "--init-from"),
    (["smollm2-135m", "--max-steps", "0"], "train.max_steps must be a finite number >= 1"),
    (["smollm2-135m", "--lr", "nan"], "train.lr"),
    (["smollm2-135m", "--epochs", "0"], "train.epochs must be a finite number > 0"),
    (["smollm2-135m", "--batch-size", "0"], "train.batch_size"),
    (["smollm2-135m", "--num-prompts", "0"], "data.num_prompts"),
    (["smollm2-135m", "--draft-vocab", "-1"], "drafter.draft_vocab_size"),
    (["nosuch-recipe"], "is not a recipe"),
    (["smollm2-135m", "--head", "huge"], "drafter.head (--head) must be own or tied, got 'huge'"),
    (["smollm2-135m", "--chat-template", "no-such-template"], "target.chat_template: unknown chat template"),
])
def test_distill_bad_input(args, fragment, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name that is no recipe would otherwise be looked up on the hub
    result = runner.invoke(app, ["distill", *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "Traceback" not in result.output


def test_a_model_without_a_chat_template_distills_with_chat_template(tiny_recipe, tmp_path, monkeypatch):
    """--chat-template on distill (it took a recipe file): the drafter keeps the template for bench and chat."""
    root, _ = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    bare = tmp_path / "no-template"
    target = tiny_chat_llama(seed=4)
    target.model.save_pretrained(bare)
    target.tokenizer.chat_template = None
    target.tokenizer.save_pretrained(bare)
    run = ["distill", str(bare), "--data", str(root / "prompts.txt"), "--held-out", "2", "--max-new-tokens", "4",
           "--max-steps", "1", "--no-bench", "--dtype", "float32"]
    refused = runner.invoke(app, [*run, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2 and "--chat-template" in refused.output, refused.output
    made = runner.invoke(app, [*run, "--out", str(tmp_path / "d"), "--chat-template", "vicuna"])
    assert made.exit_code == 0, made.output
    assert "chat_template: vicuna" in (tmp_path / "d" / "recipe.yaml").read_text()


def test_a_bad_init_from_drafter_fails_before_any_data(tmp_path, monkeypatch):
    """--init-from's config.json is read before data generation (which can take hours), not after."""
    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad-drafter"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"hidden_size": 576, "vocab_size": 49152,
                                                 "redraft": {"device_shapes": {"gpu": {"beam_width": 2}}}}))
    (bad / "model.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["distill", "smollm2-135m", "--init-from", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "device 'gpu' must be one of cuda, mps" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cache" / "distill-data").exists()


def test_no_generate_trains_on_the_data_so_far(tiny_recipe, monkeypatch):
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-partial"))
    none = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "p0"), "--no-generate"])
    assert none.exit_code == 2 and "no distillation data" in none.output and "Traceback" not in none.output
    # A 1-step run generates only the shards it needs: 8 of the 10 conversations.
    first = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "p1"), "--max-steps", "1", "--no-bench"])
    assert first.exit_code == 0, first.output
    report = root / "p2.json"
    partial = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "p2"), "--max-steps", "3", "--no-generate",
                                  "--no-bench", "--json", str(report)])
    assert partial.exit_code == 0, partial.output
    assert "generated so far (8 of 10" in " ".join(partial.output.split())
    assert json.loads(report.read_text())["data"]["train_conversations"] == 6


def test_an_interrupt_says_what_was_kept_and_where(tmp_path):
    """Ctrl-C's message follows the phase: answers / hidden states are kept in the data cache (the
    same command goes on), a training run's checkpoint in --out (--resume goes on)."""
    from redraft_cli.cli.distill import _DistillView

    view = _DistillView()
    assert "before any work was saved" in view.interrupted(tmp_path)
    (tmp_path / "checkpoint").mkdir()  # a --resume stopped while the model loads: its checkpoint is kept
    assert "the checkpoint in" in view.interrupted(tmp_path) and "--resume" in view.interrupted(tmp_path)
    (tmp_path / "checkpoint").rmdir()
    view.on_event({"event": "hidden_start", "examples": 10, "dir": "/cache/hidden-bfloat16"})
    msg = view.interrupted(tmp_path)
    assert "hidden states" in msg and "/cache/hidden-bfloat16" in msg and "--resume" not in msg
    view.on_event({"event": "start", "total_steps": 50, "step": 8, "examples": 10, "processes": 1})
    view.on_event({"event": "micro", "step": 8, "micro": 1, "grad_accum": 4, "total_steps": 50})  # (inside step 9)
    task = view.progress.tasks[view.tasks["train"]]
    assert task.completed == 8.25 and task.fields["info"] == "step 9: micro-batch 1/4"
    view.progress.stop()
    assert view.interrupted(tmp_path) == (f"interrupted at training step 8; the checkpoint is saved in {tmp_path}: "
                                          f"run the same command with --resume to continue")


def test_without_a_terminal_every_phase_logs_lines(capsys):
    """In a log file the bars do not draw: the held-out bench says it runs and counts its runs."""
    from redraft_cli.cli.distill import _DistillView

    view = _DistillView()
    view.log_lines = True
    view.on_event({"event": "bench_start", "prompts": 2})
    for done in (1, 2):
        view.on_event({"event": "bench", "done": done, "total": 5})
    view.progress.stop()
    lines = " ".join(capsys.readouterr().err.split())
    assert "held-out bench: 2 prompts" in lines and "--no-bench" in lines
    assert "held-out bench: 1/5 runs" in lines and "held-out bench: 2/5 runs" in lines


def test_held_out_from_the_command_line(tiny_recipe, monkeypatch):
    """--held-out overrides the recipe, so a small prompt file distills without writing a recipe."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-held-out"))
    too_many = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "h1"), "--held-out", "10"])
    assert too_many.exit_code == 2 and "held_out is 10" in too_many.output and "--held-out" in too_many.output
    ok = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "h2"), "--held-out", "0", "--max-steps", "1",
                             "--no-bench", "--json", str(root / "h2.json")])
    assert ok.exit_code == 0, ok.output
    report = json.loads((root / "h2.json").read_text())
    assert report["data"]["held_out_conversations"] == 0
    # Battery 19: no held-out agreement to report (it was the negated training loss), and a note says so.
    assert report["best_mean_agreement"] is None
    assert "data.held_out 0: no conversation is held out, so there is no held-out agreement" in " ".join(ok.output.split())
    assert "nan" not in ok.output


def test_a_drafters_system_prompt_goes_with_it(tiny_recipe, monkeypatch):
    """Battery 24: `distill --system` sets data.system, and bench, sweep and chat send that system prompt with
    the drafter by default, as they do its chat template (a note says so; --system overrides it)."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-system"))
    out = root / "with-system"
    made = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--system", "Be terse.", "--max-steps", "1",
                               "--no-bench"])
    assert made.exit_code == 0, made.output
    assert load_recipe(str(out / "recipe.yaml")).data.system == "Be terse."
    model = str(root / "tiny-model")
    common = ["--model", model, "--drafter", str(out), "--num-prompts", "1", "--max-new-tokens", "3"]
    for args, system in ((["bench", *common], "Be terse."), (["bench", *common, "--system", ""], ""),
                         (["sweep", *common, "--beam-widths", "1", "--beam-lengths", "2"], "Be terse.")):
        r = runner.invoke(app, [*args, "--json", str(root / "sys.json")])
        assert r.exit_code == 0, r.output
        assert json.loads((root / "sys.json").read_text())["system"] == system
        noted = "prompts begin with the system prompt the drafter was distilled with ('Be terse.'"
        assert (noted in " ".join(r.output.split())) == (system == "Be terse."), r.output
    # A prompt file's own system turn goes with its prompt; the others send the drafter's, and one note says so
    # (battery 27: the drafter's note said every prompt began with it).
    own = root / "own.jsonl"
    own.write_text(json.dumps({"system": "Be kind.", "prompt": "Hi"}) + "\n" + json.dumps({"prompt": "Hello"}) + "\n")
    r = runner.invoke(app, ["bench", *common[:-4], "--prompts", str(own), "--max-new-tokens", "3", "--json",
                            str(root / "own.json")])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "prompts begin with" not in said, said
    assert f"1 of 2 prompts in {own} sends its own system turn; the other 1 sends the system prompt the drafter was " \
           f"distilled with ('Be terse.') (--system overrides)" in said, said
    assert json.loads((root / "own.json").read_text())["prompt_systems"] == 1
    chat = runner.invoke(app, ["chat", "--model", model, "--drafter", str(out), "-p", "Hi", "--max-new-tokens", "3",
                               "--json"])
    assert chat.exit_code == 0, chat.output
    assert json.loads(chat.stdout)["system"] == "Be terse."
    # Battery 26: --no-draft sends the prompt the draft run sends (the drafter's template and system prompt), in
    # every mode, for comparison; its JSON names no drafter, as none ran.
    plain = runner.invoke(app, ["chat", "--model", model, "--drafter", str(out), "-p", "Hi", "--max-new-tokens", "3",
                                "--json", "--no-draft"])
    assert plain.exit_code == 0, plain.output
    assert (json.loads(plain.stdout)["system"], json.loads(plain.stdout)["drafter"]) == ("Be terse.", None)
    # A template that refuses system turns: the drafter's system prompt is left out with a note (it was a dead end),
    # while a --system given is refused.
    nosys = root / "nosys.jinja"
    nosys.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                     "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{{ 'assistant: ' }}")
    r = runner.invoke(app, ["bench", *common, "--chat-template", str(nosys), "--json", str(root / "sys.json")])
    assert r.exit_code == 0, r.output
    assert "the drafter was distilled with a system prompt, but the chat template refuses a system turn, so prompts go " \
           "without one" in " ".join(r.output.split())
    assert json.loads((root / "sys.json").read_text())["system"] is None
    refused = runner.invoke(app, ["bench", *common, "--chat-template", str(nosys), "--system", "X"])
    assert refused.exit_code == 2 and "the chat template refuses a system turn: leave out --system" in refused.output
    refused = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "nosys-out"), "--system", "X",
                                  "--chat-template", str(nosys), "--max-steps", "1", "--no-bench"])
    assert refused.exit_code == 2, refused.output
    assert "the chat template refuses a system turn: data.system (--system) cannot be sent" in " ".join(
        refused.output.split())
    # One too long for the context names where it came from and what to pass.
    long = root / "long-system"
    shutil.copytree(out, long)
    saved = (long / "recipe.yaml").read_text().replace("system: Be terse.", "system: " + "word " * 300)
    (long / "recipe.yaml").write_text(saved)
    r = runner.invoke(app, ["bench", "--model", model, "--drafter", str(long), "--num-prompts", "1"])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and f"the drafter's system prompt ({long / 'recipe.yaml'} data.system) is" in said, said
    assert "give --system TEXT in its place, or --system '' for an empty one" in said
    # Chat fails at the start too (it failed every message), in the same words.
    r = runner.invoke(app, ["chat", "--model", model, "--drafter", str(long), "-p", "Hi"])
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and f"the drafter's system prompt ({long / 'recipe.yaml'} data.system) is" in said, said
    assert "leaves no room for a message; give --system TEXT in its place" in said


def test_a_diverged_run_keeps_no_checkpoint_of_its_blown_up_weights(tiny_recipe, monkeypatch):
    """Battery 19: with a learning rate far too high the weights stayed finite (~1e30) but their loss did not,
    and the checkpoint kept them, so the advised `--resume --lr` diverged again at once, round and round."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-diverge"))
    out = root / "diverged"
    blown = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--lr", "1e30", "--max-steps", "3",
                                "--no-bench"])
    text = " ".join(blown.output.split())
    assert blown.exit_code == 2 and "training diverged by step 1" in text and "--lr, now 1e+30" in text, blown.output
    assert not (out / "checkpoint").exists()
    again = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--lr", "1e-3", "--max-steps", "3",
                                "--no-bench", "--resume"])
    assert again.exit_code == 0, again.output
    # Battery 20: a weight decay far too high blows the weights up to finite values (x -999 a step); their loss
    # is no model's all the same, and no checkpoint keeps them either.
    decayed = root / "decayed.yaml"
    decayed.write_text(recipe.read_text().replace("save_every: 1,", "save_every: 1, weight_decay: 1.0e6,"))
    blown = runner.invoke(app, ["distill", str(decayed), "--out", str(root / "decayed"), "--max-steps", "3", "--no-bench"])
    text = " ".join(blown.output.split())
    assert blown.exit_code == 2 and "or train.weight_decay (now 1e+06)" in text, blown.output
    assert "no checkpoint was saved before it" in text and not (root / "decayed" / "checkpoint").exists()


def test_data_only_makes_all_of_the_data_whatever_max_steps_says(tiny_recipe, monkeypatch):
    """Battery 20: with train.max_steps set, --data-only made only the shards those steps would visit, and said
    the data was ready."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-data-only"))
    made = runner.invoke(app, ["distill", str(recipe), "--data-only", "--max-steps", "1"])
    assert made.exit_code == 0, made.output
    (folder,) = list((root / "cache-data-only" / "distill-data").iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_conversations"] == 10


def test_the_recommended_shape_fits_the_predicted_tokens(tiny_recipe, monkeypatch):
    """--predict-tokens 1 records beams of length 2, not the recipe's 3: later positions were never trained."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-fit"))
    ok = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "fit"), "--predict-tokens", "1",
                             "--max-steps", "1", "--no-bench"])
    assert ok.exit_code == 0, ok.output
    text = " ".join(ok.output.split())
    assert "recommended beam shape is 2x2 " in text and "(the recipe said 2x3 " in text
    config = Drafter.load(root / "fit").config
    assert (config.predict_tokens, config.beam_width, config.beam_length) == (1, 2, 2)


def test_fitting_the_beam_shape_caps_the_node_budget():
    from redraft_cli.distill.recipe import BeamSection

    beam = BeamSection(width=4, length=5, nodes=9)
    assert beam.fit_to(4) is None and (beam.length, beam.nodes) == (5, 9)
    assert "4x3 --nodes 8" in beam.fit_to(2) and (beam.length, beam.nodes) == (3, 8)
    # A context-attention drafter refuses beams longer than its window: copies of 32 tokens too.
    beam = BeamSection(width=4, length=5, lookup=1, lookup_length=32)
    note = beam.fit_to(4, context_window=8)
    assert "attends over 8 positions" in note and "--lookup-length 8" in note
    assert (beam.length, beam.lookup_length) == (5, 8)
    beam.decode_config().__post_init__()
    assert beam.fit_to(4, context_window=8) is None  # fitted once, nothing more to change
    beam = BeamSection(width=2, length=4, lookup=1, lookup_length=6)
    assert beam.fit_to(4, context_window=1) and (beam.length, beam.lookup, beam.lookup_length) == (1, 1, 0)


def test_data_only_then_several_processes_read_it(tiny_recipe, monkeypatch):
    """--data-only makes the data and writes nothing in --out; WORLD_SIZE > 1 without the rest of a
    launch is a one-line error (a real launch: test_distill_launch.py)."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-data-only"))
    out = root / "data-only"
    monkeypatch.setenv("WORLD_SIZE", "2")
    early = runner.invoke(app, ["distill", str(recipe), "--out", str(root / "early"), "--max-steps", "1", "--no-bench"])
    assert early.exit_code == 2 and "cannot start distributed training" in early.output, early.output
    assert "Traceback" not in early.output
    monkeypatch.delenv("WORLD_SIZE")
    made = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--data-only", "--json", str(root / "d.json")])
    assert made.exit_code == 0, made.output
    report = json.loads((root / "d.json").read_text())
    assert report["data_only"] and report["data"]["train_conversations"] == 8
    assert "data ready in" in made.output and not out.exists()
    # Each process would now only read: the run goes as far as training, which needs a real launch
    # (MASTER_ADDR, ...): WORLD_SIZE alone is a one-line error, not a bug.
    # (A fresh process: accelerate keeps its state per process.)
    import os
    import subprocess
    import sys

    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_ADDR", None)
    reached = subprocess.run([str(Path(sys.executable).with_name("redraft")), "distill", str(recipe), "--out", str(out),
                              "--max-steps", "1", "--no-bench"], env=env, capture_output=True, text=True, timeout=300)
    assert reached.returncode == 2 and "cannot start distributed training" in reached.stderr, reached.stderr
    assert "not all made yet" not in reached.stderr and "Traceback" not in reached.stderr
    both = runner.invoke(app, ["distill", str(recipe), "--data-only", "--no-generate"])
    assert both.exit_code == 2 and "--no-generate" in both.output
    # A data file with a malformed record among good ones: distill notes it and goes on.
    messy = root / "messy.jsonl"
    messy.write_text("\n".join(['{"prompt": "Tell me about the sea."}', '{"prompt": null}']
                               + [f'{{"prompt": "Sea fact {i}?"}}' for i in range(5)]
                               + ['{"system": "Be brief.", "prompt": "Sea fact 5?"}']) + "\n")
    noted = runner.invoke(app, ["distill", str(recipe), "--data", str(messy), "--data-only"])
    assert noted.exit_code == 0 and "skipped 1 record(s)" in noted.output and "messy.jsonl:2:" in noted.output
    assert "1 of 7 conversations in" in noted.output and "begins with its own system turn; the other 6 with the " \
           "chat template's default (data.system, --system, overrides)" in " ".join(noted.output.split()), noted.output


def test_a_conversation_s_own_system_turn_begins_its_training_data(tiny_recipe, monkeypatch):
    """A data file's own system turns (an OpenAI system message, a system field) begin their conversations'
    generated data, every turn of them; data.system (--system) replaces them all. The conversations differ,
    so does the data key: no folder of the same prompts without them is reused."""
    from redraft_cli.distill.data import load_dataset
    from redraft_cli.loading import TargetSpec, load_target

    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-own-system"))
    data = root / "[own]" / "own-system.jsonl"  # (a path that reads as Rich markup: the notes print it as it is)
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "system", "content": "Speak like a pirate."}, {"role": "user", "content": "Hi there."},
                      {"role": "assistant", "content": "x"}, {"role": "user", "content": "And then?"}]},
        {"prompt": "Tell me about the sea."}, {"system": "Be brief.", "prompt": "What is salt?"},
        {"prompt": "Name a fish."}]) + "\n")
    target = load_target(TargetSpec(model=str(root / "tiny-model"), dtype="float32", device="cpu"))
    texts = {}
    for extra in ([], ["--system", "Answer in French."]):
        made = runner.invoke(app, ["distill", str(recipe), "--data", str(data), "--held-out", "1", "--data-only",
                                   "--json", str(root / "own.json"), *extra])
        said = " ".join(made.output.split())
        assert made.exit_code == 0, made.output
        examples = load_dataset(json.loads((root / "own.json").read_text())["data_dir"])
        texts[bool(extra)] = {e["conv_index"]: target.tokenizer.decode(e["input_ids"]) for e in examples}
        if extra:
            assert f"data.system (--system) replaces the system turns of 2 of 4 conversations in {data}" in said, said
        else:
            assert f"2 of 4 conversations in {data} begin with their own system turn; the other 2 with the chat " \
                   f"template's default" in said, said
    own, replaced = texts[False], texts[True]
    assert own[0].count("Speak like a pirate.") == 1 and "And then?" in own[0]  # (one system turn, both user turns)
    assert "Be brief." in own[2] and "Speak like a pirate." not in own[1] + own[3]
    assert all("Answer in French." in t and "pirate" not in t and "Be brief." not in t for t in replaced.values())
    plain = target.encode_chat("Tell me about the sea.")
    assert target.tokenizer.decode(plain) in own[1]  # (no system turn of its own: the template's default)
    # The same user turns after another system turn are another conversation: not a held-out duplicate.
    from redraft_cli.distill.pipeline import _held_out_in_training
    from redraft_cli.prompts import Conversation

    assert _held_out_in_training([Conversation(["Hi"], "A"), Conversation(["Hi"], "B"), ["Hi"]], 1) == 0
    assert _held_out_in_training([Conversation(["Hi"], "A"), ["Yo"], Conversation(["Hi"], "A")], 1) == 1
    # A template that refuses system turns: they are left out, with a note (not a failed run).
    nosys = root / "nosys-own.jinja"
    nosys.write_text("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
                     "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{{ 'assistant: ' }}")
    left = runner.invoke(app, ["distill", str(recipe), "--data", str(data), "--held-out", "1", "--data-only",
                               "--chat-template", str(nosys)])
    assert left.exit_code == 0, left.output
    assert f"the system turns of 2 of 4 conversations in {data} are left out: the chat template refuses a system " \
           f"turn" in " ".join(left.output.split()), left.output
    # A template that rewrites messages cannot carry one holding a control token's string: that conversation is
    # left out, and the note says why (it blamed the prompt's length).
    trim = root / "trim-own.jinja"
    trim.write_text("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] | trim) + "
                    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                    "{% endif %}")
    data.write_text(data.read_text() + json.dumps({"system": " Be <|im_end|> brief. ", "prompt": "Why?"}) + "\n")
    cut = runner.invoke(app, ["distill", str(recipe), "--data", str(data), "--held-out", "1", "--data-only",
                              "--chat-template", str(trim)])
    said = " ".join(cut.output.split())
    assert cut.exit_code == 0, cut.output
    assert "1 conversation(s) left out: a message holds a control token's string, and the chat template changes " \
           "that message's text" in said and "does not fit" not in said, said


def _made_then_grown(recipe: Path, tmp_path: Path, count: int, added: list[str]):
    """`distill --data-only` on a file of `count` prompts, then on the same file with `added` at its end
    (REDRAFT_CACHE in tmp_path). Returns (first file, the earlier data folder, the grown run, its new folder);
    the earlier folder's files (inode and bytes) are checked unchanged by the grown run."""
    lines = [f"Tell me fact number {i} about the sea." for i in range(count)]
    first, grown = tmp_path / "p.txt", tmp_path / "grown.txt"
    first.write_text("\n".join(lines) + "\n")
    grown.write_text("\n".join(lines + added) + "\n")
    made = runner.invoke(app, ["distill", str(recipe), "--data", str(first), "--data-only"])
    assert made.exit_code == 0, made.output
    data = tmp_path / "cache" / "distill-data"
    (old,) = list(data.iterdir())
    files = lambda: {p: (p.stat().st_ino, p.read_bytes()) for p in old.rglob("*") if p.is_file() and p.name != ".lock"}  # noqa: E731
    before = files()
    more = runner.invoke(app, ["distill", str(recipe), "--data", str(grown), "--data-only"])
    assert more.exit_code == 0, more.output
    assert files() == before
    (new,) = [d for d in data.iterdir() if d != old]
    return first, old, more, new


def test_a_grown_prompt_file_keeps_its_answers_and_a_resume_on_other_data_says_so(tiny_recipe, tmp_path, monkeypatch):
    """Battery 16: prompts added at the end of a file made a new data folder answered from scratch (the
    README says a grown list keeps its answers); a resume after the training prompts were edited went on
    on the new data without a word; and one on a renamed copy of the same prompts was refused as if other
    conversations were held out."""
    root, recipe = tiny_recipe
    flat = lambda r: " ".join(r.output.split())  # noqa: E731
    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    first, old, more, new = _made_then_grown(recipe, tmp_path, 10, ["Why is the sea salty?", "What lives in the deep sea?"])
    assert "its answers to the first 8 prompts are kept" in flat(more), more.output
    lines = first.read_text().splitlines()
    for shard in ("shard-00000.safetensors", "shard-00001.safetensors"):  # (4 conversations a shard: 2 whole ones)
        assert (new / shard).read_bytes() == (old / shard).read_bytes()
    manifest = json.loads((new / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_conversations"] == 12 and len(manifest["shards"]) == 3
    # A resume on edited training prompts (the same held-out ones) trains on, and says so.
    out = tmp_path / "out"
    ran = runner.invoke(app, ["distill", str(recipe), "--data", str(first), "--out", str(out), "--max-steps", "2",
                              "--no-bench"])
    assert ran.exit_code == 0, ran.output
    renamed = tmp_path / "same.txt"
    renamed.write_text(first.read_text())
    same = runner.invoke(app, ["distill", str(recipe), "--data", str(renamed), "--out", str(out), "--max-steps", "3",
                               "--no-bench", "--resume"])
    assert same.exit_code == 0 and "training data differs" not in flat(same), same.output
    edited = tmp_path / "edited.txt"
    edited.write_text("\n".join(lines[:9] + ["Tell me something else about the sea."]) + "\n")
    other = runner.invoke(app, ["distill", str(recipe), "--data", str(edited), "--out", str(out), "--max-steps", "4",
                                "--no-bench", "--resume"])
    assert other.exit_code == 0 and "the training data differs from the data the checkpoint's 3 steps" in flat(other), \
        other.output


def test_a_grown_prompt_file_reuses_the_sampled_answers_and_caches_of_the_earlier_folder(tiny_recipe, tmp_path,
                                                                                         monkeypatch):
    """Battery 18: a grown prompt file linked only the earlier folder's whole greedy shards, so its sampled
    answers, written prompts and hidden states were all made again. Its subfolders are now linked too (the
    sampled answers' whole shards stay as they were), and the earlier folder is left untouched."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    richer = tmp_path / "richer.yaml"
    richer.write_text(recipe.read_text().replace(
        "shard_size: 4}", "shard_size: 4, cache_hidden: true, sampled_answers: 1, sampled_temperature: 0.7}"))
    _, old, more, new = _made_then_grown(richer, tmp_path, 10, ["Why is the sea salty?", "What lives in the deep sea?"])
    assert "its answers to the first 8 prompts are kept" in " ".join(more.output.split()), more.output
    (sampled,) = [p.name for p in old.glob("sampled-*")]
    assert (old / sampled / "shard-00001.safetensors").is_file() and list(old.glob("hidden-*/hidden-*"))
    for shard in ("shard-00000.safetensors", "shard-00001.safetensors"):  # the 8 training conversations' 2 whole shards
        assert (new / sampled / shard).stat().st_ino == (old / sampled / shard).stat().st_ino
    assert json.loads((new / sampled / "manifest.json").read_text())["num_conversations"] == 10
    assert json.loads((new / sampled / "manifest.json").read_text())["complete"]


def test_a_grown_prompt_file_reuses_the_hidden_states_of_its_unchanged_chunks(tiny_recipe, tmp_path, monkeypatch):
    """Battery 18: the hidden states of a grown file's first 256 conversations (one chunk) were computed again."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    big = tmp_path / "big.yaml"
    big.write_text(recipe.read_text().replace("gen_batch_size: 4, shard_size: 4}",
                                              "gen_batch_size: 16, shard_size: 64, cache_hidden: true}"))
    _, old, more, new = _made_then_grown(big, tmp_path, 300, ["Why is the sea salty?"])
    assert "its answers to the first 256 prompts are kept" in " ".join(more.output.split())
    (chunk,) = [p.relative_to(old) for p in old.glob("hidden-*/hidden-00000-*.safetensors")]
    assert (new / chunk).stat().st_ino == (old / chunk).stat().st_ino  # used, not made again
    assert len(list(new.glob("hidden-*/hidden-00001-*.safetensors"))) == 2  # the earlier last chunk, and the new one


def test_distill_writes_no_report_over_its_inputs_or_outputs(tiny_recipe, tmp_path):
    """--json never names the recipe, the drafter's own files in --out, or a file of the target's folder;
    --out is never inside the installed package."""
    import redraft_cli

    root, recipe = tiny_recipe
    before = recipe.read_text()
    cases = [
        (["--out", str(tmp_path / "o"), "--json", str(recipe)], "RECIPE and --json both name"),
        (["--out", str(tmp_path / "o"), "--json", str(tmp_path / "o" / "config.json")], "a file distill writes"),
        (["--out", str(tmp_path / "o"), "--json", str(tmp_path / "o" / "checkpoint" / "x.json")], "a file distill writes"),
        (["--out", str(tmp_path / "o"), "--json", str(tmp_path / "o")], "the --out folder itself"),  # was an IndexError
        (["--out", str(tmp_path / "o"), "--json", str(root / "tiny-model" / "config.json")], "file of the --model folder"),
        (["--out", str(Path(redraft_cli.__file__).parent / "data" / "drafters" / "x")], "inside the redraft package"),
    ]
    for args, fragment in cases:
        result = runner.invoke(app, ["distill", str(recipe), *args])
        assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output
    assert recipe.read_text() == before and not (tmp_path / "o").exists()


def test_distill_refuses_what_would_lose_or_mix_work(tiny_recipe, tmp_path, monkeypatch):
    """A report over the data, a resume for another target, a diverged run, a lost best/ or a checkpoint
    caught between its two renames: each is refused clearly or repaired, never a traceback."""
    import shutil

    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-guard"))
    flat = lambda r: " ".join(r.output.split())  # noqa: E731
    out = tmp_path / "out"
    first = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "2", "--no-bench"])
    assert first.exit_code == 0, first.output
    manifest = next((root / "cache-guard" / "distill-data").glob("*/manifest.json"))
    before = manifest.read_bytes()
    over = runner.invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "o2"), "--max-steps", "2", "--no-bench",
                               "--json", str(manifest)])
    assert over.exit_code == 2 and "inside the distillation data" in flat(over) and manifest.read_bytes() == before
    # Another target of the same shape: refused before recipe.yaml changes.
    other_model = root / "tiny-model-other"
    if not other_model.exists():
        shutil.copytree(root / "tiny-model", other_model)
    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text().replace(str(root / "tiny-model"), str(other_model)))
    saved = (out / "recipe.yaml").read_text()
    mixed = runner.invoke(app, ["distill", str(other), "--out", str(out), "--max-steps", "4", "--resume", "--no-bench"])
    assert mixed.exit_code == 2 and "target_model" in flat(mixed) and "Traceback" not in mixed.output
    assert (out / "recipe.yaml").read_text() == saved
    # Another held-out slice: the checkpoint would train on what it is evaluated on. Refused the same way.
    held = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "4", "--resume", "--no-bench",
                               "--held-out", "1"])
    assert held.exit_code == 2 and "data.held_out" in flat(held) and "other conversations" in flat(held), held.output
    assert (out / "recipe.yaml").read_text() == saved
    # best/ lost: the resumed run evaluates again and writes a final drafter that loads.
    shutil.rmtree(out / "best")
    again = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "3", "--resume", "--no-bench"])
    assert again.exit_code == 0 and "writes it again" in flat(again), again.output
    assert Drafter.load(out).config.target_model and (out / "best" / "config.json").is_file()
    # Stopped between the checkpoint's two renames: the old one is put back and the run resumes.
    (out / "checkpoint").rename(out / ".checkpoint.old999")
    back = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "4", "--resume", "--no-bench"])
    assert back.exit_code == 0, back.output
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    (out / "checkpoint" / "optimizer.pt").write_bytes(b"garbage bytes")
    garbage = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "5", "--resume", "--no-bench"])
    assert garbage.exit_code == 2 and "cannot resume from" in flat(garbage) and "Traceback" not in garbage.output
    assert "optimizer.pt cannot be read" in flat(garbage) and "weights_only" not in flat(garbage)  # (not torch's text)
    # A learning rate that makes the loss overflow stops the run with a one-line error.
    wild = runner.invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "wild"), "--max-steps", "6", "--no-bench",
                               "--lr", "1e30"])
    assert wild.exit_code == 2 and "diverged" in flat(wild) and "Traceback" not in wild.output
    # The recipe's device counts unless --device is given; a bad one is named by its field before any work.
    bad_device = tmp_path / "tpu.yaml"
    bad_device.write_text(recipe.read_text().replace("dtype: float32}", "dtype: float32, device: tpu}"))
    tpu = runner.invoke(app, ["distill", str(bad_device), "--out", str(tmp_path / "tpu"), "--max-steps", "1"])
    assert tpu.exit_code == 2 and "target.device" in flat(tpu) and "loading target" not in tpu.output
    on_cpu = tmp_path / "cpu.yaml"
    on_cpu.write_text(recipe.read_text().replace("dtype: float32}", "dtype: float32, device: cpu}"))
    for flags, device in (([], "cpu"), (["--device", "auto"], "auto")):
        run = runner.invoke(app, ["distill", str(on_cpu), *flags, "--out", str(tmp_path / device), "--max-steps", "1",
                                  "--no-bench"])
        assert run.exit_code == 0, run.output
        assert load_recipe(str(tmp_path / device / "recipe.yaml")).target.device == device
    # Every prompt too long for the room the answers leave: said plainly.
    long = runner.invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "long"), "--max-steps", "1",
                               "--no-bench", "--max-new-tokens", "250"])
    assert long.exit_code == 2 and "no prompt fits in 6 tokens" in flat(long), long.output
    monkeypatch.setenv("WORLD_SIZE", "abc")
    world = runner.invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "w"), "--max-steps", "1"])
    assert world.exit_code == 2 and "WORLD_SIZE='abc'" in flat(world) and "loading target" not in world.output


def test_damaged_distillation_data_is_named_or_computed_again(tiny_recipe, tmp_path, monkeypatch):
    """A garbled data manifest is a one-line error naming the folder to delete; a damaged hidden-state
    chunk is computed again, and so is a shard that is damaged, truncated or missing (the same answers
    as before: only that shard is generated)."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cached.yaml"
    cached.write_text(recipe.read_text().replace("shard_size: 4}", "shard_size: 4, cache_hidden: true}"))
    made = runner.invoke(app, ["distill", str(cached), "--data-only"])
    assert made.exit_code == 0, made.output
    data = next((tmp_path / "cache" / "distill-data").glob("*/manifest.json")).parent
    chunk = next((data / "hidden-float32").glob("hidden-*.safetensors"))
    chunk.write_bytes(chunk.read_bytes()[:200])
    redo = runner.invoke(app, ["distill", str(cached), "--out", str(tmp_path / "o"), "--epochs", "1", "--no-bench"])
    assert redo.exit_code == 0 and "computing it again" in " ".join(redo.output.split()), redo.output
    shard = data / "shard-00001.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(shard))
    others = {p.name: p.stat().st_mtime_ns for p in data.glob("shard-*") if p != shard}
    for n, damage in enumerate((lambda: save_file({k: v for k, v in tensors.items() if k != "offsets"}, str(shard)),
                                lambda: shard.write_bytes(shard.read_bytes()[:-40]), shard.unlink)):
        damage()
        again = runner.invoke(app, ["distill", str(cached), "--out", str(tmp_path / f"o2-{n}"), "--max-steps", "1",
                                    "--no-bench"])
        flat = " ".join(again.output.split())
        assert again.exit_code == 0 and "1 shard(s) of" in flat and "shard-00001.safetensors): made again" in flat, flat
        remade = load_file(str(shard))
        assert remade.keys() == tensors.keys() and all(torch.equal(remade[k], tensors[k]) for k in tensors)
        assert {p.name: p.stat().st_mtime_ns for p in data.glob("shard-*") if p != shard} == others
    (data / "manifest.json").write_text("[]")
    garbled = runner.invoke(app, ["distill", str(cached), "--out", str(tmp_path / "o3"), "--max-steps", "1"])
    assert garbled.exit_code == 2 and "is damaged" in garbled.output and str(data) in " ".join(garbled.output.split())


def test_two_runs_never_write_one_out_at_once(tiny_recipe, tmp_path, monkeypatch):
    """While a run holds --out (another process, or this one), a second distill there is a one-line
    error before the model loads; the folder is free again once the run ends."""
    import fcntl
    import os

    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-lock"))
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running distill holds
        busy = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "1", "--no-bench"])
    finally:
        os.close(fd)
    flat = " ".join(busy.output.split())
    assert busy.exit_code == 2 and "another redraft distill is writing --out" in flat, busy.output
    assert "loading target" not in busy.output and "Traceback" not in busy.output and not any(out.iterdir())
    free = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "1", "--no-bench"])
    assert free.exit_code == 0, free.output
    # A folder with a checkpoint, held: the second run is told another writes it (not "pass --resume").
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        busy = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "2", "--no-bench"])
    finally:
        os.close(fd)
    assert busy.exit_code == 2 and "another redraft distill is writing --out" in " ".join(busy.output.split())


def test_a_tilde_in_out_or_data_is_the_home_folder(tiny_recipe, tmp_path, monkeypatch):
    """`--out=~/x` reaches redraft unexpanded (the shell expands ~ only at a word's start): distill wrote the
    drafter into a folder named '~' in the working directory. A recipe's data.source: ~/p.txt was 'not found'."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-tilde"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "p.txt").write_text((root / "prompts.txt").read_text())
    homed = tmp_path / "homed.yaml"
    homed.write_text(recipe.read_text().replace(str(root / "prompts.txt"), "~/p.txt"))
    r = runner.invoke(app, ["distill", str(homed), "--out=~/drafter", "--max-steps", "1", "--no-bench"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "home" / "drafter" / "config.json").is_file() and not (tmp_path / "~").exists()


def test_a_resume_that_changes_the_recommended_beam_writes_it_into_the_drafter(tiny_recipe, tmp_path, monkeypatch):
    """The beam section may change on --resume (recipe.yaml takes it), but the final config.json was copied from
    best/, saved before the resume with the old shape: the drafter recommended 2x3 + 1 datastore beam while its
    recipe.yaml (and the held-out bench) said 3x2 best 2 nodes."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache"))
    out = tmp_path / "out"
    first = runner.invoke(app, ["distill", str(recipe), "--out", str(out), "--max-steps", "1", "--no-bench"])
    assert first.exit_code == 0, first.output
    other = tmp_path / "beam.yaml"
    other.write_text(recipe.read_text().replace("beam: {width: 2, length: 3, datastore: 1, lookup_length: 4}",
                                                "beam: {width: 3, length: 2, nodes: 2}"))
    again = runner.invoke(app, ["distill", str(other), "--out", str(out), "--max-steps", "1", "--resume", "--no-bench"])
    assert again.exit_code == 0 and "nothing left to train" in " ".join(again.output.split()), again.output
    c = Drafter.load(out).config
    assert (c.beam_width, c.beam_length, c.datastore_beams, c.lookup_length, c.tree_nodes) == (3, 2, 0, 0, 2)


def test_held_out_prompts_that_are_also_training_prompts_are_noted(tiny_recipe, tmp_path, monkeypatch):
    """Duplicates in the data put held-out conversations into training too: the held-out scores (which pick
    the best checkpoint) were silently training scores. Now a note says how many."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache"))
    dup = tmp_path / "dup.txt"
    dup.write_text("Tell me fact number 1 about the sea.\n" + (root / "prompts.txt").read_text())
    r = runner.invoke(app, ["distill", str(recipe), "--data", str(dup), "--out", str(tmp_path / "o"), "--max-steps", "1",
                            "--no-bench"])
    assert r.exit_code == 0, r.output
    assert "note: 1 of the 2 held-out conversations is also among the training conversations" in " ".join(r.output.split())
    clean = runner.invoke(app, ["distill", str(recipe), "--out", str(tmp_path / "o2"), "--max-steps", "1", "--no-bench"])
    assert clean.exit_code == 0 and "held-out conversations are also" not in clean.output, clean.output


def test_recipe_values_that_do_less_than_they_say_are_noted():
    """predict_tokens past the answers' length leaves drafter steps untrained (agreement 0, averaged in);
    eval.bench_prompts above data.held_out benches fewer prompts than asked. Both run, with a note."""
    from redraft_cli.distill.pipeline import _shape_notes
    from redraft_cli.distill.recipe import recipe_from_dict

    def notes(**sections):
        return " ".join(_shape_notes(recipe_from_dict({"name": "t", **sections})))

    assert notes() == ""  # the defaults: 4 drafter steps, 256-token answers
    said = notes(data={"max_new_tokens": 6}, drafter={"predict_tokens": 8})
    assert "predict_tokens 8" in said and "steps 1-5" in said
    longer = {"max_new_tokens": 6, "sampled_answers": 1, "sampled_max_new_tokens": 16}
    assert "predict_tokens" not in notes(data=longer, drafter={"predict_tokens": 8})
    assert "predict_tokens" in notes(data={**longer, "sampled_answers": 0}, drafter={"predict_tokens": 8})
    assert "the bench after training runs 2" in notes(data={"held_out": 2}, eval={"bench_prompts": 5})
    no_bench = recipe_from_dict({"name": "t", "data": {"held_out": 2}, "eval": {"bench_prompts": 5}})
    assert _shape_notes(no_bench, bench=False) == []  # --no-bench: no note about a bench that will not run


def test_recipe_yaml_reads_exponents_as_numbers_and_refuses_duplicate_keys(tmp_path):
    """PyYAML's YAML 1.1 rules read `lr: 1e-3` as the string '1e-3' (then refused: "must be a number");
    a key given twice silently kept the last value."""
    from redraft_cli.distill.recipe import load_recipe

    ok = tmp_path / "ok.yaml"
    ok.write_text("name: r1\ntarget:\n  model: smollm2-135m\ntrain:\n  lr: 1e-3\n  weight_decay: 5E-2\n")
    recipe = load_recipe(str(ok))
    assert recipe.train.lr == 0.001 and recipe.train.weight_decay == 0.05
    for text, line in (("name: r1\ntrain:\n  lr: 1e-3\n  max_steps: 1\n  lr: 2e-3\n", 5),
                       ("name: r1\ntrain:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", 4)):
        bad = tmp_path / "dup.yaml"
        bad.write_text(text)
        result = runner.invoke(app, ["distill", str(bad), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and f"dup.yaml:{line}:" in result.output and "duplicate key" in result.output, \
            result.output


def test_a_resume_on_edited_prompts_and_a_stop_in_the_bench_keep_the_work_honest(tiny_recipe, tmp_path, monkeypatch):
    """The held-out conversations are checked by content, not by the prompt file's name: a file edited
    in place (its held-out prompts now others) is refused before the model loads, even when out's
    recipe.yaml is damaged. A Ctrl-C in the bench keeps metrics.json and the --json report (without the
    bench), and --resume then finishes it."""
    import redraft_cli.distill.pipeline as pipeline

    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(root / "cache-held"))
    prompts = tmp_path / "p.txt"
    lines = (root / "prompts.txt").read_text().splitlines()
    prompts.write_text("\n".join(lines) + "\n")
    mine = tmp_path / "mine.yaml"
    mine.write_text(recipe.read_text().replace(str(root / "prompts.txt"), str(prompts)))
    out, report = tmp_path / "out", tmp_path / "report.json"
    real_bench = pipeline._held_out_bench

    def stopped(target, out, held_convs, recipe, emit):
        emit({"event": "bench_start", "prompts": 1})
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_held_out_bench", stopped)
    cut = runner.invoke(app, ["distill", str(mine), "--out", str(out), "--max-steps", "2", "--json", str(report)])
    flat = " ".join(cut.output.split())
    assert cut.exit_code == 130 and "interrupted during the held-out bench" in flat and "metrics.json" in flat, flat
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["bench"].startswith("not finished")
    assert json.loads(report.read_text()) == metrics
    monkeypatch.setattr(pipeline, "_held_out_bench", real_bench)
    prompts.write_text("\n".join(lines[3:] + lines[:3]) + "\n")  # edited in place: other held-out prompts
    (out / "recipe.yaml").write_text((out / "recipe.yaml").read_text()[:30])  # (and a recipe.yaml that cannot tell)
    edited = runner.invoke(app, ["distill", str(mine), "--out", str(out), "--max-steps", "2", "--resume"])
    flat = " ".join(edited.output.split())
    assert edited.exit_code == 2 and "held out other conversations" in flat and "loading target" not in flat, flat
    prompts.write_text("\n".join(lines) + "\n")
    done = runner.invoke(app, ["distill", str(mine), "--out", str(out), "--max-steps", "2", "--resume"])
    flat = " ".join(done.output.split())
    assert done.exit_code == 0 and "the final files are written from it" in flat, flat
    assert json.loads((out / "metrics.json").read_text())["bench"]["identical_outputs"] == 1


def test_sigterm_saves_the_checkpoint_and_says_so(tiny_recipe, tmp_path):
    """`kill` (SIGTERM, what `timeout` and job schedulers send) stops training as Ctrl-C does: the
    checkpoint of the last whole step is saved, one line says so, and the exit code is 143."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root, recipe = tiny_recipe
    out = tmp_path / "out"
    env = {**os.environ, "REDRAFT_CACHE": str(root / "cache-term"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("redraft")), "distill", str(recipe), "--out", str(out),
                             "--max-steps", "100000", "--no-bench"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while not (out / "checkpoint" / "trainer_state.json").is_file() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    flat = " ".join(stderr.split())
    assert proc.returncode == 143 and "terminated (SIGTERM) at training step" in flat and "Traceback" not in flat, flat
    step = int(flat.split("terminated (SIGTERM) at training step ")[1].split(";")[0])
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == step >= 1


def test_conversations_left_out_for_their_length_are_noted(tiny_recipe, tmp_path, monkeypatch):
    """A prompt too long for the room the answers leave was dropped from the data without a word (the run
    trained on fewer conversations than the file holds)."""
    root, recipe = tiny_recipe
    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "p.txt"
    prompts.write_text((root / "prompts.txt").read_text() + "word " * 300 + "\n")
    r = runner.invoke(app, ["distill", str(recipe), "--data", str(prompts), "--out", str(tmp_path / "o"),
                            "--epochs", "1", "--no-bench"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 0 and "note: 1 conversation(s) left out: a prompt (chat template and system turn " \
                                "included) does not fit in" in flat, flat
    assert "cut short" not in flat
