"""mlx-lm (on `mlx[cpu]`) as a sink-cache engine: one `RotatingKVCache(max_size=S, keep=sinks)` per
layer, the model called on each chunk as mlx-lm's generate does. Checked token by token and in
the kit's chunk schedules, in both conventions.

    tools/conformance/mlx_lm.sh        (makes its virtualenv, then runs this)
"""

import sys
from importlib.metadata import version
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch
from mlx_lm.models.cache import RotatingKVCache
from mlx_lm.utils import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main  # noqa: E402


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


def loaded(path, sinks, window):  # the cache's size is the engine's, not the model's
    out = load_model(Path(path))
    return out[0] if isinstance(out, tuple) else out


mx.set_default_device(mx.cpu)
main("mlx-lm", f"mlx-lm {version('mlx-lm')}, mlx {version('mlx')}", loaded, MLXEngine, "mlx-lm")
