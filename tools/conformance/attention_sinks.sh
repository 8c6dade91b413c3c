#!/usr/bin/env bash
# attention_sinks 0.4.0 (pins transformers 4.34; needs einops, which it does not declare), in its own
# virtualenv (not CI). Usage: tools/conformance/attention_sinks.sh [--examples N]
# Needs the shared models first: PYTHONPATH=.:tests python tools/conformance/make_tiny.py
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-$HOME/.cache/minillm-conformance/venv-attention-sinks}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q attention_sinks==0.4.0 einops hypothesis
  # minillm without its dependency list: its tokenizers>=0.19 conflicts with transformers 4.34's
  # tokenizers<0.15, and the kit does not load tokenizers.
  "$VENV/bin/pip" install -q --no-deps -e "$REPO"
  "$VENV/bin/pip" install -q safetensors sentencepiece huggingface_hub jinja2 tqdm numpy
fi
exec "$VENV/bin/python" "$REPO/tools/conformance/attention_sinks_check.py" "$@"
