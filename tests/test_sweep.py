"""The beam-shape sweep: the core grid on a tiny random Llama, outputs (JSON, CSV, PNG),
saving the best shape into a drafter, and `redraft sweep` through CliRunner."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from redraft_cli.cli.app import app
from redraft_cli.decode import DecodeConfig, Generator
from redraft_cli.drafter import CONFIG_NAME, WEIGHTS_NAME, Drafter, write_beam_shape
from redraft_cli.errors import BadInputError, BeamShapeError, DrafterLoadError
from redraft_cli.sweep import (CELL_FIELDS, SweepConfig, best_cell, csv_rows, parse_int_list, read_csv, run_sweep,
                               save_best, write_csv, write_json)

from conftest import random_prompts, tiny_llama

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    target = tiny_llama()
    return target, Drafter.for_target(target, seed=0)


@pytest.fixture(scope="module")
def swept(tiny):
    target, drafter = tiny
    events, cells = [], []
    cfg = SweepConfig(beam_widths=[2, 1, 2], beam_lengths=[3, 2], decode=DecodeConfig(max_new_tokens=8))
    result = run_sweep(Generator(target, drafter), random_prompts(2, target.vocab_size), cfg,
                       progress=lambda *a: events.append(a), on_cell=cells.append)
    return {**result, "model": target.name, "drafter": "random (seed 0)"}, events, cells


def test_grid_has_every_cell_with_all_fields(swept):
    result, events, cells = swept
    assert result["beam_widths"] == [1, 2] and result["beam_lengths"] == [2, 3]  # deduplicated, sorted
    shapes = [(c["beam_width"], c["beam_length"]) for c in result["cells"]]
    assert shapes == [(1, 2), (1, 3), (2, 2), (2, 3)]
    assert cells == result["cells"]  # on_cell saw each cell as it finished, in order
    for c in result["cells"]:
        assert tuple(c) == CELL_FIELDS
        assert c["tokens"] == c["baseline_tokens"] == 16  # 2 prompts x 8 tokens, no EOS in the tiny model
        assert c["identical_outputs"] == 2  # greedy: lossless in every cell
        assert c["tokens_per_step"] >= 1.0 and 0.0 <= c["acceptance_rate"] <= 1.0
        assert 1.0 <= c["mean_tree_nodes"] <= c["beam_width"] * c["beam_length"]
        assert c["tokens_per_s"] > 0 and c["baseline_tokens_per_s"] > 0
        assert c["speedup"] == pytest.approx(c["tokens_per_s"] / c["baseline_tokens_per_s"], rel=0.02)
    # Warm-up (2) + 4 cells x 2 prompts x 2 paths, monotone, ending at the total.
    assert [e[0] for e in events] == list(range(1, 19)) and all(e[1] == 18 for e in events)
    assert events[0][2] == "warm-up plain" and events[-1][2].startswith("cell 2x3 (4/4)")


def test_batched_sweep_decodes_through_slots(tiny):
    """--batch-size in the sweep: every cell decodes its 3 prompts through 2 slots on both paths,
    losslessly, and the cell's tokens are those of batch 1."""
    target, drafter = tiny
    prompts = random_prompts(3, target.vocab_size, seed=4)
    runs = {}
    for b in (1, 2):
        cfg = SweepConfig(beam_widths=[2], beam_lengths=[3], decode=DecodeConfig(max_new_tokens=6), batch_size=b,
                          warmup=b == 2)
        runs[b] = run_sweep(Generator(target, drafter), prompts, cfg)
    assert runs[2]["batch_size"] == 2 and runs[2]["cells"][0]["identical_outputs"] == 3
    assert runs[2]["cells"][0]["tokens"] == runs[1]["cells"][0]["tokens"] == 18


def test_best_is_the_fastest_cell_and_baseline_is_pooled(swept):
    result, _, _ = swept
    cells = result["cells"]
    assert result["best"] == max(cells, key=lambda c: c["speedup"])
    base = result["baseline"]
    assert base["tokens"] == sum(c["baseline_tokens"] for c in cells)
    rates = [c["baseline_tokens_per_s"] for c in cells]
    assert base["min_tokens_per_s"] == min(rates) and base["max_tokens_per_s"] == max(rates)
    assert best_cell([]) is None
    tie = [{"speedup": 1.0, "tokens_per_s": 5.0, "k": 0}, {"speedup": 1.0, "tokens_per_s": 5.0, "k": 1}]
    assert best_cell(tie)["k"] == 0


def test_json_and_csv_round_trip(swept, tmp_path):
    result, _, _ = swept
    back = json.loads(write_json(result, tmp_path / "out" / "s.json").read_text())
    assert back == json.loads(json.dumps(result))
    for key in ("accept", "temperature", "top_p", "seed", "num_prompts", "max_new_tokens", "baseline", "cells", "best"):
        assert key in back, key
    rows = read_csv(write_csv(result, tmp_path / "s.csv"))
    assert len(rows) == 4
    assert rows == csv_rows(result)
    assert sum(r["best"] for r in rows) == 1
    best_row = next(r for r in rows if r["best"])
    assert (best_row["beam_width"], best_row["beam_length"]) == (result["best"]["beam_width"], result["best"]["beam_length"])
    for row, cell in zip(rows, result["cells"]):
        assert {k: row[k] for k in CELL_FIELDS} == cell


