"""A/B of CUDA graphs (cuda_graphs.py) on the embedded default, in one process (one model load).

    python scripts/gpu_ab.py [--device cuda] [--num-prompts 3] [--max-new-tokens 64] [--out DIR]

For each of: graphs on, graphs off (eager), it runs `run_bench` at the shipped drafter's recommended
shape (HF generate() timed once, with the first), then a wide tree (8x5, every node, 1 lookup up to
32, 2 datastore beams) with graphs on. Prints one line per run and writes each result as JSON to
--out. Meant for a short GPU lease (scripts/gpu_checks.sh runs it); on the CPU it runs the eager
rows only.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from redraft_cli import Drafter, Generator, load_target, shipped_drafter_dir
from redraft_cli.bench import BenchConfig, run_bench
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
    ap.add_argument("--num-prompts", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default="/tmp/gpu-ab")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    target = load_target("smollm2-135m", device=args.device)
    drafter = Drafter.load(shipped_drafter_dir("smollm2-135m"), map_location=target.device)
    print(f"{target.describe()}: loaded in {time.perf_counter() - t0:.1f} s; graphs: {target.graphs is not None}")
    ids = [target.encode_chat(p) for p in load_prompts(limit=args.num_prompts)]
    shipped = drafter.decode_config(max_new_tokens=args.max_new_tokens)
    wide = drafter.decode_config(max_new_tokens=args.max_new_tokens, beam_width=8, beam_length=5, tree_nodes=0,
                                 datastore_beams=2)
    graphs = target.graphs
    runs = [("graphs", graphs, shipped, True), ("eager", None, shipped, False), ("graphs-wide", graphs, wide, False),
            ("eager-wide", None, wide, False)]
    for name, runner, cfg, hf in runs:
        if name.startswith("graphs") and graphs is None:
            continue
        target.graphs = runner
        start = time.perf_counter()
        r = run_bench(Generator(target, drafter), ids, BenchConfig(cfg, hf_baseline=hf))
        print(line(name, r) + f" | {time.perf_counter() - start:.0f} s", flush=True)
        (out / f"ab-{name}.json").write_text(json.dumps(r, indent=2) + "\n")
    target.graphs = graphs


if __name__ == "__main__":
    main()
