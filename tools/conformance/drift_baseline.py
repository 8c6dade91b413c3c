"""minillm's own float32 error on llama_cpp_check.py's drift stream (same tokens, sinks 4 + window
2,044, 6,000 tokens, token by token), the baseline for llama.cpp's in-place shifts: minillm rotates
each key once, when it is written, so any growth beyond this is the shifts' accumulated rounding.

    PYTHONPATH=. python tools/conformance/drift_baseline.py [/tmp/minillm-conformance/tiny-llama-f32.gguf]
"""

import json
import sys

import torch

import minillm

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/minillm-conformance/tiny-llama-f32.gguf"
n, sinks, window = 6000, 4, 2044
oracle, m32 = minillm.load(path, dtype=torch.float64), minillm.load(path, dtype=torch.float32)
ids = torch.randint(0, oracle.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    want = oracle(ids, cache=oracle.new_cache(1, sinks, window))[0]
    cache = m32.new_cache(1, sinks, window)
    got = torch.cat([m32(ids[:, i:i + 1], cache=cache)[0] for i in range(n)]).double()
err = (got - want).abs().amax(-1)
print(json.dumps([dict(tokens=f"{i}-{min(i + 1000, n)}", worst=float(err[i:i + 1000].max()),
                       mean=float(err[i:i + 1000].mean())) for i in range(0, n, 1000)]))
