"""Beam-shape sweep: which beam width x beam length is fastest for this target,
drafter and machine.

Each cell of the grid is one `run_bench` on the same prompts without the HF
baseline: plain decoding and ReDrafter alternate prompt by prompt (pass by
pass with `batch_size` > 1), so every cell has its own adjacent plain
baseline and its speedup is measured against it. Slow drift of the machine (thermal, other load) therefore moves a cell's
baseline with it instead of biasing the grid; the pooled baseline over all
cells and its spread (`baseline.drift`) are reported too. One warm-up of both
paths runs before the grid (at the largest shape), none between cells.

The metrics are bench's (see `redraft_cli.bench`); a cell is a flat dict with
the fields in `CELL_FIELDS`, the same in JSON and CSV. The best cell is the
one with the highest speedup; `save_best` writes its shape into a saved
drafter's config.json, where `bench` and `chat` take their default shape from.
"""

from __future__ import annotations

import csv
import io
import json
import numbers
import re
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .beam_search import check_beam_shape
from .bench import BenchConfig, PathTotals, Ticker, check_run, peak_rss_mb, run_bench, warm_up
from .decode import DecodeConfig, Generator
from .dialogue import Dialogue, first_turn, turn_counts
from .drafter import write_beam_shape
from .errors import BadInputError, BeamShapeError, check_field_types
from .files import write_text

DEFAULT_BEAM_WIDTHS = (1, 2, 4, 8)
DEFAULT_BEAM_LENGTHS = (2, 3, 4, 5)

CELL_FIELDS = (
    "beam_width", "beam_length", "tree_nodes",
    "tokens_per_step", "acceptance_rate", "mean_tree_nodes",
    "tokens", "seconds", "tokens_per_s", "steps",
    "baseline_tokens", "baseline_seconds", "baseline_tokens_per_s",
    "speedup",
    "draft_share", "verify_share", "accept_share",
    "identical_outputs", "answers",
)
_INT_FIELDS = {"beam_width", "beam_length", "tree_nodes", "tokens", "steps", "baseline_tokens", "identical_outputs",
               "answers"}

ProgressFn = Callable[[int, int, str], None]
CellFn = Callable[[dict[str, Any]], None]


def parse_int_list(text: str, option: str = "list", minimum: int = 1) -> list[int]:
    """'1,2,4' -> [1, 2, 4]: integers >= minimum, deduplicated and sorted; BadInputError otherwise."""
    items = [t.strip() for t in str(text).split(",")]
    if not str(text).strip() or any(t == "" for t in items):
        kind = "positive integers" if minimum == 1 else f"integers >= {minimum}"
        raise BadInputError(f"{option} must be comma-separated {kind} such as 1,2,4; got {text!r}")
    values = []
    for t in items:
        try:
            v = int(t)
        except ValueError:
            raise BadInputError(f"{option}: {t!r} is not an integer (expected e.g. 1,2,4)") from None
        if v < minimum:
            raise BadInputError(f"{option}: {v} is not " + ("a positive integer" if minimum == 1 else f">= {minimum}"))
        values.append(v)
    return sorted(set(values))


