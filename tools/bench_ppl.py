"""Time the exact parallel streaming evaluation against the tuned token-by-token loop, side by side.

    python tools/bench_ppl.py                       # the shipped default model, 20,000 tokens
    python tools/bench_ppl.py weights/llama-tiny --tokens 20000 --cache-size 1024 --threads 2
    python tools/bench_ppl.py --random-llama        # no checkpoint needed: random weights, random ids

Both paths score the same text with the same cache (`--sinks` + window = `--cache-size`), in the same
process, alternating, `--repeats` times; each path's best run counts (on a shared machine the
least-disturbed run is the one that measures the code; medians are printed too):
  - loop:      `perplexity(..., exact_loop=True)`, one model call per token (the reference), timed on
               the first `--loop-tokens` tokens (the loop's cost per token is flat once the cache is
               full, so its tokens/s there is its tokens/s on the whole text; `--full-loop` times
               it on all tokens instead, no extrapolation);
  - parallel:  `perplexity(...)`, the text fed in blocks through the same cache, timed on the same
               prefix and on the whole text.
The speed-up is parallel tokens/s on the whole text over loop tokens/s. The two paths' per-token
NLL on the prefix is compared too (they must agree to float rounding).

The text is the held-out corpus books (frankenstein, katrine) tokenized with the model's tokenizer;
with --random-llama it is random token ids (speed does not depend on the text).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import minillm  # noqa: E402
from minillm.evaluate import perplexity  # noqa: E402
from minillm.formats.text import read_texts  # noqa: E402

DEFAULT_MODEL = REPO / "weights" / "llama-tiny"
CORPUS = REPO.parent / "shared" / "corpus"
HELD_OUT = ["frankenstein.txt", "katrine.txt"]


def random_llama(vocab: int, layers: int, hidden: int, heads: int, intermediate: int, seed: int = 0):
    """A Llama-shaped model with random weights (the speed of the paths does not depend on them)."""
    from minillm.core.config import ModelConfig
    from minillm.random_init import init_random
    from minillm.core.model import Model

    config = ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                         num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                         intermediate_size=intermediate, max_position_embeddings=4096, norm="rmsnorm",
                         norm_bias=False, activation="swiglu", tie_word_embeddings=True)
    return minillm.fast.enable(init_random(Model(config), seed, 0.02))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", help=f"checkpoint (default {DEFAULT_MODEL.relative_to(REPO)})")
    ap.add_argument("--random-llama", action="store_true", help="a random Llama (shape below), random ids")
    ap.add_argument("--shape", default="4,256,8,688,4096", help="layers,hidden,heads,intermediate,vocab "
                    "of --random-llama (default 4,256,8,688,4096: the size of the corpus probes)")
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--loop-tokens", type=int, default=2000)
    ap.add_argument("--full-loop", action="store_true", help="time the loop on all --tokens too")
    ap.add_argument("--cache-size", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--text", nargs="+", help="text files (default: the held-out corpus books)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sinks, window = args.sinks, args.cache_size - args.sinks

    if args.random_llama:
        layers, hidden, heads, inter, vocab = map(int, args.shape.split(","))
        model = random_llama(vocab, layers, hidden, heads, inter)
        name = f"random llama {args.shape}"
        ids = torch.randint(0, vocab, (args.tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        path = Path(args.model) if args.model else DEFAULT_MODEL
        if not path.exists() and not args.model:
            sys.exit(f"bench_ppl: the default model {path} is missing; pass MODEL or --random-llama")
        model, tok = minillm.load(path), minillm.load_tokenizer(path)
        name = str(args.model or DEFAULT_MODEL.relative_to(REPO))
        files = args.text or [CORPUS / f for f in HELD_OUT]
        ids = tok.encode(read_texts(files))[: args.tokens]
    n_params = sum(p.numel() for p in model.parameters())
    N, L = len(ids), min(args.loop_tokens, len(ids))
    print(f"model: {name} ({n_params / 1e6:.1f}M parameters), float32, {args.threads} threads, "
          f"cache {sinks}+{window}, {N} tokens (loop prefix {L})", flush=True)

    def run(n, loop):
        return perplexity(model, ids[:n], "streaming", sinks, window, exact_loop=loop)

    times = {"loop_prefix": [], "parallel_prefix": [], "parallel_full": [], "loop_full": []}
    for rep in range(args.repeats):  # alternate the paths, so that machine noise hits both
        t, loop = timed(lambda: run(L, True))
        times["loop_prefix"].append(t)
        t, par = timed(lambda: run(L, False))
        times["parallel_prefix"].append(t)
        t, full = timed(lambda: run(N, False))
        times["parallel_full"].append(t)
        if args.full_loop:
            t, _ = timed(lambda: run(N, True))
            times["loop_full"].append(t)
        print(f"  repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v), flush=True)
    diff = (loop.nll - par.nll).abs().max().item()

    best = {k: min(v) for k, v in times.items() if v}
    med = {k: statistics.median(v) for k, v in times.items() if v}
    scored = {"loop_prefix": L - 1, "parallel_prefix": L - 1, "parallel_full": N - 1, "loop_full": N - 1}
    rate = {k: scored[k] / t for k, t in best.items()}
    rate_median = {k: scored[k] / t for k, t in med.items()}
    loop_rate = rate.get("loop_full", rate["loop_prefix"])
    speedup = rate["parallel_full"] / loop_rate
    print(f"\n{'path':<28} {'tokens':>7} {'best s':>8} {'tokens/s':>10} {'median s':>9} {'tokens/s':>10}")
    rows = [("loop (exact, token by token)", L, "loop_prefix"), ("parallel (same prefix)", L, "parallel_prefix"),
            ("parallel (whole text)", N, "parallel_full")]
    if "loop_full" in best:
        rows.append(("loop (whole text)", N, "loop_full"))
    for label, n, key in rows:
        print(f"{label:<28} {n:>7} {best[key]:>8.2f} {rate[key]:>10.0f} {med[key]:>9.2f} {rate_median[key]:>10.0f}")
    basis = "loop on the whole text" if "loop_full" in best else f"loop measured on the first {L} tokens"
    loop_median = rate_median.get("loop_full", rate_median["loop_prefix"])
    print(f"\nspeed-up: {speedup:.1f}x best to best, {rate_median['parallel_full'] / loop_median:.1f}x median to "
          f"median (parallel on {N} tokens vs {basis}); "
          f"PPL {full.ppl:.3f}; max |dNLL| loop vs parallel on the prefix: {diff:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": name, "parameters": n_params, "threads": args.threads, "sinks": sinks, "window": window,
            "tokens": N, "loop_tokens": L, "seconds": times, "seconds_best": best, "seconds_median": med,
            "tokens_per_s": rate, "tokens_per_s_median": rate_median, "speedup": speedup,
            "max_abs_dnll": diff, "ppl": full.ppl, "repeats": args.repeats, "torch": torch.__version__,
            "machine": platform.platform(), "processor": platform.processor()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
