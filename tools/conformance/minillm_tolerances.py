"""Measure minillm's own float32/bfloat16/float16 streams against its float64 reference, the
figures behind minillm.testing.TOLERANCES (docs/testing.md). Runs in the project's environment.

    PYTHONPATH=. python tools/conformance/minillm_tolerances.py MODEL [--sinks 4 --window 12 --examples 20]
"""

import argparse
import json
import time

import torch

import minillm
from minillm.testing import MiniLLMEngine, check_engine

p = argparse.ArgumentParser()
p.add_argument("model")
p.add_argument("--sinks", type=int, default=4)
p.add_argument("--window", type=int, default=12)
p.add_argument("--examples", type=int, default=20)
p.add_argument("--dtypes", default="float32,bfloat16,float16")
p.add_argument("--positions", default="cache,absolute")
a = p.parse_args()
out = []
for name in a.dtypes.split(","):
    dtype = getattr(torch, name)
    model = minillm.load(a.model, dtype=dtype)
    for positions in a.positions.split(","):
        t = time.time()
        r = check_engine(lambda: MiniLLMEngine(model, a.sinks, a.window, positions), a.model, sinks=a.sinks,
                         window=a.window, positions=positions, max_examples=a.examples, dtype=dtype, atol=1e9)
        row = dict(model=str(a.model), dtype=name, positions=positions, sinks=a.sinks, window=a.window,
                   examples=r.examples, longest=r.longest, worst=r.worst_error,
                   worst_token_by_token=r.worst_token_by_token, worst_chunked=r.worst_chunked,
                   seconds=round(time.time() - t, 1))
        print(json.dumps(row), flush=True)
        out.append(row)
