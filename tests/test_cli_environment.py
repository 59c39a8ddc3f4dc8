"""The environment a command runs in, not its arguments: signals a scheduler sends, a standard error or
output that went away, a narrow terminal's COLUMNS, an output encoding that is not UTF-8, memory that
ran out, a conversion killed mid-way. The run's finished work is kept and said in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from redraft_cli.cli.app import app

runner = CliRunner()
REDRAFT = str(Path(sys.executable).with_name("redraft"))
SMALL = ["--num-prompts", "1", "--max-new-tokens", "4", "--no-hf-baseline", "--drafter", "random", "-w", "2", "-l", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigterm_during_bench_keeps_the_finished_prompts(tmp_path, monkeypatch):
    """`timeout` and job schedulers send SIGTERM: bench lost every finished prompt (exit -15)."""
    from redraft_cli import bench

    real, calls = bench._run_path, []

    def run_path(gen, path, group, d, slots, done=None):
        calls.append(path)
        if len(calls) == 2 + 2 + 1:  # the first path of prompt 2, after the warm-up and prompt 1 (2 paths each)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(gen, path, group, d, slots, done)

    monkeypatch.setattr(bench, "_run_path", run_path)
    out = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", *SMALL, "--num-prompts", "2", "--json", str(out)])
    flat = " ".join(r.output.split())
    assert r.exit_code == 143 and "terminated (SIGTERM): the results above cover the 1 of 2 prompts" in flat, flat
    assert json.loads(out.read_text())["interrupted"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # (put back after the run)


def test_memory_that_ran_out_is_said_as_such(monkeypatch):
    from redraft_cli.cli import bench as bench_cli

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(bench_cli, "run_bench", no_memory)
    r = runner.invoke(app, ["bench", *SMALL])
    assert r.exit_code == 3 and r.output.strip().startswith("error: out of memory") and "bug" not in r.output, r.output


def test_a_standard_error_that_went_away_loses_no_results(tmp_path):
    """Progress on a standard error whose reader left (`2> >(head -n 3)`) ended bench with exit 1 and no
    results; `--json -` into a closed pipe said "error: Broken pipe" with exit 2 (a table's closed pipe
    ends quietly with 1)."""
    out = tmp_path / "r.json"
    proc = subprocess.Popen([REDRAFT, "bench", *SMALL, "--json", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    proc.stderr.close()
    stdout, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0 and b"ReDrafter" in stdout and json.loads(out.read_text())["redraft"]["tokens"] == 4
    proc = subprocess.Popen([REDRAFT, "bench", *SMALL, "--json", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1 and b"error" not in stderr, stderr


def test_a_narrow_columns_does_not_cut_a_saved_table(monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")
    r = runner.invoke(app, ["bench", *SMALL])
    assert r.exit_code == 0 and "tokens/s" in r.output and "…" not in r.output, r.output


def test_chat_on_an_output_that_is_not_utf8(tmp_path):
    """PYTHONIOENCODING=ascii (or a latin-1 terminal): chat stopped mid-answer with a UnicodeEncodeError;
    what the output cannot show now becomes '?', and --json escapes it."""
    for extra, check in (([], lambda out: "?" in out or out.isascii()),
                         (["--json"], lambda out: "caf\\u00e9" in out)):
        r = subprocess.run([REDRAFT, "chat", "-p", "Say café ☕", "--max-new-tokens", "6", "--drafter", "random", *extra],
                           capture_output=True, env={**ENV, "PYTHONIOENCODING": "ascii"}, timeout=240)
        out = r.stdout.decode("ascii")
        assert r.returncode == 0 and "Error" not in r.stderr.decode() and check(out), (out, r.stderr)


def test_a_conversion_killed_mid_way_leaves_nothing_behind(tmp_path, monkeypatch):
    """A kill -9 (or SIGTERM) during the ~20 s conversion left a ~0.5 GB NAME.tmpPID folder for good."""
    from redraft_cli import loading

    monkeypatch.setenv("REDRAFT_CACHE", str(tmp_path))
    models = tmp_path / "models"
    for name in (".smollm2-135m.tmp424242", "smollm2-135m.tmp434343"):  # (the second: how it was named before)
        (models / name).mkdir(parents=True)
        (models / name / "model.safetensors").write_bytes(b"half")
    monkeypatch.setattr(loading, "_convert_into", lambda alias, out: None)
    loading._convert_embedded("smollm2-135m")
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == []


def test_bench_and_sweep_with_standard_output_closed_need_a_report_file(tmp_path):
    """`bench >&-` ran to the end and exited 0 with its table gone nowhere."""
    for command in (["bench", *SMALL], ["sweep", "--num-prompts", "1", "--max-new-tokens", "4"]):
        r = subprocess.run([REDRAFT, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV,
                           timeout=240, preexec_fn=lambda: os.close(1))
        assert r.returncode == 2 and b"standard output is closed" in r.stderr, r.stderr


def test_a_full_standard_output_is_named():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here (not Linux)")
    with open("/dev/full", "w") as full:
        r = subprocess.run([REDRAFT, "bench", *SMALL], stdout=full, stderr=subprocess.PIPE, env=ENV, timeout=240)
    assert r.returncode == 2 and b"no space left on device while writing the output" in r.stderr, r.stderr
