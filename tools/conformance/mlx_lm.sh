#!/usr/bin/env bash
# mlx-lm on mlx[cpu], in its own virtualenv (not CI). Usage: tools/conformance/mlx_lm.sh [--examples N]
# Needs the shared models first: PYTHONPATH=.:tests python tools/conformance/make_tiny.py
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-$HOME/.cache/minillm-conformance/venv-mlx}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "mlx[cpu]" mlx-lm hypothesis
  "$VENV/bin/pip" install -q --no-deps -e "$REPO"
  "$VENV/bin/pip" install -q safetensors sentencepiece tokenizers huggingface_hub jinja2 tqdm numpy gguf
fi
exec "$VENV/bin/python" "$REPO/tools/conformance/mlx_lm_check.py" "$@"
