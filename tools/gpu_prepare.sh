#!/usr/bin/env bash
# Run HERE (CPU) before tools/gpu_train.sh: the GPU machine has no corpus and no network, so the
# two tokenizers and the tokenized corpus are made here, into runs/gpu_input/ (about 10 MB):
#   tok-bpe/   byte-level BPE tokenizer.json, 4096 tokens (MPT, Pythia and Falcon models)
#   tok-sp/    sentencepiece tokenizer.model, 4096 tokens (the Llama model)
#   data-bpe.safetensors, data-sp.safetensors   train and held-out token ids for each
# Deterministic: a rerun writes identical files.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
IN=${IN:-runs/gpu_input}
export PYTHONPATH=.
mkdir -p "$IN"
"$PY" tools/train.py tokenizer --out "$IN/tok-bpe" --vocab 4096
"$PY" tools/train.py tokenizer --out "$IN/tok-sp" --vocab 4096 --sentencepiece
"$PY" tools/train.py data --tokenizer "$IN/tok-bpe" --out "$IN/data-bpe.safetensors"
"$PY" tools/train.py data --tokenizer "$IN/tok-sp" --out "$IN/data-sp.safetensors"
du -sh "$IN"
(cd "$IN" && sha256sum tok-bpe/tokenizer.json tok-sp/tokenizer.model data-bpe.safetensors data-sp.safetensors)
