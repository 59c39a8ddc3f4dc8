"""A/B of CUDA graphs (cuda_graphs.py) and the exact CUDA path (invariance.cuda_invariant_rows) on
the embedded default, in one process (one model load).

    python scripts/gpu_ab.py [--device cuda] [--num-prompts 5] [--max-new-tokens 96] [--eager-prompts 2]

Runs `run_bench` at the shipped drafter's recommended shape and at a wide tree (8x5, every node,
1 lookup up to 32, 2 datastore beams), each with graphs on the exact path (the default) and on the
plain CUDA path (REDRAFT_CUDA_EXACT=0); the shipped shape also with the drafter's search eager;
then the exact path eagerly on --eager-prompts prompts.
HF generate() is timed once, with the first. One line per run; each result as JSON in --out.
Meant for a short GPU lease (scripts/gpu_checks.sh runs it); on the CPU it runs the eager row only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from redraft_cli import Drafter, Generator, load_target, shipped_drafter_dir
from redraft_cli.bench import BenchConfig, run_bench
from redraft_cli.cuda_graphs import GraphedForward
from redraft_cli.prompts import load_prompts


def line(name: str, r: dict) -> str:
    red, base = r["redraft"], r["baseline"]
    hf = r.get("baseline_hf")
    graphs = r.get("cuda_graphs")
    return (f"{name:12s} plain {base['tokens_per_s']:7.1f} tok/s"
            + (f" | HF {hf['tokens_per_s']:7.1f}" if hf else "")
            + f" | ReDrafter {red['tokens_per_s']:7.1f} = {r['speedup']:.2f}x"
            + f" | {red['tokens_per_step']:.2f} tok/step, {red['mean_tree_nodes']:.1f} nodes"
            + f" | ms/step draft {1000 * red['draft_s'] / max(red['passes'], 1):.1f}"
            + f" verify {1000 * red['verify_s'] / max(red['passes'], 1):.1f}"
            + f" accept {1000 * red['accept_s'] / max(red['passes'], 1):.1f}"
            + f" | identical {r['identical_outputs']}/{r['num_prompts']}"
            + (f" | graphs {graphs}" if graphs else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--num-prompts", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--eager-prompts", type=int, default=2)
    ap.add_argument("--out", default="/tmp/gpu-ab")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    target = load_target("smollm2-135m", device=args.device)
    drafter = Drafter.load(shipped_drafter_dir("smollm2-135m"), map_location=target.device)
    lean = target.lean
    exact = (lean.good_rows, lean.row_limit, lean.batch_invariant)
    print(f"{target.describe()}: loaded in {time.perf_counter() - t0:.1f} s; graphs: {target.graphs is not None}; "
          f"batch-invariant: {lean.batch_invariant}, good rows {sorted(lean.good_rows or [])} below {lean.row_limit}")
    ids = [target.encode_chat(p) for p in load_prompts(limit=args.num_prompts)]
    shipped = drafter.decode_config(max_new_tokens=args.max_new_tokens)
    wide = drafter.decode_config(max_new_tokens=args.max_new_tokens, beam_width=8, beam_length=5, tree_nodes=0,
                                 datastore_beams=2)
    cuda = target.graphs is not None
    # (name, graphs: "all" | "target" (drafter eager) | "none", exact path, shape, time HF generate())
    runs = [("exact", "all", True, shipped, True), ("exact-no-draft-graph", "target", True, shipped, False),
            ("inexact", "all", False, shipped, False), ("exact-wide", "all", True, wide, False),
            ("inexact-wide", "all", False, wide, False), ("eager-exact", "none", True, shipped, False)]
    for name, graphed, invariant, cfg, hf in runs:
        if graphed != "none" and not cuda:
            continue
        lean.good_rows, lean.row_limit, lean.batch_invariant = exact if invariant else (None, exact[1], False)
        target.graphs = GraphedForward(lean) if graphed != "none" else None  # graphs of this path only
        gen = Generator(target, drafter)
        if graphed != "all":
            gen.proposer.graphs = None
        prompts = ids if graphed != "none" else ids[: args.eager_prompts]
        start = time.perf_counter()
        r = run_bench(gen, prompts, BenchConfig(cfg, hf_baseline=hf))
        print(line(name, r) + f" | {time.perf_counter() - start:.0f} s", flush=True)
        (out / f"ab-{name}.json").write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