@dataclass
class SweepConfig:
    """The grid and everything else a cell needs; `decode`'s own beam shape and budget are ignored.

    tree_nodes: node budgets to try in every W x L cell (0 = every beam), each
    capped at the W*(L-1) tokens that cell's search drafts; budgets that cap
    to the same value are run once, and a one-beam cell's full budget (L-1)
    is not run beside 0: both verify its one beam."""

    beam_widths: list[int] = field(default_factory=lambda: list(DEFAULT_BEAM_WIDTHS))
    beam_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_BEAM_LENGTHS))
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    warmup: bool = True
    tree_nodes: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 1  # rows decoded at once in every cell (bench's --batch-size)

    def __post_init__(self) -> None:
        for name in ("beam_widths", "beam_lengths", "tree_nodes"):
            values = getattr(self, name)
            if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # a numpy array, a tensor
                values = values.tolist()
            if not isinstance(values, (list, tuple, range)) or not all(
                    isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
                raise BadInputError(f"SweepConfig.{name} must be a list of whole numbers, got {values!r}")
            setattr(self, name, [int(v) for v in values])  # (numpy's ints too)
        if not isinstance(self.decode, DecodeConfig):
            raise BadInputError(f"SweepConfig.decode must be a DecodeConfig, got {type(self.decode).__name__}")
        check_field_types(self)
        if self.batch_size < 1:
            raise BadInputError(f"SweepConfig.batch_size must be a whole number >= 1, got {self.batch_size!r}")
        self.beam_widths = sorted(set(self.beam_widths))
        self.beam_lengths = sorted(set(self.beam_lengths))
        self.tree_nodes = sorted(set(self.tree_nodes))
        if not self.beam_widths or not self.beam_lengths or not self.tree_nodes:
            raise BadInputError("the sweep needs at least one beam width, beam length and node budget")
        if self.tree_nodes[0] < 0:
            raise BadInputError(f"--nodes must be >= 0, got {self.tree_nodes[0]}")
        self.check()

    def check(self, draft_vocab_size: int | None = None) -> None:
        """Every cell of the grid must be draftable (BeamShapeError otherwise)."""
        for w, length, n in self.shapes:
            try:
                check_beam_shape(w, length, draft_vocab_size, n)
            except BeamShapeError as exc:  # (the grid's options: --beam-widths, --beam-lengths)
                raise BeamShapeError(re.sub(r"--beam-(width|length)\b", r"--beam-\1s", str(exc))) from None

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        """Cells (width, length, node budget) in run order: widths outer, then lengths, then budgets."""
        cells = []
        for w in self.beam_widths:
            for length in self.beam_lengths:
                if length == 1 and w != self.beam_widths[0]:  # beams of g0 alone draft nothing: one cell for all widths
                    continue
                drafted = w * (length - 1)
                budgets = {min(n, drafted) for n in self.tree_nodes}
                # One beam (its L-1 prefixes are every node) or one draft step (the budget chooses among the W
                # tokens of that step only): a budget of every drafted token is the tree of budget 0.
                if (w == 1 or length == 2) and 0 in budgets and drafted:
                    budgets.discard(drafted)
                budgets = sorted(budgets)
                cells += [(w, length, n) for n in budgets]
        return cells


def cell_from_bench(r: dict[str, Any]) -> dict[str, Any]:
    """One flat cell (CELL_FIELDS) from a `run_bench` result of that shape."""
    red, base = r["redraft"], r["baseline"]
    cell = {
        "beam_width": r["beam_width"],
        "beam_length": r["beam_length"],
        "tree_nodes": r["tree_nodes"],
        "tokens_per_step": red["tokens_per_step"],
        "acceptance_rate": red["acceptance_rate"],
        "mean_tree_nodes": red["mean_tree_nodes"],
        "tokens": red["tokens"],
        "seconds": red["seconds"],
        "tokens_per_s": red["tokens_per_s"],
        "steps": red["steps"],
        "baseline_tokens": base["tokens"],
        "baseline_seconds": base["seconds"],
        "baseline_tokens_per_s": base["tokens_per_s"],
        "speedup": r["speedup"],
        "draft_share": red["draft_share"],
        "verify_share": red["verify_share"],
        "accept_share": red["accept_share"],
        "identical_outputs": r["identical_outputs"],
        "answers": r["num_answers"],  # (more than the prompts with --turns: one per turn answered)
    }
    assert tuple(cell) == CELL_FIELDS
    if r.get("turns_dropped"):  # (JSON only: later turns this cell left out, as bench lists them)
        cell["turns_dropped"] = r["turns_dropped"]
    return cell


def best_cell(cells: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cell with the highest speedup (ties: higher tokens/s, then the earlier cell)."""
    scored = [c for c in cells if c.get("speedup") is not None]
    if not scored:
        return None
    return max(scored, key=lambda c: (c["speedup"], c["tokens_per_s"], -cells.index(c)))


def pooled_baseline(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """All cells' adjacent plain baselines together, with their spread across the sweep."""
    total = PathTotals(sum(c["baseline_tokens"] for c in cells), sum(c["baseline_seconds"] for c in cells))
    rates = [c["baseline_tokens_per_s"] for c in cells if c["baseline_tokens_per_s"]]
    lo, hi = (min(rates), max(rates)) if rates else (0.0, 0.0)
    pooled = total.to_dict()
    if rates:  # (a weighted mean of the cells' rates: inside their range but for the rounding of their seconds)
        pooled["tokens_per_s"] = min(max(pooled["tokens_per_s"], lo), hi)
    return {
        **pooled,
        "min_tokens_per_s": lo,
        "max_tokens_per_s": hi,
        "drift": round(hi / lo - 1, 4) if lo else None,  # relative spread of the cells' baselines
    }


def run_sweep(gen: Generator, prompts: list[list[int] | Dialogue], cfg: SweepConfig,
              progress: ProgressFn | None = None, on_cell: CellFn | None = None) -> dict[str, Any]:
    """Measure every cell of the grid on the same tokenised prompts; returns the JSON-ready result.

    progress(done, total, label) is called after every timed (or warm-up) generation;
    on_cell(cell) after every finished cell, in run order. A prompt may be a Dialogue (dialogue.py):
    each cell then answers its turns as bench does.
    """
    check_run("run_sweep", gen, prompts, cfg, SweepConfig, progress=progress, on_cell=on_cell)
    d = cfg.decode
    if gen.drafter is not None:
        cfg.check(gen.drafter.draft_vocab_size)
    shapes = cfg.shapes
    per_cell = 2 * sum(turn_counts(prompts))  # answers x 2 paths
    tick = Ticker(len(shapes) * per_cell + (2 if cfg.warmup else 0), progress)
    start = time.perf_counter()
    if cfg.warmup:
        largest = replace(d, beam_width=max(cfg.beam_widths), beam_length=max(cfg.beam_lengths), tree_nodes=0)
        warm_up(gen, [first_turn(gen.target, p) for p in prompts[: cfg.batch_size]], largest, ["plain", "redraft"], tick)

    cells: list[dict[str, Any]] = []
    for k, (w, length, n) in enumerate(shapes):
        offset = tick.done
        name = f"cell {w}x{length}{f' best {n}' if n else ''} ({k + 1}/{len(shapes)})"

        def cell_progress(n: int, _total: int, label: str, offset: int = offset, name: str = name) -> None:
            tick.done = offset + n - 1
            tick(f"{name} {label}")

        cell_cfg = replace(d, beam_width=w, beam_length=length, tree_nodes=n)
        bench_cfg = BenchConfig(cell_cfg, warmup=False, hf_baseline=False, batch_size=cfg.batch_size)
        measured = run_bench(gen, prompts, bench_cfg, cell_progress)
        if measured.get("interrupted"):  # Ctrl-C inside the cell: it is not measured; the finished cells stand
            raise KeyboardInterrupt
        cell = cell_from_bench(measured)
        tick.done = offset + per_cell
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell)

    return sweep_result(cfg, cells, len(prompts), time.perf_counter() - start, turns=turn_counts(prompts))



def sweep_result(cfg: SweepConfig, cells: list[dict[str, Any]], num_prompts: int, wall_s: float,
                 interrupted: bool = False, turns: list[int] | None = None) -> dict[str, Any]:
    """The JSON-ready result of the cells measured so far (all of them, or those done before Ctrl-C); with
    prompts of several turns (`turns`: each prompt's), also the later turns any cell left out, and the most
    turns a prompt had answered."""
    d = cfg.decode
    s = d.sampling
    dropped: dict[tuple[int, int], dict[str, Any]] = {}
    for c in cells:
        for x in c.get("turns_dropped", []):
            dropped.setdefault((x["prompt"], x["turn"]), x)
    multi = {}
    if turns and max(turns) > 1:
        first_dropped = {p: t for p, t in sorted(dropped, reverse=True)}  # each prompt's earliest turn left out
        answered = max(first_dropped.get(i + 1, n + 1) - 1 for i, n in enumerate(turns))
        multi = {"turns": max(turns), "turns_answered": answered,
                 "turns_dropped": [dropped[k] for k in sorted(dropped)]}
    return {
        "accept": d.rule,
        **({"typical_epsilon": d.typical_epsilon, "typical_delta": d.typical_delta} if d.rule == "typical" else {}),
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "seed": s.seed,
        "num_prompts": num_prompts,
        "max_new_tokens": d.max_new_tokens,
        "beam_widths": list(cfg.beam_widths),
        "beam_lengths": list(cfg.beam_lengths),
        "lookup_beams": d.lookup_beams,
        "lookup_length": d.lookup_length,
        "datastore_beams": d.datastore_beams,
        "tree_nodes": list(cfg.tree_nodes),
        "batch_size": min(cfg.batch_size, num_prompts),
        "warmup": cfg.warmup,
        "baseline": pooled_baseline(cells),
        "cells": cells,
        "best": best_cell(cells),
        "interrupted": interrupted,
        "wall_s": round(wall_s, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **multi,
    }


# -- outputs -------------------------------------------------------------------------
def write_json(result: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text(out, json.dumps(result, indent=2) + "\n")


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per cell, CELL_FIELDS in order, plus `best` (1 for the best cell, else 0)."""
    best = result.get("best") or {}
    return [{**{f: c[f] for f in CELL_FIELDS}, "best": int(cell_key(c) == cell_key(best))} for c in result["cells"]]


def cell_key(cell: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(width, length, node budget) of a cell (budget 0 for results written before budgets)."""
    return cell.get("beam_width"), cell.get("beam_length"), cell.get("tree_nodes") or 0


def csv_text(result: dict[str, Any]) -> str:
    """The sweep's cells as CSV: a header line (CELL_FIELDS, then `best`) and a row per cell."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=[*CELL_FIELDS, "best"])
    writer.writeheader()
    for row in csv_rows(result):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def write_csv(result: dict[str, Any], path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_text(out, csv_text(result))


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of `write_csv` back with their types (ints, floats, None for empty). A file edited by hand
    reads too (a byte-order mark, a whole number written 3.0, columns in another order); a value that is
    not a number, a row of more or fewer fields than the header, or a header without the shape columns
    is a BadInputError naming the line and column."""
    where = Path(path)
    try:
        text = where.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read the sweep CSV {where}: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [k for k in ("beam_width", "beam_length") if k not in (reader.fieldnames or [])]
    if missing:
        raise BadInputError(f"{where} is not a sweep CSV: its header lacks {', '.join(missing)}")
    rows = []
    for raw in reader:
        if None in raw or None in raw.values():
            raise BadInputError(f"{where}:{reader.line_num}: the row has {'more' if None in raw else 'fewer'} fields "
                                f"than the header")
        row: dict[str, Any] = {}
        for k, v in raw.items():
            whole = k in _INT_FIELDS or k == "best"
            try:
                row[k] = None if v.strip() == "" else _whole(v) if whole else float(v)
            except ValueError:
                raise BadInputError(f"{where}:{reader.line_num}: column {k!r} holds {v!r}, not "
                                    f"{'a whole number' if whole else 'a number'}") from None
        rows.append(row)
    return rows


def _whole(text: str) -> int:
    """A whole number from CSV text: 3, or 3.0 as a spreadsheet writes it back; ValueError else."""
    value = float(text)
    if not value.is_integer():
        raise ValueError(text)
    return int(value)


def save_best(result: dict[str, Any], drafter_dir: str | Path) -> Path:
    """Write the best cell's shape as the drafter's recommended beam shape (for the sweep's batch
    size and device: batch 1 on a CPU at the top level, batch 1 on CUDA or MPS under
    `device_shapes`, larger batches under `batch_shapes`); returns config.json's path."""
    best = result.get("best")
    if best is None:
        raise BadInputError("the sweep has no best cell to save (no cell has a speedup)")
    if not any(c.get("steps") for c in result.get("cells", [])):
        raise BadInputError("no cell of the sweep took a draft step (max_new_tokens 1, or every answer ended at its "
                            "first token): its speedups compare prompt passes only, so there is no shape to save")
    device = str(result.get("device") or "cpu").split(":")[0]
    return write_beam_shape(drafter_dir, best["beam_width"], best["beam_length"],
                            result.get("lookup_beams"), result.get("lookup_length"), result.get("datastore_beams"),
                            best.get("tree_nodes"), batch_size=result.get("batch_size", 1), device=device)
