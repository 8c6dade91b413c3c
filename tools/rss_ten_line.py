"""Run the README's ten-line API example as a loop, with no torch.no_grad(), and print its RSS.

    python tools/rss_ten_line.py [--steps 10000] [--model weights/llama-tiny]

The example decodes greedily through one sink + window cache, exactly as README.md writes it
(`logits = model(next_id, cache=cache)`, repeated); the process's resident set size is printed
after 100 decode steps and after `--steps`. A model from `minillm.load` is for inference (its
parameters need no gradients), so no step keeps an autograd graph and the two figures agree; when
parameters did require gradients, this loop grew by about 390 MB per 1,000 steps.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_kb() -> int:
    """The current resident set size (kB), from /proc (ru_maxrss, the peak, where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "weights" / "llama-tiny"))
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requires-grad", action="store_true",
                    help="turn the parameters' gradients on first (how minillm.load left them before): shows the leak")
    args = ap.parse_args()
    import torch

    import minillm

    torch.set_num_threads(args.threads)
    # ---- the README's ten lines, as written (no torch.no_grad()) ----
    model = minillm.load(args.model, dtype=torch.float32, device="cpu")
    if args.requires_grad:
        model.requires_grad_(True)
    tok = minillm.load_tokenizer(args.model)
    ids = torch.tensor([tok.encode("It was a dark and stormy night")])
    logits = model(ids)
    cache = model.new_cache(batch_size=1, sinks=4, window=1020)
    logits = model(ids, cache=cache)
    next_id = logits[:, -1:].argmax(-1)
    logits = model(next_id, cache=cache)
    # ---- "repeat forever" ----
    t0 = time.perf_counter()
    figures = {}
    for step in range(2, args.steps + 1):
        next_id = logits[:, -1:].argmax(-1)
        logits = model(next_id, cache=cache)
        if step in (100, args.steps):
            gc.collect()
            figures[step] = rss_kb()
            print(f"after {step:>6,} decode steps: RSS {figures[step]:,} kB "
                  f"(grad_fn {logits.grad_fn}, {time.perf_counter() - t0:.1f} s)", flush=True)
    if 100 in figures and args.steps in figures:
        print(f"growth from step 100 to {args.steps:,}: {figures[args.steps] - figures[100]:+,} kB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