def test_save_best_rewrites_only_the_shape(swept, tiny, tmp_path):
    result, _, _ = swept
    _, drafter = tiny
    path = tmp_path / "drafter"
    drafter.save(path)
    weights = (path / WEIGHTS_NAME).read_bytes()
    before = json.loads((path / CONFIG_NAME).read_text())
    best = {**result, "best": {**result["best"], "beam_width": 2, "beam_length": 3}, "lookup_beams": 1,
            "lookup_length": 7}
    assert save_best(best, path) == path / CONFIG_NAME
    after = json.loads((path / CONFIG_NAME).read_text())
    assert after["redraft"]["beam_width"] == 2 and after["redraft"]["beam_length"] == 3
    # The lookup settings the shape was measured with are recommended with it.
    before["redraft"].update(beam_width=2, beam_length=3, lookup_beams=1, lookup_length=7)
    assert after == before
    assert (path / WEIGHTS_NAME).read_bytes() == weights
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary left behind
    loaded = Drafter.load(path)
    assert (loaded.config.beam_width, loaded.config.beam_length) == (2, 3)
    assert (loaded.config.lookup_beams, loaded.config.lookup_length) == (1, 7)
    with pytest.raises(BadInputError, match="no best cell"):
        save_best({**result, "best": None}, path)


def _save_best_copy(result: dict, drafter: Drafter, tmp_path, run: dict, **cell: int):
    """Save `drafter`, then `save_best` of the sweep `result` run with `run` settings (batch size,
    device) and 1 lookup beam of 9, its best cell set to `cell`. Returns (the result saved, the
    drafter's path, config.json before and after, the shape it should hold)."""
    path = tmp_path / "drafter"
    drafter.save(path)
    before = json.loads((path / CONFIG_NAME).read_text())
    best = {**result, **run, "lookup_beams": 1, "lookup_length": 9, "best": {**result["best"], **cell}}
    save_best(best, path)
    after = json.loads((path / CONFIG_NAME).read_text())
    shape = {"beam_width": cell["beam_width"], "beam_length": cell["beam_length"], "lookup_beams": 1,
             "lookup_length": 9, "datastore_beams": 0, "tree_nodes": cell["tree_nodes"]}
    return best, path, before, after, shape


def test_save_best_of_a_batched_sweep_keeps_the_batch_one_shape(swept, tiny, tmp_path):
    """A sweep at --batch-size 4 saves its best shape for batches of 4 and more; batch 1 (and 2, 3)
    keep the top-level one, and bench/chat resolve the shape for their batch size."""
    from redraft_cli.cli.common import with_drafter_shape

    result, _, _ = swept
    _, drafter = tiny
    best, path, before, after, shape = _save_best_copy(result, drafter, tmp_path, {"batch_size": 4},
                                                       beam_width=2, beam_length=2, tree_nodes=1)
    assert after["redraft"].pop("batch_shapes") == {"4": shape}
    assert after == before  # the batch-1 recommendation is untouched
    cfg = Drafter.load(path).config
    top = {k: getattr(cfg, k) for k in shape}
    assert cfg.shape_for(1) == cfg.shape_for(3) == top
    assert cfg.shape_for(4) == cfg.shape_for(64) == shape
    loaded = Drafter.load(path)
    d1 = with_drafter_shape(DecodeConfig(), loaded, None, None, batch_size=1)
    d4 = with_drafter_shape(DecodeConfig(), loaded, None, None, batch_size=8)
    assert (d1.beam_width, d1.beam_length, d1.lookup_length) == (top["beam_width"], top["beam_length"], top["lookup_length"])
    assert (d4.beam_width, d4.beam_length, d4.tree_nodes, d4.lookup_length) == (2, 2, 1, 9)
    # A batch-8 entry takes over from 8 rows on; saving 4 again replaces only its own entry.
    save_best({**best, "batch_size": 8, "best": {**best["best"], "beam_width": 1}}, path)
    save_best({**best, "best": {**best["best"], "tree_nodes": 0}}, path)
    cfg = Drafter.load(path).config
    assert cfg.shape_for(7)["tree_nodes"] == 0 and cfg.shape_for(7)["beam_width"] == 2
    assert cfg.shape_for(9)["beam_width"] == 1 and sorted(cfg.batch_shapes) == ["4", "8"]


