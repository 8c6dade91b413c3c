#!/usr/bin/env bash
# Train every shipped model at once on ONE GPU, from the repo root, with $OUT set:
#     OUT=/some/dir bash tools/gpu_train.sh
# Needs runs/gpu_input/ from tools/gpu_prepare.sh (carry it to the GPU machine).
#
# Small models underuse an H100, so all of them train concurrently as background processes.
# Each has --time-limit $TIME_LIMIT seconds from its start (default 300): it fits its step count
# to the limit after a calibration, then stops, evaluates and exports in time, so the whole
# script takes about TIME_LIMIT + 20 s. It writes only what must come back (8 files at most,
# each <= 16 MiB): $OUT/<name>.safetensors (float16 weights) per model, and $OUT/logs.tar.gz
# with each model's config.json, train_log.json, tokenizer files and stdout log.
# tools/gpu_unpack.sh then assembles weights/<name>/ here.
#
#   MODELS="llama-tiny mpt-tiny"   train a subset
#   SMOKE=1                        the same command lines, a few CPU steps (bf16 autocast on CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
PY=${PYTHON:-$(command -v python || command -v python3)}
IN=${IN:-runs/gpu_input}
WORK=${WORK:-runs/gpu_work}
LIMIT=${TIME_LIMIT:-300}
MODELS=${MODELS:-"llama-tiny mpt-tiny pythia-tiny pythia-tiny-sink pythia-tiny-zerosink falcon-tiny"}
export PYTHONPATH=.

for f in "$IN/data-bpe.safetensors" "$IN/data-sp.safetensors" "$IN/tok-bpe/tokenizer.json" "$IN/tok-sp/tokenizer.model"; do
    [ -f "$f" ] || { echo "gpu_train.sh: missing $f (run tools/gpu_prepare.sh first)" >&2; exit 2; }
done

# Shared by every model: 6 layers, hidden 256, 8 heads (head_dim 32), context 512, BOS at
# position 0 of every sample, 30 epochs of the ~2.0M train tokens unless the time runs out first,
# AdamW lr 3e-3 (200 warm-up steps, cosine to 10%), weight decay 0.1, grad clip 1.0, bf16
# autocast; the best held-out checkpoint is exported (the small corpus overfits).
common=(--layers 6 --hidden 256 --heads 8 --context 512 --batch 32 --epochs 30 --lr 3e-3 --warmup 200
        --weight-decay 0.1 --seed 0 --device cuda --dtype float16 --eval-every 200 --eval-windows 128
        --log-every 100 --save-every 1000 --keep-best --time-limit "$LIMIT" --threads 2)
if [ "${SMOKE:-0}" = 1 ]; then  # same shapes and flags, a few short CPU steps
    common=(--layers 6 --hidden 256 --heads 8 --context 64 --batch 2 --steps 3 --lr 3e-3 --warmup 2
            --weight-decay 0.1 --seed 0 --device cpu --amp bf16 --dtype float16 --eval-every 3
            --eval-windows 2 --log-every 1 --save-every 2 --keep-best --time-limit "$LIMIT" --threads 1)
fi
BPE=(--data "$IN/data-bpe.safetensors" --tokenizer "$IN/tok-bpe")
SP=(--data "$IN/data-sp.safetensors" --tokenizer "$IN/tok-sp")

model_args() {
    case "$1" in
        llama-tiny)           echo --family llama --kv-heads 4 --intermediate 688 "${SP[@]}" ;;
        mpt-tiny)             echo --family mpt --intermediate 768 "${BPE[@]}" ;;
        pythia-tiny)          echo --family gpt_neox --intermediate 512 "${BPE[@]}" ;;
        pythia-tiny-sink)     echo --family gpt_neox --intermediate 512 --sink-token "${BPE[@]}" ;;
        pythia-tiny-zerosink) echo --family gpt_neox --intermediate 512 --zero-sink "${BPE[@]}" ;;
        falcon-tiny)          echo --family falcon --kv-heads 1 --intermediate 768 "${BPE[@]}" ;;
        *) return 1 ;;
    esac
}

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
start=$(date +%s)
declare -A pid
for name in $MODELS; do
    args=$(model_args "$name") || { echo "gpu_train.sh: unknown model $name" >&2; exit 2; }
    # SIGTERM (the backstop) makes train.py stop, save and export; SIGKILL 30 s later.
    # shellcheck disable=SC2086
    timeout -s TERM -k 30 $((LIMIT + 60)) "$PY" tools/train.py model $args "${common[@]}" --out "$WORK/$name" \
        > "$WORK/$name.log" 2>&1 &
    pid[$name]=$!
    echo "started $name (pid ${pid[$name]}): python tools/train.py model $args ${common[*]} --out $WORK/$name"
done

failed=0
packed=()
for name in $MODELS; do
    wait "${pid[$name]}"
    rc=$?
    tail -n 2 "$WORK/$name.log" | sed "s/^/[$name] /"
    if [ $rc -ne 0 ] || [ ! -f "$WORK/$name/model.safetensors" ]; then
        echo "gpu_train.sh: $name FAILED (exit $rc); last lines of its log:" >&2
        tail -n 20 "$WORK/$name.log" >&2
        failed=1
    else
        cp "$WORK/$name/model.safetensors" "$OUT/$name.safetensors"
        packed+=("$name")
    fi
done

# One archive with everything but the weights (and the resumable training state).
files=()
for name in $MODELS; do
    files+=("$name.log")
    for f in "$WORK/$name"/*; do
        [ -e "$f" ] || continue
        case "$(basename "$f")" in model.safetensors|train_state) ;; *) files+=("$name/$(basename "$f")") ;; esac
    done
done
tar czf "$OUT/logs.tar.gz" -C "$WORK" "${files[@]}"

echo "--- returned files ($(( $(date +%s) - start )) s):"
limit=$((16 * 1024 * 1024))
total=0
for f in "$OUT"/*; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    printf '%10d  %s\n' "$size" "$(basename "$f")"
    if [ "$size" -gt "$limit" ]; then echo "gpu_train.sh: $f is over 16 MiB" >&2; failed=1; fi
done
echo "total $total bytes in $(ls "$OUT" | wc -l) files"
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then echo "gpu_train.sh: over 64 MiB in total" >&2; failed=1; fi
exit $failed
