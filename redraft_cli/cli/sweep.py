"""`redraft sweep`: grid-search the beam shape (width x length) that is fastest here."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..decode import Generator
from ..drafter import CONFIG_NAME
from ..dialogue import turn_counts
from ..errors import BadInputError
from ..shipped import shipped_drafter_dir
from ..sweep import (DEFAULT_BEAM_LENGTHS, DEFAULT_BEAM_WIDTHS, SweepConfig, best_cell, cell_key, parse_int_list,
                     run_sweep, save_best as save_best_shape, sweep_result, csv_text)
from . import options as o
from ._errors import handle_errors, interrupt_code, stop_signals, stopped_word
from .common import as_dialogues, note_dropped_turns, turns_label, parse_turns, read_conversations, counted, note_no_warmup, check_system, encode_prompts, model_inputs, check_batch_size, fit_batch_size, check_output_paths, Loaded, console, decode_config, err, load_models, lookup_label, precision_label, note_short_prompt_set, slower_note, note_past_training, shown, with_drafter_shape, is_dash, report_to_stdout, stdout_open, write_report

D = o.DEFAULTS
PLOT_SUFFIXES = (".png", ".svg", ".pdf")
NUM_PROMPTS = 5  # prompts per cell by default
DRIFT_LIMIT = 1.0  # the fastest cell's plain baseline above twice the slowest's: the machine's speed changed
LARGE_GRID = 64  # more cells than this get a note of how much work the sweep is

BeamWidths = Annotated[str, typer.Option("--beam-widths", help="Beam widths to try, comma-separated.")]
BeamLengths = Annotated[str, typer.Option("--beam-lengths", help="Beam lengths to try (tokens per beam, counting g0), comma-separated.")]
CsvOut = Annotated[Optional[Path], typer.Option("--csv", callback=report_to_stdout, help="Write one row per cell to this CSV file ('-': to standard output; the tables then go to standard error).")]
PlotOut = Annotated[Optional[Path], typer.Option("--plot", help="Write speedup and tokens-per-step heatmaps to this .png (or .svg/.pdf).")]
SaveBest = Annotated[bool, typer.Option("--save-best", help="Write the fastest shape into the drafter's config.json (the default of bench and chat).")]


@handle_errors
def sweep(
    model: o.Model = D["model"],
    drafter: o.DrafterOpt = "auto",
    beam_widths: BeamWidths = ",".join(map(str, DEFAULT_BEAM_WIDTHS)),
    beam_lengths: BeamLengths = ",".join(map(str, DEFAULT_BEAM_LENGTHS)),
    prompts: o.PromptsFile = None,
    num_prompts: o.NumPrompts = NUM_PROMPTS,
    turns: o.Turns = "1",
    max_new_tokens: o.MaxNewTokens = D["max_new_tokens"],
    temperature: o.Temperature = D["temperature"],
    top_k: o.TopK = D["top_k"],
    top_p: o.TopP = D["top_p"],
    accept: o.Accept = D["accept"],
    lookup: o.Lookup = None,
    lookup_length: o.LookupLength = None,
    datastore: o.DatastoreBeams = None,
    nodes: Annotated[str, typer.Option("--nodes", help="Node budgets to try in every cell, comma-separated: verify the N most likely drafted tokens of the cell's search (capped at the W*(L-1) it drafts); 0 = every beam.")] = "0",
    epsilon: o.Epsilon = D["epsilon"],
    delta: o.Delta = D["delta"],
    seed: o.Seed = D["seed"],
    dtype: o.Dtype = D["dtype"],
    device: o.Device = D["device"],
    quantize: o.Quantize = D["quantize"],
    device_map: o.DeviceMap = None,
    warmup: bool = typer.Option(True, help="Run plain decoding and ReDrafter once before the grid."),
    no_chat_template: o.NoChatTemplate = False,
    chat_template: o.ChatTemplate = None,
    system: o.System = None,
    json_path: o.JsonOut = None,
    csv_path: CsvOut = None,
    plot_path: PlotOut = None,
    save_best: SaveBest = False,
    batch_size: o.BatchSize = 1,
) -> None:
    """Measure every beam width x beam length on the same prompts; each cell's speedup is against
    plain decoding interleaved with it prompt by prompt."""
    # Validate everything cheap before loading models.
    if not stdout_open() and json_path is None and csv_path is None:
        raise BadInputError("standard output is closed (>&-): the results would go nowhere; pass --json or --csv FILE")
    widths = parse_int_list(beam_widths, "--beam-widths")
    lengths = parse_int_list(beam_lengths, "--beam-lengths")
    base = decode_config(max_new_tokens, None, None, accept, temperature, top_k, top_p, seed, epsilon, delta, lookup, lookup_length, datastore)
    budgets = parse_int_list(nodes, "--nodes", minimum=0)
    check_batch_size(batch_size)
    check_system(system, no_chat_template)
    cfg = SweepConfig(beam_widths=widths, beam_lengths=lengths, decode=base, warmup=warmup, tree_nodes=budgets,
                      batch_size=batch_size)
    files, folders = model_inputs(model, drafter, chat_template)
    if is_dash(json_path) and is_dash(csv_path):
        raise BadInputError("--json - and --csv - both name standard output; write one of them to a file")
    check_output_paths({"--json": json_path, "--csv": csv_path, "--plot": plot_path},
                       inputs={"--prompts": prompts, **files}, folders=folders)
    if plot_path is not None and plot_path.suffix.lower() not in PLOT_SUFFIXES:
        raise BadInputError(f"--plot must end in {', '.join(PLOT_SUFFIXES)}, got {plot_path.name!r}")
    if save_best and drafter == "random":
        raise BadInputError("--save-best needs a saved drafter (a directory, or --drafter auto with a shipped one); "
                             "--drafter random has no config.json to write the shape into")
    if save_best and max_new_tokens < 2:
        raise BadInputError("--save-best needs --max-new-tokens 2 or more: with 1, ReDrafter takes no draft step, so no "
                            "cell measures its beam shape")
    max_turns = parse_turns(turns, no_chat_template)
    own: list[str | None] = []  # each prompt's own system turn
    convs = read_conversations(prompts, num_prompts, own)
    texts = [c[0] for c in convs]
    if save_best and batch_size > len(texts):
        raise BadInputError(f"--save-best --batch-size {batch_size} needs at least {batch_size} prompts to measure "
                            f"batches of that size, got {len(texts)} (raise --num-prompts)")
    batch_size = fit_batch_size(batch_size, len(texts))
    cfg = replace(cfg, batch_size=batch_size)

    loaded = load_models(model, drafter, dtype, device, quantize, seed, device_map, chat_template,
                         templated=not no_chat_template)
    target, dr = loaded.target, loaded.drafter
    drafter_dir = _drafter_dir(drafter, loaded)
    if save_best:
        _check_writable(drafter_dir, target.name)
        shipped = shipped_drafter_dir(target.name)
        if shipped is not None and drafter_dir.resolve() == shipped.resolve():
            c = dr.config
            err.print(f"note: --save-best writes into the drafter shipped with redraft ({drafter_dir}), so bench and "
                      f"chat on this install will use the shape this sweep finds; its shipped shape is "
                      f"{c.beam_width}x{c.beam_length}" + (f" best {c.tree_nodes} nodes" if c.tree_nodes else "")
                      + " (copy the folder and pass --drafter COPY to leave it as shipped)")
    cfg.check(dr.draft_vocab_size)
    # The drafter's recommended copied beams, the same in every cell (the beam shape is per cell).
    cfg.decode = with_drafter_shape(cfg.decode, dr, cfg.decode.beam_width, cfg.decode.beam_length,
                                    lookup, lookup_length, datastore, nodes=0, batch_size=batch_size)
    note_past_training(dr, loaded.drafter_name, sorted({length for _, length, _ in cfg.shapes}), "--beam-lengths")
    ids, sent, own_systems, systems = encode_prompts(loaded, texts, own, system, no_chat_template, max_new_tokens,
                                                     prompts)
    asked = ids if max_turns == 1 else as_dialogues(target, convs, systems, max_turns, prompts)
    answers = len(ids) if max_turns == 1 else sum(map(len, asked))
    gen = Generator(target, dr)

    head = {"model": target.name, "drafter": loaded.drafter_name, "device": str(target.device),
            "dtype": str(target.compute_dtype).replace("torch.", ""), "quantize": quantize, "device_map": device_map,
            "system": sent.text, "prompt_systems": own_systems, "chat_template": loaded.chat_template, "no_chat_template": no_chat_template,
            "turns_asked": "all" if max_turns is None else max_turns}
    info = {**head, "accept": accept, "temperature": temperature, "num_prompts": len(ids),
            "max_new_tokens": max_new_tokens, "lookup_beams": cfg.decode.lookup_beams,
            "lookup_length": cfg.decode.lookup_length, "datastore_beams": cfg.decode.datastore_beams,
            "tree_nodes": budgets, "batch_size": batch_size, "turns": max(turn_counts(asked))}
    cells: list[dict[str, Any]] = []
    running: list[tuple[int, int, int] | None] = [None]
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn()]
    bar = Progress(*columns, console=err)
    task = bar.add_task("warm-up", total=None)

    class View:
        def __rich__(self) -> Group:
            return Group(bar, render(info, cfg.shapes, list(cells), running[0]))

    def progress(done: int, total: int, label: str) -> None:
        if label.startswith("cell ") and len(cells) < len(cfg.shapes):
            running[0] = cfg.shapes[len(cells)]
        bar.update(task, completed=done, total=total, description=label)

    def on_cell(cell: dict[str, Any]) -> None:
        cells.append(cell)
        if not err.is_terminal:  # no live table in a log: a line per cell
            err.print(f"cell {len(cells)}/{len(cfg.shapes)} {cell['beam_width']}x{cell['beam_length']}"
                      + (f" best {cell['tree_nodes']}" if cell.get("tree_nodes") else "")
                      + f": {shown(cell['tokens_per_step'], '.2f')} tokens/step, "
                      + (f"{cell['speedup']:.2f}x" if cell["speedup"] is not None else "no speedup measured"))

    note_short_prompt_set(texts, num_prompts, default=NUM_PROMPTS)
    if len(cfg.shapes) > LARGE_GRID:
        err.print(f"note: {len(cfg.shapes)} cells, {2 * len(cfg.shapes) * answers:,} generations; Ctrl-C keeps "
                  f"the finished cells")
    start = time.perf_counter()
    try:
        with stop_signals(), Live(View(), console=err, transient=True, refresh_per_second=4):
            result = run_sweep(gen, asked, cfg, progress, on_cell=on_cell)
    except KeyboardInterrupt:
        if not cells:
            raise
        partial = {**head, **info, **sweep_result(cfg, cells, len(ids), time.perf_counter() - start, interrupted=True,
                                                  turns=turn_counts(asked))}
        console.print(render(partial, cfg.shapes, cells, None, final=True))
        note_dropped_turns(partial)
        from ..plots import save_sweep_plot

        reports = [(kind, path) for kind, path in (("json", json_path), ("csv", csv_path)) if path is not None]
        written = [_write(partial, path, kind) or "standard output" for kind, path in reports]
        written += [str(save_sweep_plot(partial, plot_path))] if plot_path is not None else []
        err.print(f"{stopped_word()}: the results above cover the {len(cells)} of {len(cfg.shapes)} cells that finished"
                  + (f" (in {' and '.join(written)}, marked \"interrupted\")" if written else ""))  # (as bench says it)
        raise typer.Exit(interrupt_code()) from None
    result = {**head, **result}

    drafted = any(c["steps"] for c in result["cells"])  # (every answer may end at its first token)
    saved = None
    best = result["best"]
    drift = result["baseline"].get("drift")
    unsteady = drift is not None and drift > DRIFT_LIMIT
    if save_best and drafter_dir is not None and best is not None and drafted and not unsteady:
        saved = save_best_shape(result, drafter_dir)
    result["saved_best"] = str(saved) if saved else None

    console.print(render(result, cfg.shapes, result["cells"], None, final=True))
    for kind, path in (("json", json_path), ("csv", csv_path)):
        if path is not None and (written := _write(result, path, kind)) is not None:
            console.print(f"wrote {written}")
    if plot_path is not None:
        from ..plots import save_sweep_plot

        console.print(f"wrote {save_sweep_plot(result, plot_path)}")
    if not drafted:
        err.print("note: no cell took a draft step (every answer ended at its first token), so the speedups compare "
                  "prompt passes only" + (" and --save-best saved nothing" if save_best else ""))
    elif best is not None and (why := slower_note(best["speedup"], best["tokens_per_step"], batch_size,
                                                  loaded.drafter_name, subject="the fastest shape tried",
                                                  graphed=loaded.target.graphs is not None, swept=True,
                                                  beam_length=best["beam_length"],
                                                  steps_per_answer=best["steps"] / best["answers"])):
        err.print(why)
    note_dropped_turns(result)
    note_no_warmup(warmup)
    if unsteady:
        base = result["baseline"]
        refused = save_best and drafter_dir is not None and drafted
        err.print(f"note: plain decoding ran at {base['min_tokens_per_s']:.2f} to {base['max_tokens_per_s']:.2f} tokens/s "
                  f"from cell to cell (the machine's speed changed under the sweep: other work, throttling), so the "
                  f"cells' speedups do not compare" + ("; --save-best saved nothing" if refused else "")
                  + ": run the sweep again on an idle machine")
        if refused:
            raise typer.Exit(1)
    if saved is not None:
        on = "" if loaded.target.device.type == "cpu" else f" on {loaded.target.device.type}"  # device_shapes
        pace = f", {best['speedup']:.2f}x plain decoding" if best["speedup"] is not None else ""
        console.print(f"saved beam shape {best['beam_width']}x{best['beam_length']}"
                      + (f" (best {best['tree_nodes']} nodes)" if best.get("tree_nodes") else "") + pace + f" to {saved} "
                      + (f"(the default of bench and chat with this drafter{on})" if batch_size == 1 else
                         f"(the default of bench --batch-size {_batch_sizes(batch_size, dr.config.batch_shapes)} "
                         "with this drafter)"))


def _batch_sizes(batch_size: int, batch_shapes: dict) -> str:
    """The batch sizes a shape saved for `batch_size` serves: up to the next size with a shape of its own."""
    larger = [int(s) for s in batch_shapes if int(s) > batch_size]
    if not larger:
        return f"{batch_size} and larger"
    top = min(larger) - 1
    return str(batch_size) if top == batch_size else f"{batch_size} to {top}"


def _write(result: dict[str, Any], path: Path, kind: str) -> str | None:
    """The --json (kind "json") or --csv report, to its file (whose folder check_output_paths found) or,
    for '-', to standard output (common.report_to_stdout): the file written, None for standard output."""
    return write_report(path, json.dumps(result, indent=2) + "\n" if kind == "json" else csv_text(result))


def _drafter_dir(option: str, loaded: Loaded) -> Path | None:
    """The checkpoint directory the drafter came from; None for an untrained (random) one."""
    if option == "random" or loaded.drafter_name.startswith("random ("):
        return None
    return Path(loaded.drafter_name)


def _check_writable(drafter_dir: Path | None, model: str) -> None:
    if drafter_dir is None:
        raise BadInputError(f"--save-best needs a saved drafter, but no trained drafter ships for {model} "
                            "(--drafter auto fell back to an untrained one); pass --drafter DIR")
    package = Path(__file__).resolve().parents[1]
    if drafter_dir.resolve().is_relative_to(package):  # (as distill refuses an --out there)
        raise BadInputError(f"--save-best would rewrite the drafter shipped inside the redraft package "
                            f"({drafter_dir}); copy it (cp -r {drafter_dir} my-drafter) and sweep --drafter my-drafter")
    cfg_path = drafter_dir / CONFIG_NAME
    if not os.access(drafter_dir, os.W_OK) or not os.access(cfg_path, os.W_OK):
        raise BadInputError(f"--save-best cannot write {cfg_path} (read-only)")


def render(r: dict[str, Any], shapes: list[tuple[int, int, int]], cells: list[dict[str, Any]],
           running: tuple[int, int, int] | None = None, final: bool = False) -> Table:
    """The sweep table: one row per cell in run order; pending cells dim, the best one highlighted.
    A `best` column (each cell's node budget) appears when the sweep tries one."""
    copied = lookup_label(r)
    title = (f"redraft sweep: {r['model']}{precision_label(r)} | drafter {r['drafter']} | "
             f"{r['accept']} T={r['temperature']} | "
             f"{counted(r['num_prompts'], 'prompt')}"
             + (f" ({turns_label(r.get('turns_answered', r['turns']))})" if r.get("turns", 1) > 1 else "")
             + f" x {r['max_new_tokens']} tokens"
             + (f" | {copied.lstrip(' +')}" if copied else "")
             + (f" | batch {r['batch_size']}" if r.get("batch_size", 1) > 1 else ""))
    t = Table(title=title, title_justify="left", caption_justify="left")
    budgets = any(n for _, _, n in shapes)
    # Short headers: the table fits 80 columns (what Rich assumes when stdout is not a terminal).
    cols = ["width", "length"] + (["best"] if budgets else []) + ["tok/step", "accept", "nodes", "tok/s",
                                                                   "plain" if budgets else "plain tok/s", "speedup"]
    for col in cols:
        t.add_column(col, justify="right", no_wrap=True)
    done = {cell_key(c): c for c in cells}
    best = best_cell(cells)
    for w, length, n in shapes:
        key = [str(w), str(length)] + ([str(n) if n else "all"] if budgets else [])
        c = done.get((w, length, n))
        if c is None:
            state = "running" if (w, length, n) == running else "..."
            t.add_row(*key, *[""] * 5, state, style="bold yellow" if state == "running" else "dim")
            continue
        speed = f"{c['speedup']:.2f}x" if c["speedup"] is not None else "-"
        is_best = best is not None and cell_key(c) == cell_key(best)
        t.add_row(*key, shown(c['tokens_per_step'], ".2f"), shown(c['acceptance_rate'], ".1%"),
                  shown(c['mean_tree_nodes'], ".1f"), f"{c['tokens_per_s']:.2f}", f"{c['baseline_tokens_per_s']:.2f}",
                  ("* " if is_best else "") + speed, style="bold green" if is_best else None)
    if final:
        base = r["baseline"]
        drift = f", spread {base['drift']:.0%} across cells" if base.get("drift") is not None else ""
        parts = [f"plain baseline {base['tokens_per_s']:.2f} tokens/s over all cells{drift}"]
        if best is not None:
            parts.append(f"best {best['beam_width']}x{best['beam_length']}"
                         + (f" best {best['tree_nodes']} nodes" if best.get("tree_nodes") else "")
                         + f": {best['speedup']:.2f}x, "
                         f"{shown(best['tokens_per_step'], '.2f')} tokens/step")
        identical = [c["identical_outputs"] for c in cells]
        if identical and all(v is not None for v in identical):
            parts.append(f"identical outputs {sum(identical)}/{sum(c['answers'] for c in cells)}")
        if r.get("saved_best"):
            parts.append(f"saved to {r['saved_best']}")
        t.caption = " | ".join(parts)
    return t