def test_save_best_on_a_gpu_keeps_the_cpu_shape(swept, tiny, tmp_path):
    """A batch-1 sweep on CUDA saves its best shape for CUDA (`device_shapes`); the CPU's batch-1
    shape and the batch shapes stay, and a drafter on that device (or asked for it) takes it."""
    result, _, _ = swept
    _, drafter = tiny
    best, path, before, after, shape = _save_best_copy(result, drafter, tmp_path, {"device": "cuda:0"},
                                                       beam_width=3, beam_length=2, tree_nodes=0)
    assert after["redraft"].pop("device_shapes") == {"cuda": shape}
    assert after == before
    loaded = Drafter.load(path)
    top = {k: getattr(loaded.config, k) for k in shape}
    assert loaded.recommended_shape() == loaded.recommended_shape(device="cpu") == top  # a CPU drafter: the CPU's
    assert loaded.recommended_shape(device="cuda") == loaded.recommended_shape(device=torch.device("cuda", 1)) == shape
    assert loaded.recommended_shape(4, device="cuda") == top  # batches keep theirs (here: the batch-1 fields)
    assert loaded.recommended_shape(device="mps") == top
    assert loaded.decode_config(device="cuda", max_new_tokens=7).beam_width == 3
    with pytest.raises(BadInputError, match="device must be a str or torch.device"):
        loaded.recommended_shape(device=0)
    with pytest.raises(BadInputError, match="'gpu' is not a device"):
        loaded.decode_config(device="gpu")
    for batch in ("2", None, 0, 2.5, True):
        with pytest.raises(BadInputError, match="batch_size must be an int >= 1"):
            loaded.recommended_shape(batch_size=batch)
    save_best({**best, "device": "cpu"}, path)  # on the CPU: the top level
    cfg = Drafter.load(path).config
    assert (cfg.beam_width, cfg.beam_length) == (3, 2) and cfg.device_shapes == {"cuda": shape}
    # write_beam_shape from Python: a device as str or torch.device, normalised; nothing else.
    write_beam_shape(path, 4, 2, device=torch.device("cuda", 0))
    write_beam_shape(path, 5, 2, device="CUDA:1".lower())
    assert Drafter.load(path).config.device_shapes["cuda"]["beam_width"] == 5
    for kwargs, fragment in (({"device": "gpu"}, "is not a device"), ({"device": "meta"}, "keeps shapes for cpu"),
                             ({"batch_size": 2.5}, "batch_size must be an int"), ({"lookup_length": 1.5}, "lookup_length"),
                             ({"datastore_beams": True}, "datastore_beams")):
        with pytest.raises(BadInputError, match=fragment):
            write_beam_shape(path, 2, 2, **kwargs)


