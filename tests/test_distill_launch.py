"""Distillation under `accelerate launch` with several processes (launch.py).

The split of the data is checked in one process, playing each rank in turn with the
barriers made no-ops (rank 1 first, then the main process, which waits for the others
and records their work); a real two-process launch on the CPU checks the whole command.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from redraft_cli.distill import launch as launch_mod
from redraft_cli.distill.data import GenerationConfig, generate_dataset, load_dataset, read_manifest
from redraft_cli.distill.hidden_cache import attach_hidden, build_hidden_cache
from redraft_cli.distill.launch import Launch

from conftest import tiny_chat_llama, tiny_llama
from test_distill_data import CONVERSATIONS, SMALL
from test_distill_train import synthetic_examples

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_barrier(monkeypatch):
    """Ranks played one after another in this process: nothing to wait for."""
    monkeypatch.setattr(Launch, "barrier", lambda self: None)


def test_launch_shares_work_and_gives_each_process_its_gpu(monkeypatch):
    assert Launch().share(range(5)) == [0, 1, 2, 3, 4] and Launch().is_main
    assert Launch(rank=1, world=3).share(range(8)) == [1, 4, 7]
    assert not Launch(rank=2, world=3).is_main
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    two = Launch(rank=3, world=4, local_rank=3)
    assert [two.device(d) for d in ("auto", "cuda", "cpu", "cuda:0")] == ["cuda:3", "cuda:3", "cpu", "cuda:0"]
    assert Launch().device("auto") == "auto"  # one process: the usual choice
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert two.device("auto") == "auto"
    # Without a launcher, one process and no process group.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch_mod.start_launch("auto") == Launch()


@pytest.fixture(scope="module")
def target():
    return tiny_chat_llama(seed=0)


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.safetensors"))}


def test_processes_split_the_shards_into_the_same_data(target, tmp_path, no_barrier, monkeypatch):
    """Rank r of N answers shards r, r+N, ...; the main process records the others' in the manifest:
    the files equal one process's. A launch stopped before that (part records left) is taken up by
    the next run, which answers only the shards that are missing."""
    cfg = GenerationConfig(**SMALL)  # 10 conversations, 3 shards
    one = generate_dataset(target, CONVERSATIONS, tmp_path / "one", cfg)
    other = generate_dataset(target, CONVERSATIONS, tmp_path / "two", cfg, launch=Launch(rank=1, world=2))
    assert [p.name for p in (tmp_path / "two").glob("part-*.json")] == ["part-00001.json"]
    assert other is not None and list(_shards(tmp_path / "two")) == ["shard-00001.safetensors"]
    main = generate_dataset(target, CONVERSATIONS, tmp_path / "two", cfg, launch=Launch(rank=0, world=2))
    assert _shards(tmp_path / "two") == _shards(tmp_path / "one")
    assert main["shards"] == one["shards"] and main["complete"] and main["totals"] == one["totals"]
    assert read_manifest(tmp_path / "two")["shards"] == one["shards"]
    assert not list((tmp_path / "two").glob("part-*.json"))  # moved into the manifest
    assert [e["conv_index"] for e in load_dataset(tmp_path / "two")] == [e["conv_index"] for e in load_dataset(tmp_path / "one")]

    # Rank 2 of 3 finished its shard, then the launch was stopped: one process goes on from there.
    generate_dataset(target, CONVERSATIONS, tmp_path / "stopped", cfg, launch=Launch(rank=2, world=3))
    import redraft_cli.distill.data as data_mod

    made, real = [], data_mod._generate_shard
    monkeypatch.setattr(data_mod, "_generate_shard", lambda *a, **k: made.append(a[4]) or real(*a, **k))
    resumed = generate_dataset(target, CONVERSATIONS, tmp_path / "stopped", cfg)
    assert made == [0, 1] and resumed["shards"] == one["shards"]
    assert _shards(tmp_path / "stopped") == _shards(tmp_path / "one")
    # A part record of another prompt set, or a damaged one, is not taken: that shard is answered again.
    (tmp_path / "stale").mkdir()
    shutil.copyfile(tmp_path / "one" / "shard-00002.safetensors", tmp_path / "stale" / "shard-00002.safetensors")
    entry = next(s for s in one["shards"] if s["index"] == 2)
    (tmp_path / "stale" / "part-00002.json").write_text(json.dumps({**entry, "of": "another set"}))
    (tmp_path / "stale" / "part-00001.json").write_text("{not json")
    made.clear()
    again = generate_dataset(target, CONVERSATIONS, tmp_path / "stale", cfg)
    assert made == [0, 1, 2] and again["shards"] == one["shards"]


@pytest.mark.parametrize("greedy", [False, True])
def test_processes_split_the_hidden_state_chunks(tmp_path, no_barrier, greedy):
    """Chunk c is computed by rank c % N; the main process records every chunk, and the cache
    reads back as one process's. A chunk file left unrecorded by a stopped launch is reused."""
    target = tiny_llama(vocab_size=64, seed=7)
    data = synthetic_examples(target, 10, seed=3)
    build_hidden_cache(target, data, tmp_path / "one", batch_size=2, chunk_size=4, greedy=greedy)
    attach_hidden(data, tmp_path / "one", target.name)
    ref = [(e.pop("hidden"), e.pop("greedy", None)) for e in data]
    build_hidden_cache(target, data, tmp_path / "two", batch_size=2, chunk_size=4, greedy=greedy,
                       launch=Launch(rank=1, world=2))
    assert len(list((tmp_path / "two").glob("hidden-*.safetensors"))) == 1  # chunk 1 of 0..2
    build_hidden_cache(target, data, tmp_path / "two", batch_size=2, chunk_size=4, greedy=greedy,
                       launch=Launch(rank=0, world=2))
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert sorted(manifest["chunks"]) == ["0", "1", "2"]
    attach_hidden(data, tmp_path / "two", target.name)
    for e, (hidden, labels) in zip(data, ref):
        assert torch.equal(e.pop("hidden"), hidden)
        if greedy:
            assert torch.equal(e.pop("greedy"), labels)
    # A stopped launch: rank 1's chunk is on disk but not in the manifest; one process reuses it.
    build_hidden_cache(target, data, tmp_path / "stopped", batch_size=2, chunk_size=4, greedy=greedy,
                       launch=Launch(rank=1, world=2))
    seen = []
    build_hidden_cache(target, data, tmp_path / "stopped", batch_size=2, chunk_size=4, greedy=greedy,
                       progress=lambda done, total: seen.append(done))
    assert seen == [2, 4, 10]  # chunks 0 and 2 (batches of 2), not chunk 1
    attach_hidden(data, tmp_path / "stopped", target.name)
    assert all(torch.equal(e["hidden"], h) for e, (h, _) in zip(data, ref))


