#!/usr/bin/env python
"""Record the golden outputs of the default weights; tests/test_golden.py checks them.

    python tools/make_golden.py            # rewrites tests/data/golden_llama_tiny.json

Greedy generation from weights/llama-tiny (float32, CPU) for a fixed prompt, twice:
- "dense": 50 tokens through the CLI's default cache for this checkpoint (4 sinks, S = 512, its
  trained context). Prompt and continuation fit in it, so nothing is evicted: this is the dense path.
- "streaming": 100 tokens through a small cache (4 sinks + a window of 60, S = 64), so most
  steps run after eviction and the sink+window path is pinned too.

Per step it records the token, the top logit and the margin between the top two logits, all from
one teacher-forced forward over prompt + recorded tokens (the same numbers generation saw, since
chunking never changes results). A tiny margin means the argmax could flip on another CPU or
torch version; the test skips those steps (THRESHOLD).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout without installing

import minillm  # noqa: E402
from minillm.apps.generation import generate  # noqa: E402

WEIGHTS = REPO / "weights" / "llama-tiny"
OUT = REPO / "tests" / "data" / "golden_llama_tiny.json"
PROMPT = "The old house stood at the end of the lane, and in the evening"
THRESHOLD = 1e-3  # logits: argmaxes are compared only where the top two differ by more
RUNS = {"dense": {"sinks": 4, "cache_size": 512, "new_tokens": 50},
        "streaming": {"sinks": 4, "cache_size": 64, "new_tokens": 100}}


def teacher_forced(model, prompt_ids: list[int], tokens: list[int], sinks: int, cache_size: int) -> torch.Tensor:
    """(steps, V) logits that predicted each generated token, from one forward over
    prompt + tokens through a fresh cache of the run's shape."""
    cache = model.new_cache(batch_size=1, sinks=sinks, window=cache_size - sinks)
    ids = torch.tensor([prompt_ids + tokens[:-1]])
    with torch.no_grad():
        logits = model(ids, cache=cache)[0]
    return logits[len(prompt_ids) - 1:].double()


def margins(logits: torch.Tensor) -> tuple[list[float], list[float]]:
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist(), top2[:, 0].tolist()


def record(model, tok, prompt_ids: list[int], run: dict) -> dict:
    tokens = list(generate(model, prompt_ids, max_new_tokens=run["new_tokens"], temperature=0,
                           sinks=run["sinks"], window=run["cache_size"] - run["sinks"], ignore_eos=True))
    logits = teacher_forced(model, prompt_ids, tokens, run["sinks"], run["cache_size"])
    if logits.argmax(-1).tolist() != tokens:  # generation and the teacher-forced forward disagree
        raise SystemExit("make_golden: greedy generation differs from its own teacher-forced forward")
    margin, top = margins(logits)
    return {**run, "tokens": tokens, "margins": [round(m, 6) for m in margin], "top_logits": [round(t, 6) for t in top],
            "text": tok.decode(tokens)}


def main() -> int:
    torch.set_num_threads(1)
    model = minillm.load(WEIGHTS, dtype=torch.float32, device="cpu")
    model.eval()
    tok = minillm.load_tokenizer(WEIGHTS)
    prompt_ids = tok.encode(PROMPT)
    golden = {
        "about": "Written by tools/make_golden.py; checked by tests/test_golden.py. Do not edit by hand.",
        "weights": "weights/llama-tiny",
        "weights_sha256": hashlib.sha256((WEIGHTS / "model.safetensors").read_bytes()).hexdigest(),
        "dtype": "float32", "device": "cpu", "torch": torch.__version__,
        "threshold": THRESHOLD,
        "prompt": PROMPT, "prompt_ids": prompt_ids,
        "runs": {name: record(model, tok, prompt_ids, run) for name, run in RUNS.items()},
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(golden, indent=1)
    # one line per list of numbers, so that the file stays short and diffs stay readable
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    OUT.write_text(text + "\n", encoding="utf-8")
    for name, run in golden["runs"].items():
        small = sum(m <= THRESHOLD for m in run["margins"])
        print(f"{name}: {len(run['tokens'])} tokens, smallest margin {min(run['margins']):.4g}, "
              f"{small} step(s) at or below {THRESHOLD}: {run['text']!r}")
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