@pytest.mark.parametrize("key,entry,fragment", [
    ("device_shapes", {"cpu": {"beam_width": 2}}, "device 'cpu' must be one of cuda, mps"),
    ("device_shapes", {"cuda": {"beam_length": 0}}, "beam_length must be an integer >= 1"),
    ("device_shapes", {"cuda": {"nodes": 3}}, "must map some of"),
    ("device_shapes", ["cuda"], "must map devices"),
])
def test_bad_device_shapes_are_refused(tiny, tmp_path, key, entry, fragment):
    _, drafter = tiny
    path = tmp_path / "drafter"
    drafter.save(path)
    data = json.loads((path / CONFIG_NAME).read_text())
    data["redraft"][key] = entry
    (path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(DrafterLoadError, match=fragment):
        Drafter.load(path)


@pytest.mark.parametrize("entry,fragment", [
    ({"1": {"beam_width": 2}}, "batch size '1'"),
    ({"x": {"beam_width": 2}}, "batch size 'x'"),
    ({"04": {"beam_width": 2}}, "batch size '04'"),
    ({"4": {"beam_width": 0}}, "beam_width must be an integer >= 1"),
    ({"4": {"tree_nodes": "3"}}, "tree_nodes must be an integer >= 0"),
    ({"4": {"beam_width": True}}, "beam_width must be an integer"),
    ({"4": {"width": 2}}, "must map some of"),
    ({"4": [2, 4]}, "must map some of"),
    ([4], "must map batch sizes"),
])
def test_bad_batch_shapes_are_refused(tiny, tmp_path, entry, fragment):
    _, drafter = tiny
    path = tmp_path / "drafter"
    drafter.save(path)
    data = json.loads((path / CONFIG_NAME).read_text())
    data["redraft"]["batch_shapes"] = entry
    (path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(DrafterLoadError, match=fragment):
        Drafter.load(path)


def test_write_beam_shape_keeps_a_reference_layout_config_own_head(tmp_path):
    target = tiny_llama()
    path = tmp_path / "ref"
    Drafter.for_target(target, head="own").save(path)
    data = json.loads((path / CONFIG_NAME).read_text())
    data.pop("redraft")  # the reference implementation's config has no redraft block
    (path / CONFIG_NAME).write_text(json.dumps(data))
    write_beam_shape(path, 3, 2)
    loaded = Drafter.load(path)
    assert loaded.config.head == "own" and (loaded.config.beam_width, loaded.config.beam_length) == (3, 2)
    with pytest.raises(BeamShapeError):
        write_beam_shape(path, 0, 2)
    with pytest.raises(DrafterLoadError):
        write_beam_shape(tmp_path / "missing", 2, 2)


def test_parse_int_list_and_grid_checks():
    assert parse_int_list("4, 1,2,2") == [1, 2, 4]
    for bad in ("", " ", "1,,2", "1,x", "0", "2,-1", "1.5"):
        with pytest.raises(BadInputError):
            parse_int_list(bad, "--beam-widths")
    with pytest.raises(BeamShapeError):
        SweepConfig(beam_widths=[1, 300], beam_lengths=[2])
    with pytest.raises(BadInputError):
        SweepConfig(beam_widths=[], beam_lengths=[2])
    with pytest.raises(BeamShapeError, match="draft vocabulary"):
        SweepConfig(beam_widths=[8], beam_lengths=[2]).check(draft_vocab_size=4)


def test_plot_writes_a_png_with_two_titled_heatmaps(swept, tmp_path):
    from redraft_cli.plots import save_sweep_plot, sweep_figure

    result, _, _ = swept
    fig = sweep_figure(result)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 2
    assert "Speedup" in titled[0].get_title() and "Tokens per step" in titled[1].get_title()
    for ax in titled:
        assert "beam length" in ax.get_xlabel() and "beam width" in ax.get_ylabel()
        assert len(ax.texts) == 4  # one annotation per cell
    assert "tiny-llama" in fig.get_suptitle() and "greedy" in fig.get_suptitle()
    out = save_sweep_plot(result, tmp_path / "plots" / "s.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# -- the command ------------------------------------------------------------------------
def invoke(*args):
    return runner.invoke(app, ["sweep", *map(str, args)])


def assert_clean_error(result, *fragments, code=2):
    out = result.output
    assert result.exit_code == code, out
    assert "Traceback" not in out and out.strip().startswith("error:"), out
    assert len(out.strip().splitlines()) == 1, out
    for f in fragments:
        assert f in out, out


def test_cli_sweep_embedded_default(tmp_path):
    paths = {k: tmp_path / f"s.{k}" for k in ("json", "csv", "png")}
    result = invoke("--drafter", "random", "--beam-widths", "1,2", "--beam-lengths", "2,3", "--num-prompts", 1,
                    "--max-new-tokens", 8, "--json", paths["json"], "--csv", paths["csv"], "--plot", paths["png"])
    assert result.exit_code == 0, result.output
    data = json.loads(paths["json"].read_text())
    assert data["model"] == "smollm2-135m" and data["drafter"].startswith("random")
    assert len(data["cells"]) == 4 and data["best"] in data["cells"]
    assert all(c["identical_outputs"] == 1 for c in data["cells"])
    assert data["saved_best"] is None
    assert len(read_csv(paths["csv"])) == 4
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert "redraft sweep" in result.output and "plain baseline" in result.output


@pytest.mark.parametrize("args,fragments", [
    (["--beam-widths", ""], ["--beam-widths"]),
    (["--beam-widths", "1,two"], ["--beam-widths", "'two'"]),
    (["--beam-lengths", "0"], ["--beam-lengths", "positive"]),
    (["--beam-lengths", "2,,3"], ["--beam-lengths"]),
    (["--beam-widths", "300"], ["too large"]),
    (["--plot", "grid.jpg"], ["--plot"]),
    (["--save-best"], ["--save-best", "--drafter random"]),
    (["--nodes", "-1"], ["--nodes", ">= 0"]),
    (["--nodes", "2,x"], ["--nodes", "'x'"]),
    (["--batch-size", "0"], ["--batch-size", ">= 1"]),
])
def test_cli_bad_grids_fail_before_loading(args, fragments):
    assert_clean_error(invoke("--drafter", "random", "--model", "no-such-org/never-loaded", *args), *fragments)


def test_cli_save_best_into_a_saved_drafter(tmp_path, smollm2):
    path = tmp_path / "smol-drafter"
    Drafter.for_target(smollm2, seed=1).save(path)
    result = invoke("--drafter", path, "--save-best", "--beam-widths", "1,2", "--beam-lengths", "2", "--nodes", 1,
                    "--num-prompts", 1, "--max-new-tokens", 4, "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s.json").read_text())
    best = data["best"]
    assert data["saved_best"] == str(path / CONFIG_NAME)
    cfg = Drafter.load(path).config
    assert (cfg.beam_width, cfg.beam_length) == (best["beam_width"], best["beam_length"])
    assert cfg.tree_nodes == best["tree_nodes"] == 1  # the budget, capped at the 1 token a 1x2 cell drafts
    assert all(c["tree_nodes"] == 1 for c in data["cells"]) and data["tree_nodes"] == [1]
    assert "saved beam shape" in result.output
    # A batch shape is only saved when batches of that size were measured.
    few = invoke("--drafter", path, "--save-best", "--batch-size", 4, "--num-prompts", 2, "--beam-widths", "1",
                 "--beam-lengths", "2")
    assert_clean_error(few, "--batch-size 4 needs at least 4 prompts")


def test_cli_save_best_refuses_a_sweep_whose_baselines_drifted(tmp_path, smollm2, monkeypatch):
    """Battery 23: a host stall during one cell made its plain baseline 10x slower than the next cell's, so
    that cell's speedup (14x) was 'best' and --save-best would have written it. Baselines more than 2x apart
    are named, and --save-best then saves nothing and exits 1 (the JSON is still written)."""
    import redraft_cli.sweep as sweep_core

    real = sweep_core.pooled_baseline
    monkeypatch.setattr(sweep_core, "pooled_baseline", lambda cells: {**real(cells), "min_tokens_per_s": 3.77,
                                                                      "max_tokens_per_s": 38.47, "drift": 9.2042})
    path = tmp_path / "smol-drafter"
    Drafter.for_target(smollm2, seed=1).save(path)
    before = (path / CONFIG_NAME).read_text()
    result = invoke("--drafter", path, "--save-best", "--beam-widths", "1,2", "--beam-lengths", "2", "--num-prompts", 1,
                    "--max-new-tokens", 4, "--no-warmup", "--json", tmp_path / "s.json")
    out = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "plain decoding ran at 3.77 to 38.47 tokens/s from cell to cell" in out and "--save-best saved nothing" in out
    assert "--no-warmup: the first timed runs include one-time start-up costs" in out
    assert (path / CONFIG_NAME).read_text() == before and json.loads((tmp_path / "s.json").read_text())["cells"]
    plain = invoke("--drafter", path, "--beam-widths", "1", "--beam-lengths", "2,3", "--num-prompts", 1,
                   "--max-new-tokens", 4)
    assert plain.exit_code == 0 and "run the sweep again on an idle machine" in " ".join(plain.output.split())


def test_cli_ctrl_c_keeps_the_finished_cells(tmp_path, smollm2, monkeypatch):
    """Ctrl-C after some cells prints them, writes them (marked interrupted) and exits 130."""
    import redraft_cli.cli.sweep as cli_sweep

    real = cli_sweep.run_sweep

    def stop_after_two(gen, ids, cfg, progress, on_cell):
        def cell(c):
            on_cell(c)
            if c["beam_width"] == 2:
                raise KeyboardInterrupt
        return real(gen, ids, cfg, progress, on_cell=cell)

    monkeypatch.setattr(cli_sweep, "run_sweep", stop_after_two)
    result = invoke("--drafter", "random", "--beam-widths", "1,2,3", "--beam-lengths", "2", "--num-prompts", 1,
                    "--max-new-tokens", 4, "--no-warmup", "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv",
                    "--plot", tmp_path / "s.png")
    assert result.exit_code == 130, result.output
    assert "interrupted: the results above cover the 2 of 3 cells that finished" in result.output and "Traceback" not in result.output
    assert "s.png" in result.output and (tmp_path / "s.png").stat().st_size > 0  # the plot of the finished cells
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["interrupted"] is True and [c["beam_width"] for c in data["cells"]] == [1, 2]
    assert data["best"] in data["cells"] and len(read_csv(tmp_path / "s.csv")) == 2


def test_the_title_names_the_copied_beams_as_the_readme_does():
    from redraft_cli.cli.sweep import render

    r = {"model": "m", "drafter": "d", "accept": "greedy", "temperature": 0.0, "num_prompts": 5,
         "max_new_tokens": 128, "lookup_beams": 1, "lookup_length": 32, "datastore_beams": 0}
    title = render(r, [(2, 4, 0)], []).title
    assert title.endswith("| 5 prompts x 128 tokens | 1 lookup up to 32"), title
    assert title.startswith("redraft sweep: m | drafter d")  # a result that does not say where it ran


def test_titles_name_the_device_dtype_and_quantization():
    from redraft_cli.cli.bench import render as bench_render
    from redraft_cli.cli.common import precision_label
    from redraft_cli.cli.sweep import render

    r = {"model": "m", "drafter": "d", "accept": "greedy", "temperature": 0.0, "num_prompts": 5,
         "max_new_tokens": 128, "lookup_beams": 0, "lookup_length": 0, "datastore_beams": 0,
         "device": "cpu", "dtype": "bfloat16", "quantize": "none", "device_map": None}
    assert render(r, [(2, 4, 0)], []).title.startswith("redraft sweep: m (cpu bfloat16) | drafter d")
    assert precision_label({**r, "device": "cuda:0", "dtype": "float16", "quantize": "4bit"}) == " (cuda:0 float16 4bit)"
    assert precision_label({**r, "device_map": "auto"}) == " (cpu, device map auto, bfloat16)"
    path = {"tokens": 10, "seconds": 1.0, "tokens_per_s": 10.0}
    red = {**path, "tokens_per_step": 2.0, "acceptance_rate": 0.5, "mean_tree_nodes": 8.0, "draft_share": 0.1,
           "verify_share": 0.8, "accept_share": 0.1, "passes": 0, "steps": 5}
    b = {**r, "quantize": "8bit", "beam_width": 2, "beam_length": 4, "tree_nodes": 0, "baseline": path, "redraft": red,
         "speedup": 1.0, "identical_outputs": None}
    assert bench_render(b).title.startswith("redraft bench: m (cpu bfloat16 8bit) | drafter d | greedy")


def test_ctrl_c_inside_a_cell_stops_the_sweep(tiny, monkeypatch):
    """bench keeps a Ctrl-C'd cell's finished prompts; the sweep must not count that cell as measured
    (nor save its shape), but stop, as bench does, with the cells before it."""
    import redraft_cli.sweep as sweep_mod

    target, drafter = tiny
    calls, real = [], sweep_mod.run_bench

    def cut_second_cell(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        return {**result, "interrupted": True} if len(calls) == 2 else result

    monkeypatch.setattr(sweep_mod, "run_bench", cut_second_cell)
    cells = []
    cfg = SweepConfig(beam_widths=[1, 2], beam_lengths=[2], decode=DecodeConfig(max_new_tokens=4), warmup=False)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(Generator(target, drafter), random_prompts(2, target.vocab_size), cfg, on_cell=cells.append)
    assert len(cells) == 1 and len(calls) == 2


@pytest.mark.parametrize("kwargs, fragment", [
    ({"beam_widths": ["a"]}, "beam_widths must be a list of whole numbers"),
    ({"beam_widths": 4}, "beam_widths must be a list"),
    ({"decode": None}, "decode must be a DecodeConfig"),
    ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
])
def test_sweep_config_checks_its_fields(kwargs, fragment):
    with pytest.raises(BadInputError, match=fragment):
        SweepConfig(**kwargs)


def test_write_beam_shape_refuses_what_bench_would(tiny, tmp_path):
    _, drafter = tiny
    path = drafter.save(tmp_path / "d")
    before = (path / CONFIG_NAME).read_text()
    with pytest.raises(BadInputError, match="lookup"):
        write_beam_shape(path, 2, 2, lookup_beams=100, lookup_length=1)
    assert (path / CONFIG_NAME).read_text() == before


def test_cli_slower_note_advises_the_batch_that_ran(tmp_path, monkeypatch):
    """A sweep's --batch-size above its prompts runs as many rows as prompts: the note's advice names that.
    And it never advises the sweep that has just run (`redraft sweep --save-best` finds the shape...)."""
    from redraft_cli.cli.common import slower_note

    import redraft_cli.cli.sweep as sweep_cli
    from conftest import tiny_model_dir

    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny", layers=1)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a colour.\nName a sea.\n")
    seen = []
    monkeypatch.setattr(sweep_cli, "slower_note", lambda *a, **k: seen.append((a[2], k.get("swept"))))
    r = runner.invoke(app, ["sweep", "--model", str(model_dir), "--drafter", "random", "--prompts", str(prompts),
                            "--max-new-tokens", "4", "--beam-widths", "1", "--beam-lengths", "2", "--no-warmup",
                            "--batch-size", "64"])
    assert r.exit_code == 0 and seen == [(2, True)], (r.output, seen)
    for batch, graphed in ((1, False), (2, False), (1, True)):
        note = slower_note(0.5, 2.0, batch, "/some/drafter", subject="the fastest shape tried", graphed=graphed,
                           swept=True)
        assert note.startswith("note: the fastest shape tried ran at 0.50x") and "redraft sweep" not in note, note
        assert "redraft sweep" in slower_note(0.5, 2.0, batch, "/some/drafter", graphed=graphed)


def test_cli_save_best_saves_no_shape_that_no_draft_step_measured(tmp_path):
    """Answers that end at their first token take no draft step: each cell's 'speedup' compares prompt passes
    only (noise), and --save-best wrote that noise's 'best' shape into config.json. Now --max-new-tokens 1 is
    refused before loading; a run whose answers all ended at once says so and saves nothing."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_model_dir

    assert_clean_error(invoke("--model", "no-such-org/never-loaded", "--drafter", tmp_path / "d", "--save-best",
                              "--max-new-tokens", 1), "--save-best needs --max-new-tokens 2 or more")
    model_dir, _, _ = tiny_model_dir(tmp_path / "eos-at-once", layers=1)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy picks token 0, made the end of text
    model.config.eos_token_id = model.generation_config.eos_token_id = 0
    model.save_pretrained(model_dir)
    drafter = tmp_path / "drafter"
    Drafter.for_target(tiny_llama(vocab_size=model.config.vocab_size, hidden_size=32), seed=0).save(drafter)
    before = (drafter / CONFIG_NAME).read_text()
    prompts = tmp_path / "p.txt"
    prompts.write_text("Name a colour.\n")
    r = invoke("--model", model_dir, "--drafter", drafter, "--prompts", prompts, "--max-new-tokens", 4,
               "--beam-widths", "1,2", "--beam-lengths", 2, "--no-warmup", "--save-best", "--json", tmp_path / "s.json")
    assert r.exit_code == 0, r.output
    assert "no cell took a draft step" in " ".join(r.output.split()) and "saved nothing" in " ".join(r.output.split())
    cells = json.loads((tmp_path / "s.json").read_text())["cells"]  # undefined ratios are null, not 0
    assert len(cells) == 2 and all(c["steps"] == 0 and c["tokens_per_step"] is None for c in cells), cells
    assert (drafter / CONFIG_NAME).read_text() == before


def test_budgets_that_make_the_same_tree_run_once():
    """A budget capped at W x (L-1) runs once; for one beam that full budget is the every-beam tree (0)."""
    from redraft_cli.sweep import SweepConfig

    cfg = SweepConfig(beam_widths=[1, 2], beam_lengths=[3], tree_nodes=[0, 2, 4, 9])
    assert cfg.shapes == [(1, 3, 0), (2, 3, 0), (2, 3, 2), (2, 3, 4)]
    assert SweepConfig(beam_widths=[1], beam_lengths=[3], tree_nodes=[2]).shapes == [(1, 3, 2)]  # as asked
    # Beams of length 1 (g0 alone, lookup beams only) are one tree whatever the width: one cell, never none
    # (the 1x1 cell was dropped: an empty sweep).
    assert SweepConfig(beam_widths=[1], beam_lengths=[1], tree_nodes=[0]).shapes == [(1, 1, 0)]
    assert SweepConfig(beam_widths=[1, 2], beam_lengths=[1, 2], tree_nodes=[0]).shapes == [
        (1, 1, 0), (1, 2, 0), (2, 2, 0)]
    assert SweepConfig(beam_widths=[2, 4], beam_lengths=[1], tree_nodes=[0, 3]).shapes == [(2, 1, 0)]


def test_a_full_budget_over_one_draft_step_is_the_every_beam_tree(tiny):
    """Beams of length 2 draft one step: a budget of all W tokens keeps the same W nodes as budget 0, so
    `--nodes 0,2` at 2x2 runs one cell (it ran both, and their timing noise could pick `best`)."""
    from redraft_cli.beam_search import draft_beams
    from redraft_cli.sweep import SweepConfig

    assert SweepConfig(beam_widths=[2], beam_lengths=[2, 3], tree_nodes=[0, 1, 2]).shapes == [
        (2, 2, 0), (2, 2, 1), (2, 3, 0), (2, 3, 1), (2, 3, 2)]
    target, drafter = tiny
    drafter.attach(target.embed_weight, target.lm_head_weight)
    torch.manual_seed(0)
    h, g0 = torch.randn(3, target.hidden_size), torch.randint(0, target.vocab_size, (3,))
    every, budget = draft_beams(drafter, h, g0, 2, 2), draft_beams(drafter, h, g0, 2, 2, tree_nodes=2)
    as_set = lambda b: [sorted(map(tuple, row.tolist())) for row in b.tokens]  # noqa: E731
    assert as_set(every) == as_set(budget)


def test_cli_json_to_stdout_and_prompts_from_stdin(tmp_path, monkeypatch):
    """`--json -`: standard output is the report alone (the table goes to standard error), after a full
    sweep and after a Ctrl-C (whose message says where the finished cells went)."""
    import redraft_cli.cli.sweep as cli_sweep
    from conftest import tiny_model_dir

    model_dir, _, _ = tiny_model_dir(tmp_path / "tiny", layers=1)
    args = ["sweep", "--model", str(model_dir), "--drafter", "random", "--prompts", "-", "--max-new-tokens", "4",
            "--beam-widths", "1,2", "--beam-lengths", "2", "--no-warmup", "--json", "-"]
    r = runner.invoke(app, args, input="Name a colour.\nName a sea.\n")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data["cells"]) == 2 and data["num_prompts"] == 2
    assert "redraft sweep" in r.stderr and "wrote" not in r.output
    real = cli_sweep.run_sweep

    def stop_after_one(gen, ids, cfg, progress, on_cell):
        def cell(c):
            on_cell(c)
            raise KeyboardInterrupt
        return real(gen, ids, cfg, progress, on_cell=cell)

    monkeypatch.setattr(cli_sweep, "run_sweep", stop_after_one)
    r = runner.invoke(app, args, input="Name a colour.\n")
    assert r.exit_code == 130 and "(in standard output, marked \"interrupted\")" in " ".join(r.stderr.split()), r.output
    assert json.loads(r.stdout)["interrupted"] is True
    # --csv - : the rows on standard output (the JSON in its file); both on standard output is refused.
    monkeypatch.setattr(cli_sweep, "run_sweep", real)
    csv_args = [a if a != "--json" else "--csv" for a in args]
    r = runner.invoke(app, [*csv_args, "--json", str(tmp_path / "s.json")], input="Name a colour.\n")
    assert r.exit_code == 0, r.output
    rows = r.stdout.splitlines()
    assert rows[0].startswith("beam_width,") and len(rows) == 3, r.stdout
    assert json.loads((tmp_path / "s.json").read_text())["num_prompts"] == 1
    assert not Path("-").exists()  # (no file named "-" in the current folder)
    both = runner.invoke(app, [*args, "--csv", "-"], input="Name a colour.\n")
    assert both.exit_code == 2 and "both name standard output" in both.output, both.output


def test_save_best_never_rewrites_the_drafter_shipped_in_the_package(tmp_path):
    """`sweep --save-best` with the default drafter would rewrite the package's own config.json (one
    short sweep replaced the shipped shape): refused, with the copy to make instead."""
    from redraft_cli.shipped import shipped_drafter_dir

    shipped = shipped_drafter_dir("smollm2-135m") / CONFIG_NAME
    before = shipped.read_bytes()
    r = invoke("--save-best", "--beam-widths", "1", "--beam-lengths", "2", "--num-prompts", 1, "--max-new-tokens", 4)
    assert_clean_error(r, "inside the redraft package", "cp -r")
    assert shipped.read_bytes() == before


def test_the_pooled_baseline_lies_within_its_cells_range():
    """One cell of 8 tokens in 0.2529 s (rounded from 0.25291...): the pooled rate is the cell's, not
    8 / 0.2529, which lay above the cell's own rate and so outside [min, max]."""
    from redraft_cli.sweep import pooled_baseline

    cell = {"baseline_tokens": 8, "baseline_seconds": 0.2529, "baseline_tokens_per_s": 31.628}
    pooled = pooled_baseline([cell])
    assert pooled["min_tokens_per_s"] <= pooled["tokens_per_s"] <= pooled["max_tokens_per_s"] == 31.628
    two = pooled_baseline([cell, {"baseline_tokens": 8, "baseline_seconds": 0.5, "baseline_tokens_per_s": 16.0}])
    assert 16.0 < two["tokens_per_s"] < 31.628


def test_a_saved_batch_shape_names_the_batch_sizes_it_serves():
    from redraft_cli.cli.sweep import _batch_sizes

    assert _batch_sizes(2, {}) == "2 and larger"
    assert _batch_sizes(2, {"2": {}, "4": {}}) == "2 to 3"
    assert _batch_sizes(2, {"3": {}}) == "2"
    assert _batch_sizes(8, {"4": {}}) == "8 and larger"


def test_a_beam_too_wide_or_too_long_names_the_option_at_fault():
    from redraft_cli.beam_search import check_beam_shape

    with pytest.raises(BeamShapeError, match="--beam-width 257 is too large"):
        check_beam_shape(257, 4)
    with pytest.raises(BeamShapeError, match="--beam-length 65 is too large"):
        check_beam_shape(2, 65)


def test_the_cores_refuse_what_they_cannot_run_before_any_work(tiny, swept, tmp_path):
    """Battery 21: run_bench and run_sweep from Python took a wrong config, a Generator without a drafter or a
    callback that is not one as AttributeError or TypeError, some after a warm-up had run; an empty prompt list
    was "the batch needs at least one slot"; save_best saved a shape that no draft step measured; and a
    hand-edited CSV read back as a ValueError naming nothing (or, with a byte-order mark, a wrong key)."""
    from redraft_cli.bench import BenchConfig, run_bench

    target, drafter = tiny
    gen, prompts, d = Generator(target, drafter), random_prompts(2, target.vocab_size), DecodeConfig(max_new_tokens=4)
    bench, sweep = BenchConfig(decode=d, warmup=False), SweepConfig(beam_widths=[2], beam_lengths=[3], decode=d)
    for call, fragment in ((lambda: run_bench(gen, prompts, d), "run_bench needs a BenchConfig, got DecodeConfig"),
                           (lambda: run_sweep(gen, prompts, bench), "run_sweep needs a SweepConfig, got BenchConfig"),
                           (lambda: run_bench(target, prompts, bench), "run_bench needs a Generator"),
                           (lambda: run_bench(gen, [], bench), "run_bench needs at least one prompt"),
                           (lambda: run_bench(gen, iter(prompts), bench), "prompts must be a list"),
                           (lambda: run_bench(gen, prompts, bench, progress=5), "progress must be callable"),
                           (lambda: run_sweep(gen, prompts, sweep, on_cell=3), "on_cell must be callable"),
                           (lambda: run_bench(Generator(target), prompts, bench), "needs a drafter"),
                           (lambda: run_sweep(gen, prompts, replace(sweep, decode=replace(d, datastore_beams=1))),
                            "--datastore needs a drafter saved with a datastore")):
        with pytest.raises(BadInputError, match=fragment):
            call()
    result, _, _ = swept
    unmeasured = {**result, "cells": [{**c, "steps": 0} for c in result["cells"]]}
    with pytest.raises(BadInputError, match="no cell of the sweep took a draft step"):
        save_best(unmeasured, tmp_path)
    text = write_csv(result, tmp_path / "s.csv").read_text()
    header, first, *rest = text.splitlines()
    edited = tmp_path / "edited.csv"
    edited.write_text("\ufeff" + header + "\n" + first.replace(first.split(",")[0], "2.0", 1) + "\n", encoding="utf-8")
    assert read_csv(edited)[0]["beam_width"] == 2  # (a byte-order mark and a spreadsheet's 2.0 read as written)
    for line, fragment in ((first.replace(first.split(",")[0], "abc", 1), r"edited.csv:2: column 'beam_width' holds 'abc'"),
                           (first + ",9", "the row has more fields than the header"),
                           (first.rsplit(",", 1)[0], "the row has fewer fields than the header")):
        edited.write_text(header + "\n" + line + "\n")
        with pytest.raises(BadInputError, match=fragment):
            read_csv(edited)
    edited.write_text('{"accept": "greedy"}\n')
    with pytest.raises(BadInputError, match="is not a sweep CSV"):
        read_csv(edited)
    from redraft_cli.shipped import shipped_drafter_dir  # save_best from Python, as the CLI, spares the package

    shipped = shipped_drafter_dir("smollm2-135m") / CONFIG_NAME
    before = shipped.read_bytes()
    try:
        with pytest.raises(BadInputError, match="shipped inside the redraft package"):
            save_best(result, shipped.parent)
    finally:
        if shipped.read_bytes() != before:
            shipped.write_bytes(before)
            pytest.fail("save_best rewrote the shipped drafter's config.json")
