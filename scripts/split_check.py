"""Greedy ReDrafter on a target whose layers sit on two devices: output must equal plain decoding's.

`--device-map` spreads a target over GPUs with accelerate; with one GPU this
script makes the same kind of split by hand (the embedding, the LM head and
the first half of the layers on cuda:0, the rest and the final norm on the
CPU), so the cross-device path runs on any machine with one GPU: hidden states
and logits come back to the embedding's device, each layer's KV cache
commits on its own device, the drafter's tied LM-head rows are copied to its
device. Without a GPU both halves are on the CPU (a smoke run only).

    python scripts/split_check.py                  # the embedded default and its shipped drafter
    python scripts/split_check.py --drafter random --prompts 3 --max-new-tokens 48
    python scripts/split_check.py --model path/to/llama-dir --dtype bfloat16 --drafter path/to/drafter
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def split_target(model: str, second: str, dtype: torch.dtype):
    """A Llama-family checkpoint (directory, or the alias smollm2-135m) loaded with an explicit
    device map over cuda:0 (or the CPU without a GPU) and `second`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from redraft_cli.target import EMBEDDED, Target, _convert_embedded

    src = str(_convert_embedded(model)) if model in EMBEDDED else model
    first = "cuda:0" if torch.cuda.is_available() else "cpu"
    n = AutoConfig.from_pretrained(src).num_hidden_layers
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "lm_head": first, "model.norm": second,
                  **{f"model.layers.{i}": first if i < n // 2 else second for i in range(n)}}
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, device_map=device_map).eval()
    return Target(hf, AutoTokenizer.from_pretrained(src), name=model)


def main() -> int:
    from redraft_cli import DecodeConfig, Generator
    from redraft_cli.bench import BenchConfig, run_bench
    from redraft_cli.cli.common import resolve_drafter, with_drafter_shape
    from redraft_cli.prompts import load_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a Llama-family checkpoint directory, or the alias")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--drafter", default="auto")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    target = split_target(args.model, "cpu", getattr(torch, args.dtype))
    drafter, name = resolve_drafter(target, args.drafter, seed=0)
    cfg = with_drafter_shape(DecodeConfig(max_new_tokens=args.max_new_tokens), drafter, None, None)
    prompts = [target.encode_chat(p) for p in load_prompts(None, limit=args.prompts)]
    result = run_bench(Generator(target, drafter), prompts, BenchConfig(cfg, warmup=False, hf_baseline=False))
    report = {"devices": target.devices, "lean": target.lean is not None, "drafter": name,
              "identical": f"{result['identical_outputs']}/{len(prompts)}",
              "tokens_per_step": result["redraft"]["tokens_per_step"]}
    print(json.dumps(report))
    return 0 if result["identical_outputs"] == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
