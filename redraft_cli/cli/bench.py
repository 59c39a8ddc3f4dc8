"""`redraft bench`: ReDrafter against plain decoding (and HF generate), one process."""

from __future__ import annotations

import json

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..bench import BenchConfig, run_bench
from ..decode import Generator
from ..errors import BadInputError
from . import options as o
from ._errors import handle_errors, interrupt_code, stop_signals, stopped_word
from .common import as_dialogues, note_dropped_turns, turns_label, counted, parse_turns, read_conversations, note_no_warmup, check_system, encode_prompts, model_inputs, check_batch_size, fit_batch_size, check_output_paths, console, stdout_open, decode_config, err, load_models, beams_label, precision_label, note_short_prompt_set, slower_note, note_past_training, shown, with_drafter_shape, write_report

D = o.DEFAULTS
NUM_PROMPTS = 10  # prompts benchmarked by default


@handle_errors
def bench(
    model: o.Model = D["model"],
    drafter: o.DrafterOpt = "auto",
    prompts: o.PromptsFile = None,
    num_prompts: o.NumPrompts = NUM_PROMPTS,
    turns: o.Turns = "1",
    max_new_tokens: o.MaxNewTokens = D["max_new_tokens"],
    temperature: o.Temperature = D["temperature"],
    top_k: o.TopK = D["top_k"],
    top_p: o.TopP = D["top_p"],
    accept: o.Accept = D["accept"],
    beam_width: o.BeamWidth = None,
    beam_length: o.BeamLength = None,
    lookup: o.Lookup = None,
    lookup_length: o.LookupLength = None,
    datastore: o.DatastoreBeams = None,
    nodes: o.TreeNodes = None,
    epsilon: o.Epsilon = D["epsilon"],
    delta: o.Delta = D["delta"],
    seed: o.Seed = D["seed"],
    dtype: o.Dtype = D["dtype"],
    device: o.Device = D["device"],
    quantize: o.Quantize = D["quantize"],
    device_map: o.DeviceMap = None,
    hf_baseline: bool = typer.Option(True, help="Also time Hugging Face model.generate() as a second baseline."),
    warmup: bool = typer.Option(True, help="Run each path once before timing."),
    batch_size: o.BatchSize = 1,
    no_chat_template: o.NoChatTemplate = False,
    chat_template: o.ChatTemplate = None,
    system: o.System = None,
    json_path: o.JsonOut = None,
) -> None:
    """Measure ReDrafter against plain decoding on the same prompts, alternating, after a warm-up."""
    # Validate everything cheap before loading models.
    if not stdout_open() and json_path is None:
        raise BadInputError("standard output is closed (>&-): the results would go nowhere; pass --json FILE")
    cfg = decode_config(max_new_tokens, beam_width, beam_length, accept, temperature, top_k, top_p, seed, epsilon, delta, lookup, lookup_length, datastore, nodes)
    files, folders = model_inputs(model, drafter, chat_template)
    check_output_paths({"--json": json_path}, inputs={"--prompts": prompts, **files}, folders=folders)
    check_batch_size(batch_size)
    check_system(system, no_chat_template)
    max_turns = parse_turns(turns, no_chat_template)
    own: list[str | None] = []  # each prompt's own system turn
    convs = read_conversations(prompts, num_prompts, own)
    texts = [c[0] for c in convs]
    batch_size = fit_batch_size(batch_size, len(texts))
    loaded = load_models(model, drafter, dtype, device, quantize, seed, device_map, chat_template,
                         templated=not no_chat_template)
    target, dr = loaded.target, loaded.drafter
    cfg = with_drafter_shape(cfg, dr, beam_width, beam_length, lookup, lookup_length, datastore, nodes, batch_size)
    if beam_length is not None:
        note_past_training(dr, loaded.drafter_name, [beam_length])
    ids, sent, own_systems, systems = encode_prompts(loaded, texts, own, system, no_chat_template, max_new_tokens,
                                                     prompts)
    asked = ids if max_turns == 1 else as_dialogues(target, convs, systems, max_turns, prompts)
    note_short_prompt_set(texts, num_prompts, default=NUM_PROMPTS)
    gen = Generator(target, dr)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("bench", total=None)

        last: list = [None, 0]  # the label and count last logged

        def progress(done: int, total: int, label: str) -> None:
            bar.update(task, completed=done, total=total, description=label)
            # Without a terminal (a log, nohup) the bar does not draw: a line at each path, and every tenth.
            if not err.is_terminal and (label != last[0] or done - last[1] >= max(1, total // 10) or done == total):
                err.print(f"bench: {done}/{total} runs ({label})")
                last[:] = [label, done]

        with stop_signals():  # (SIGTERM keeps the finished prompts, as Ctrl-C does)
            result = run_bench(gen, asked, BenchConfig(cfg, warmup=warmup, hf_baseline=hf_baseline, batch_size=batch_size),
                               progress)
    result = {"model": target.name, "drafter": loaded.drafter_name, "device": str(target.device),
              "dtype": str(target.compute_dtype).replace("torch.", ""), "quantize": quantize,
              "device_map": device_map, "system": sent.text, "prompt_systems": own_systems, "chat_template": loaded.chat_template,
              "no_chat_template": no_chat_template, "warmup": warmup,
              "turns_asked": "all" if max_turns is None else max_turns, **result}
    console.print(render(result))
    if not result["redraft"].get("steps"):
        err.print("note: ReDrafter took no draft step (every answer ended at its first token), so the speedup "
                  "compares prompt passes only")
    elif (why := slower_note(result["speedup"], result["redraft"]["tokens_per_step"], batch_size,
                             loaded.drafter_name, graphed=target.graphs is not None,
                             beam_length=cfg.beam_length,
                             steps_per_answer=result["redraft"]["steps"] / result["num_answers"])) is not None:
        err.print(why)
    graphs = result.get("cuda_graphs") or {}
    if graphs.get("failed"):
        err.print(f"note: CUDA graphs were turned off and the target ran eagerly: {graphs['failed']}")
    if graphs.get("draft_failed"):
        err.print(f"note: CUDA graphs were turned off and the drafter ran eagerly: {graphs['draft_failed']}")
    note_dropped_turns(result)
    note_no_warmup(warmup)
    if json_path is not None:
        if (written := write_report(json_path, json.dumps(result, indent=2) + "\n")) is not None:
            console.print(f"wrote {written}")
    if result.get("interrupted"):
        batched = result["batch_size"] > 1  # tokens/s: every token the batch decoded before the Ctrl-C
        done = (f"{result['num_answers']} of {result['answers_asked']} answers" if "turns" in result
                else f"{result['num_prompts']} of {result['prompts_asked']} prompts")
        err.print(f"{stopped_word()}: the results above cover the {done} that finished" + (" (tokens/s: all the batch decoded so far)" if batched else "")
                  + (" (written to --json, marked \"interrupted\")" if json_path else ""))
        raise typer.Exit(interrupt_code())


def render(r: dict) -> Table:
    """The bench table: one row per path, then the ReDrafter statistics."""
    red, base = r["redraft"], r["baseline"]
    title = (f"redraft bench: {r['model']}{precision_label(r)} | drafter {r['drafter']} | "
             f"{r['accept']} T={r['temperature']} | "
             f"beams {beams_label(r)} | {counted(r['num_prompts'], 'prompt')}"
             + (f" ({counted(r['num_answers'], 'answer')}, {turns_label(len(r['by_turn']))})" if "turns" in r else "")
             + f" x {r['max_new_tokens']} tokens"
             + (f" | batch {r['batch_size']}" if r.get("batch_size", 1) > 1 else ""))
    t = Table(title=title, title_justify="left")
    for col in ("path", "tokens", "seconds", "tokens/s", "speedup"):
        t.add_column(col, justify="right" if col != "path" else "left")
    t.add_row("plain (redraft)", str(base["tokens"]), f"{base['seconds']:.2f}", f"{base['tokens_per_s']:.2f}", "1.00x")
    if "baseline_hf" in r:
        hf = r["baseline_hf"]
        ratio = hf["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0
        t.add_row("plain (HF generate)", str(hf["tokens"]), f"{hf['seconds']:.2f}", f"{hf['tokens_per_s']:.2f}", f"{ratio:.2f}x")
    t.add_row("[bold]ReDrafter[/]", str(red["tokens"]), f"{red['seconds']:.2f}", f"{red['tokens_per_s']:.2f}",
              f"[bold]{r['speedup']:.2f}x[/]" if r["speedup"] is not None else "-")
    t.caption = (
        f"tokens/step {shown(red['tokens_per_step'], '.2f')} | acceptance {shown(red['acceptance_rate'], '.1%')} | "
        f"tree nodes {shown(red['mean_tree_nodes'], '.1f')} | split draft {shown(red['draft_share'], '.0%')} / verify "
        f"{shown(red['verify_share'], '.0%')} / accept {shown(red['accept_share'], '.0%')} | "
        f"per {'pass' if r.get('batch_size', 1) > 1 else 'step'} "  # (a batched pass holds several rows' steps)
        + (" / ".join(f"{1000 * red[k] / red['passes']:.1f}" for k in ("draft_s", "verify_s", "accept_s")) + " ms"
           if red["passes"] else "-")
        + (f" | {red['steps'] / red['passes']:.1f} busy rows per pass of {r['batch_size']}"
           if r.get("batch_size", 1) > 1 and red["passes"] else "")
        + (f" | identical outputs {r['identical_outputs']}/{r['num_answers']}" if r["identical_outputs"] is not None else "")
        + (" | tokens/step by turn " + " / ".join(shown(t["tokens_per_step"], ".2f") for t in r["by_turn"])
           if "by_turn" in r else "")
        + (f" | vs HF {r['speedup_vs_hf']:.2f}x" if r.get("speedup_vs_hf") else "")
        + (" | CUDA graphs" if (r.get("cuda_graphs") or {}).get("target") else "")
    )
    t.caption_justify = "left"
    return t
