"""mlx-lm (on `mlx[cpu]`) as a sink-cache engine: one `RotatingKVCache(max_size=S, keep=sinks)` per
layer, the model called on each chunk as mlx-lm's generate does. Checked token by token and in
the kit's chunk schedules, in both conventions.

    tools/conformance/mlx_lm.sh        (makes its virtualenv, then runs this)
"""

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.utils import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tiny", default="/tmp/minillm-conformance/tiny-llama")
p.add_argument("--smollm2", default="/tmp/minillm-conformance/smollm2-135m", help="'' to skip")
p.add_argument("--examples", type=int, default=30)
p.add_argument("--no-tiny", action="store_true")
p.add_argument("--suffix", default="", help="appended to the SmolLM2 JSON name")
p.add_argument("--conventions", default="cache,absolute", help="for SmolLM2")
p.add_argument("--feeds", default="token,chunks", help="for SmolLM2")
a = p.parse_args()


class MLXEngine:
    def __init__(self, model, sinks, window):
        self.model, self.sinks, self.S = model, sinks, sinks + window
        self.reset()

    def reset(self):
        self.cache = [RotatingKVCache(max_size=self.S, keep=self.sinks) for _ in self.model.layers]

    def feed(self, ids):
        logits = self.model(mx.array([ids]), cache=self.cache)[0].astype(mx.float32)
        mx.eval(logits)
        return torch.from_numpy(np.array(logits))


def loaded(path):
    out = load_model(Path(path))
    return out[0] if isinstance(out, tuple) else out


mx.set_default_device(mx.cpu)
v = f"mlx-lm {version('mlx-lm')}, mlx {version('mlx')}"
if not a.no_tiny:
    tiny = loaded(a.tiny)
    run("mlx-lm", v, "tiny-llama", lambda: MLXEngine(tiny, 4, 12), a.tiny, sinks=4, window=12, examples=a.examples,
        out_name="mlx-lm-tiny")
if a.smollm2 and Path(a.smollm2).exists():
    smol = loaded(a.smollm2)
    run("mlx-lm", v, "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32 safetensors)",
        lambda: MLXEngine(smol, 4, 28), a.smollm2, sinks=4, window=28, examples=max(4, a.examples // 5),
        conventions=a.conventions.split(","), feeds=a.feeds.split(","), out_name="mlx-lm-smollm2" + a.suffix)
