"""The verify-cost curve: time of one target pass over n tree nodes / time for 1 node.

ReDrafter pays T(n) per step for n tree nodes and gains tokens per step; where
T(n)/T(1) stays near 1 (memory-bound hardware) big trees are cheap, where it
grows (compute-bound CPUs) small trees win. Runs the lean Llama-family path
(static KV cache, a chain-shaped tree mask) after a prompt of --context tokens.

    python scripts/verify_curve.py                       # the embedded default, --dtype auto
    python scripts/verify_curve.py --llama7b --dtype bfloat16 --device cuda   # random weights, 7B shape
    python scripts/verify_curve.py --json curve.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build_target(args: argparse.Namespace):
    from redraft_cli.target import Target, load_target, resolve_device

    if not args.llama7b:
        return load_target(args.model, dtype=args.dtype, device=args.device)
    from transformers import LlamaConfig, LlamaForCausalLM

    device = resolve_device(args.device)
    dtype = {"auto": torch.bfloat16, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "float32": torch.float32}[args.dtype]
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    return Target(model, tokenizer=None, name="random-llama-7b-shape")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(target, sizes: list[int], context: int, repeats: int) -> dict[int, float]:
    if target.lean is None:
        raise SystemExit(f"{target.name} does not take the lean Llama-family path")
    dev = target.device
    cache = target.new_tree_cache(1, context + max(sizes) + 2)
    ids = torch.randint(0, target.vocab_size, (1, context), device=dev)
    pos = torch.arange(context, device=dev).unsqueeze(0)
    target.forward_tree(ids, pos, cache, torch.ones(context, context, dtype=torch.bool, device=dev).tril()[None])
    cache.commit(pos, torch.tensor([context], device=dev))
    out = {}
    for n in sizes:
        tok = torch.randint(0, target.vocab_size, (1, n), device=dev)
        p = context + torch.arange(n, device=dev).unsqueeze(0)
        mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril()[None]
        run = lambda: target.logits(target.forward_tree(tok, p, cache, mask))  # noqa: E731
        for _ in range(2):
            run()
        sync(dev)
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        sync(dev)
        out[n] = (time.perf_counter() - start) / repeats
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--llama7b", action="store_true", help="a random-weight Llama-7B-shaped target instead")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--sizes", default="1,2,4,8,12,16,20,24,32,48,64")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args()
    target = build_target(args)
    sizes = [int(s) for s in args.sizes.split(",")]
    times = measure(target, sizes, args.context, args.repeats)
    base = times[sizes[0]]
    print(f"{target.describe()}, context {args.context}, threads {torch.get_num_threads()}")
    print(f"{'n':>4} {'ms':>9} {'T(n)/T(1)':>10}")
    for n in sizes:
        print(f"{n:>4} {1000 * times[n]:>9.2f} {times[n] / base:>10.3f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"target": target.describe(), "context": args.context,
                       "ms": {n: round(1000 * t, 3) for n, t in times.items()},
                       "ratio": {n: round(t / base, 4) for n, t in times.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
