"""attention_sinks 0.4.0 (transformers 4.34) as a sink-cache engine.

attention_sinks trims its cache to `attention_sink_size + attention_sink_window_size` keys *after*
each forward, so a new token sees one key more than that: minillm's window = that window + 1. Keys
are re-rotated to their cache positions at every step (the cache convention). A chunk is one
forward, trimmed only after it.

    tools/conformance/attention_sinks.sh        (makes its virtualenv, then runs this)
"""

import sys
from importlib.metadata import version
from pathlib import Path

import torch
from attention_sinks import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import main  # noqa: E402


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
main("attention_sinks", f"attention_sinks {version('attention_sinks')}, transformers {version('transformers')}",
     loaded, lambda model, sinks, window: SinksEngine(model), "attention-sinks")
