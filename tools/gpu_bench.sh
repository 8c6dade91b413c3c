#!/usr/bin/env bash
# The GPU benchmark of issue 6, one shot, from the repo root with $OUT set:
#     OUT=/some/dir bash tools/gpu_bench.sh
# About 3 minutes on an H100 (python, CUDA and transformers start-up included); the bench starts
# no section after BUDGET seconds (default 120) and the whole run is killed at LIMIT (default
# 210 s). It writes 3 files: $OUT/bench.json (rewritten after every section, so a
# partial run still reports), $OUT/bench.png and $OUT/bench.log (stdout + stderr + nvidia-smi).
#
# What runs (bfloat16, sections in this order, cheapest and most important first):
#   recompute  134M and Llama-2-7B-shaped (built on the GPU in bf16), S = 1024 and 4096
#   bandwidth  read bandwidth (sum over a 4 GiB float32 tensor) vs decode bytes, 134M and 7B
#   hf         minillm vs transformers generate(), 2,048-token prompt + 256 tokens, 134M only
#              (a 7B checkpoint written and read back would not fit the time)
#   compile    torch.compile(mode="reduce-overhead") of the 134M decode step vs eager
#
#   SMOKE=1    the same command lines at toy sizes on the CPU (bf16), to test this script anywhere
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH=. PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/bench.log"

if [ "${SMOKE:-0}" = 1 ]; then
    args=(--device cpu --dtype bfloat16 --threads 1 --models smoke --sizes 64,256 --cache-size 64
          --prompt 128 --new-tokens 16 --steps 5 --bw-gib 0.25 --no-hf-compile
          --compile-kwargs '{"mode": "reduce-overhead"}')
    BUDGET=${BUDGET:-150}
else
    args=(--device cuda --dtype bfloat16 --recompute-models 134M,7B --sizes 1024,4096
          --bw-models 134M,7B --hf-models 134M --no-hf-compile --compile-models 134M --steps 20 --bw-gib 4)
    BUDGET=${BUDGET:-120}
fi
LIMIT=${LIMIT:-210}

{
    echo "gpu_bench.sh: $(date -u +%FT%TZ), SMOKE=${SMOKE:-0}, budget ${BUDGET}s, limit ${LIMIT}s"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"

timeout -k 10 "$LIMIT" "$PY" tools/bench.py "${args[@]}" --only recompute,bandwidth,hf,compile --reps 5 \
    --budget "$BUDGET" --json "$OUT/bench.json" --png "$OUT/bench.png" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
case $rc in
    0) note=ok ;;
    124|137) note="killed at the ${LIMIT}s limit: bench.json and bench.png hold the sections that finished" ;;
    *) note="failed: see the traceback above" ;;
esac
echo "gpu_bench.sh: bench exit code $rc ($note)" | tee -a "$LOG"
command -v nvidia-smi >/dev/null && nvidia-smi >> "$LOG" 2>&1
ls -l "$OUT" | tee -a "$LOG"
exit "$rc"
