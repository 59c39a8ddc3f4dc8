"""Time and profile the target passes that decoding makes, on any device.

    python scripts/profile_pass.py [--model smollm2-135m] [--device cpu|cuda|mps]
        [--nodes 1,9,27] [--capacity N] [--hf] [--profile]

For each node count n it times one lean pass over n tree tokens (n = 1: one
token of plain decoding) after a prompt, LM head included, as decoding runs
it (`Target.forward_tree` + `Target.logits`, cache commit); `--hf` also times
Hugging Face's own one-token forward with a DynamicCache, the step of
`generate()`. `--profile` prints torch.profiler's table for the one-token
pass (CUDA kernels too on a GPU), and the number of host syncs.

On the H200 lent in session 14 a one-token plain step took ~94 ms against
~49 ms for `generate()`'s, with the same number of kernels per layer on the
CPU (2,852 dispatched ops against 2,307): this is the script to find why.
`--gqa native` against `--gqa fold` measures session 15's suspect (masked
`enable_gqa` attention runs on SDPA's math backend on CUDA).
"""

from __future__ import annotations

import argparse
import time

import torch

from redraft_cli.decode import _sync
from redraft_cli.target import TargetSpec, load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--nodes", default="1,9,27")
    ap.add_argument("--capacity", type=int, default=0, help="KV slots per row (0: prompt + 256)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--hf", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--gqa", choices=("auto", "fold", "native"), default="auto",
                    help="grouped-query attention off the batch-invariant path: fold query groups into extra "
                         "queries (the default off the CPU) or SDPA's enable_gqa (the CPU's); for an A/B on a GPU")
    ap.add_argument("--graphs", choices=("auto", "on", "off", "both"), default="auto",
                    help="CUDA graphs of the lean pass (cuda_graphs.py; on by default on CUDA); both: time each")
    args = ap.parse_args()

    t = load_target(TargetSpec(args.model, dtype=args.dtype, device=args.device))
    dev = t.device
    if t.lean is not None and args.gqa != "auto":
        t.lean.fold_gqa = args.gqa == "fold" and t.lean.kv_heads != t.lean.num_heads
    ids = torch.tensor([t.encode_chat("Tell me about Paris and its history in some detail.")], device=dev)
    P = ids.shape[1]
    print(f"{t.describe()}: prompt {P} tokens, lean path: {t.lean is not None}, "
          f"batch-invariant: {t.batch_invariant}, folded GQA: {t.lean is not None and t.lean.fold_gqa}")

    def fresh():
        cache = t.new_tree_cache(1, args.capacity or P + 256 + 64)
        mask = torch.ones(1, P, P, dtype=torch.bool, device=dev).tril()
        h = t.forward_tree(ids, torch.arange(P, device=dev).view(1, P), cache, mask)
        cache.commit(torch.arange(P, device=dev).view(1, P), torch.tensor([P], device=dev))
        return cache, t.logits(h[:, -1]).argmax(-1)

    def tree_pass(cache, tok, n):
        """n tokens as a chain (a tree's cost depends on its node count, not its shape); keep 1."""
        toks = tok.view(1, 1).expand(1, n)
        pos = cache.lengths.view(1, 1) + torch.arange(n, device=dev).view(1, n)
        mask = torch.ones(1, n, n, dtype=torch.bool, device=dev).tril()
        hidden = t.forward_tree(toks, pos, cache, mask)
        if n == 1:  # as plain decoding keeps its token
            cache.advance(1)
        else:
            cache.commit(torch.zeros(1, 1, dtype=torch.long, device=dev), torch.ones(1, dtype=torch.long, device=dev))
        out = t.logits(hidden).argmax(-1)[:, 0]
        return out if dev.type != "cuda" else out.view(1)

    graphs = t.graphs
    modes = {"auto": [graphs is not None], "on": [True], "off": [False], "both": [False, True]}[args.graphs]
    if any(modes) and graphs is None:
        raise SystemExit("CUDA graphs need the lean path on a CUDA device")
    for graphed in modes:
        t.graphs = graphs if graphed else None
        for n in (int(x) for x in args.nodes.split(",")):
            cache, tok = fresh()
            for _ in range(3):
                tok = tree_pass(cache, tok, n)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                tok = tree_pass(cache, tok, n)
                int(tok[0])  # decoding reads each token on the host
            _sync(dev)
            label = "graphed" if graphed else "lean"
            print(f"{label} pass of {n:3d} tokens: {1000 * (time.perf_counter() - t0) / args.repeats:7.2f} ms")
        if graphed:
            print(f"graphs: {graphs.captures} captured, {graphs.passes} passes, failed: {graphs.failed}")
    t.graphs = None  # the profile below is of the eager pass

    if args.hf:
        from transformers import DynamicCache

        with torch.no_grad():
            hc = DynamicCache(config=t.model.config)
            nt = t.model(input_ids=ids, past_key_values=hc, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(3):
                nt = t.model(input_ids=nt, past_key_values=hc, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                nt = t.model(input_ids=nt, past_key_values=hc, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                int(nt[0, 0])
            _sync(dev)
        print(f"HF one-token forward:     {1000 * (time.perf_counter() - t0) / args.repeats:7.2f} ms")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        cache, tok = fresh()
        tok = tree_pass(cache, tok, 1)
        with profile(activities=acts) as prof:
            for _ in range(5):
                tok = tree_pass(cache, tok, 1)
                int(tok[0])
        key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=30))
        syncs = sum(e.count for e in prof.key_averages() if e.key in ("aten::_local_scalar_dense", "aten::equal",
                                                                        "cudaStreamSynchronize", "cudaDeviceSynchronize"))
        print(f"host syncs in 5 one-token passes: {syncs}")


if __name__ == "__main__":
    main()
