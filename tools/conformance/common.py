"""Shared by the tools/conformance scripts: run minillm.testing.check_engine on one engine in both
position conventions, fed in the kit's chunk schedules and one token at a time, and write the
results as JSON (docs/conformance/<engine>.json) and one line each on stdout.

Every script runs in its own virtualenv, with minillm installed from this checkout (`pip install
-e .` from the repository root) and the engine's own packages pinned as the script says.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from minillm.testing import ConformanceError, check_engine

REPO = Path(__file__).resolve().parents[2]


class OneByOne:
    """Feeds every chunk to the wrapped engine one token at a time."""

    def __init__(self, engine):
        self.engine = engine

    def reset(self):
        self.engine.reset()

    def feed(self, ids):
        return torch.cat([self.engine.feed([i]).reshape(1, -1) for i in ids])


def run(engine: str, version: str, model: str, make_engine, model_dir, *, sinks: int, window: int,
        examples: int, dtype=torch.float32, conventions=("cache", "absolute"), feeds=("token", "chunks"),
        atol=None, out_name: str | None = None, extra: dict | None = None) -> list[dict]:
    rows = []
    for positions in conventions:
        for feed in feeds:
            make = (lambda: OneByOne(make_engine())) if feed == "token" else make_engine
            t0 = time.time()
            row = dict(engine=engine, version=version, model=model, positions=positions, feed=feed, sinks=sinks,
                       window=window, dtype=str(dtype).removeprefix("torch."), max_examples=examples)
            try:
                r = check_engine(make, model_dir, sinks=sinks, window=window, positions=positions,
                                 max_examples=examples, dtype=dtype, atol=atol)
                row.update(result="pass", examples=r.examples, longest=r.longest, worst_error=r.worst_error,
                           atol=r.atol)
            except ConformanceError as e:
                row.update(result="diverges", token_index=e.token_index, chunk_index=e.chunk_index,
                           position_vs_S=e.position_vs_S, worst_error=e.worst_error, atol=e.atol,
                           tokens=e.tokens, chunks=e.chunks, message=str(e),
                           cause=None if e.__cause__ is None else repr(e.__cause__))
            row["seconds"] = round(time.time() - t0, 1)
            print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "message")}), flush=True)
            if row["result"] == "diverges":
                print("   ", row["message"][:600], flush=True)
            rows.append(row)
    if extra:
        rows.append(extra)
    out = REPO / "docs" / "conformance" / f"{out_name or engine}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(python=sys.version.split()[0], torch=torch.__version__,
                                   machine=platform.machine(), rows=rows), indent=1) + "\n")
    print("wrote", out.relative_to(REPO))
    return rows


def main(engine: str, version: str, load, make_engine, out_prefix: str) -> None:
    """The command line of a check on the shared safetensors models: the tiny Llama (4 + 12) and,
    when it exists, SmolLM2 (4 + 28). `load(path, sinks, window)` gives the engine's model and
    `make_engine(model, sinks, window)` a fresh engine over it."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--tiny", default="/tmp/minillm-conformance/tiny-llama")
    p.add_argument("--smollm2", default="/tmp/minillm-conformance/smollm2-135m", help="'' to skip")
    p.add_argument("--examples", type=int, default=30)
    p.add_argument("--no-tiny", action="store_true")
    p.add_argument("--suffix", default="", help="appended to the SmolLM2 JSON name")
    p.add_argument("--conventions", default="cache,absolute", help="for SmolLM2")
    p.add_argument("--feeds", default="token,chunks", help="for SmolLM2")
    a = p.parse_args()
    if not a.no_tiny:
        tiny = load(a.tiny, 4, 12)
        run(engine, version, "tiny-llama", lambda: make_engine(tiny, 4, 12), a.tiny, sinks=4, window=12,
            examples=a.examples, out_name=f"{out_prefix}-tiny")
    if a.smollm2 and Path(a.smollm2).exists():
        smol = load(a.smollm2, 4, 28)
        run(engine, version, "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32 safetensors)",
            lambda: make_engine(smol, 4, 28), a.smollm2, sinks=4, window=28, examples=max(4, a.examples // 5),
            conventions=a.conventions.split(","), feeds=a.feeds.split(","), out_name=f"{out_prefix}-smollm2" + a.suffix)