@pytest.fixture(scope="module")
def tiny_launch_recipe(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    target = tiny_chat_llama(seed=4)
    target.model.save_pretrained(root / "tiny-model")
    target.tokenizer.save_pretrained(root / "tiny-model")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me fact number {i} about the sea." for i in range(20)) + "\n")
    recipe = root / "tiny.yaml"
    recipe.write_text(f"""
name: tiny
target: {{model: {root / 'tiny-model'}, dtype: float32}}
data: {{source: {prompts}, held_out: 4, max_new_tokens: 6, gen_batch_size: 4, shard_size: 4, cache_hidden: true,
        sampled_answers: 1, sampled_prompts: 9}}
drafter: {{head: tied, num_layers: 1, predict_tokens: 2}}
train: {{batch_size: 4, eval_every: 2, save_every: 2, positions_per_sequence: 4, epochs: 2}}
eval: {{bench_prompts: 1, bench_max_new_tokens: 4}}
beam: {{width: 2, length: 3}}
""")
    return root, recipe


def _data_files(cache: Path) -> dict[str, bytes]:
    root = cache / "distill-data"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}


def test_two_process_launch_makes_the_data_and_trains(tiny_launch_recipe, tmp_path):
    """`accelerate launch --num_processes 2 -m redraft_cli distill` on the CPU: the processes split the
    data (the same files as one process makes), train data parallel, and only the main process writes
    the drafter and its report and prints."""
    root, recipe = tiny_launch_recipe
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REDRAFT_CACHE": str(tmp_path / "cache-2"),
           "MASTER_PORT": str(29_500 + os.getpid() % 1_000)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    launched = subprocess.run(
        [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", env["MASTER_PORT"],
         "-m", "redraft_cli", "distill", str(recipe), "--out", str(tmp_path / "out"), "--no-bench",
         "--json", str(tmp_path / "report.json")],
        env=env, capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("drafter written to") == 1 and "Traceback" not in launched.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report == metrics and metrics["best_step"] > 0 and metrics["history"]
    assert metrics["data"]["train_conversations"] == 16 + 9  # greedy answers + sampled ones
    # One process, same recipe: the same data files.
    one = subprocess.run([str(bin_dir / "redraft"), "distill", str(recipe), "--data-only"],
                         env={**env, "REDRAFT_CACHE": str(tmp_path / "cache-1")}, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert _data_files(tmp_path / "cache-2") == _data_files(tmp_path / "cache-1")
