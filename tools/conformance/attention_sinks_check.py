"""attention_sinks 0.4.0 (transformers 4.34) as a sink-cache engine.

attention_sinks trims its cache to `attention_sink_size + attention_sink_window_size` keys *after*
each forward, so a new token sees one key more than that: minillm's window = that window + 1. Keys
are re-rotated to their cache positions at every step (the cache convention). A chunk is one
forward, trimmed only after it.

    tools/conformance/attention_sinks.sh        (makes its virtualenv, then runs this)
"""

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from attention_sinks import AutoModelForCausalLM

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


class SinksEngine:
    def __init__(self, model):
        self.model = model
        self.reset()

    def reset(self):
        self.past = None

    @torch.no_grad()
    def feed(self, ids):
        out = self.model(input_ids=torch.tensor([ids]), past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[0].float()


def loaded(path, sinks, window):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attention_sink_size=sinks,
                                                attention_sink_window_size=window - 1).eval()


torch.set_num_threads(1)
v = f"attention_sinks {version('attention_sinks')}, transformers {version('transformers')}"
if not a.no_tiny:
    tiny = loaded(a.tiny, 4, 12)
    run("attention_sinks", v, "tiny-llama", lambda: SinksEngine(tiny), a.tiny, sinks=4, window=12,
        examples=a.examples, out_name="attention-sinks-tiny")
if a.smollm2 and Path(a.smollm2).exists():
    smol = loaded(a.smollm2, 4, 28)
    run("attention_sinks", v, "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32 safetensors)",
        lambda: SinksEngine(smol), a.smollm2, sinks=4, window=28, examples=max(4, a.examples // 5),
        conventions=a.conventions.split(","), feeds=a.feeds.split(","), out_name="attention-sinks-smollm2" + a.suffix)
