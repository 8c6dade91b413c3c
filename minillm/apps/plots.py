"""Every figure of the CLI and tools/reproduce.py (matplotlib is an optional extra).

Each function takes `plt` (matplotlib.pyplot, imported by the caller with the Agg backend) and
returns the figure; the caller saves and closes it.
"""

from __future__ import annotations

import math


def attention_map_figure(plt, maps, per_layer_scores, title: str, cols: int | None = None,
                         layers: list[int] | None = None):
    """Per-layer heatmaps of (L, T, T) attention (heads averaged), the paper's Figure 2.

    A log color scale keeps both the sink column and the faint rest of each row visible. Each
    panel is titled with its layer (`layers[i]`, default i) and that layer's attention-sink score
    (mean attention on token 0).
    """
    import numpy as np
    from matplotlib.colors import LogNorm

    L, T, _ = maps.shape
    cols = cols or math.ceil(math.sqrt(L))
    rows = -(-L // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.9 * cols + 0.9, 2.9 * rows + 0.4), squeeze=False,
                             layout="constrained")
    upper = np.triu(np.ones((T, T), dtype=bool), k=1)
    im = None
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.axis("off")
            continue
        data = np.ma.masked_where(upper, maps[i].numpy().clip(min=1e-4))
        im = ax.imshow(data, norm=LogNorm(vmin=1e-4, vmax=1.0), cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {i if layers is None else layers[i]}: sink {per_layer_scores[i]:.3f}", fontsize=9)
        ax.set_xlabel("key", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.colorbar(im, ax=axes, shrink=0.8, label="attention (heads averaged)")
    fig.suptitle(title, fontsize=10)
    return fig


def running_ppl_figure(plt, curves: dict[str, list], S: int, trained: int, n_tokens: int, title: str):
    """Running log-PPL against tokens, one line per curve (the paper's Figure 3, one panel).

    `curves` maps a legend label to a [[token_index, running mean NLL], ...] curve
    (PerplexityResult.nll_curve). The y range follows the curves past their first tokens, whose
    running mean swings wildly; dotted and dashed lines mark the cache size S and, when the text
    is longer, the checkpoint's trained context.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    settled = []
    for (label, curve), style in zip(curves.items(), ["-", "--", "-.", ":"]):
        if curve:
            ax.plot([x for x, _ in curve], [y for _, y in curve], ls=style, label=label)
            settled += [y for x, y in curve if x > min(100, n_tokens // 20)] or [y for _, y in curve]
    if settled:
        lo, hi = min(settled), max(settled)
        ax.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.1 * (hi - lo) + 0.05)
    ax.axvline(S, color="gray", ls=":", lw=1)
    ax.text(S, ax.get_ylim()[1], f" S={S}", va="top", fontsize=8, color="gray")
    if trained < n_tokens:
        ax.axvline(trained, color="gray", ls="--", lw=1)
        ax.text(trained, ax.get_ylim()[0], f" trained context {trained}", va="bottom", fontsize=8, color="gray")
    ax.set_xlabel("tokens")
    ax.set_ylabel("log PPL (running mean NLL)")
    ax.set_title(title, fontsize=10)
    if curves:
        ax.legend()
    fig.tight_layout()
    return fig


FIG3_STYLE = {  # mode: (label, color, linestyle)
    "dense": ("dense", "tab:gray", "-"),
    "window": ("window 0+S", "tab:red", "-"),
    "recompute": ("recompute, S tokens (paired)", "tab:green", "--"),
    "recompute_bos": ("recompute, BOS + S-1 (paired)", "tab:olive", ":"),
    "streaming": ("streaming 4+(S-4)", "tab:blue", "-"),
}


def fig3_grid_figure(plt, panels, S: int, style: dict = FIG3_STYLE):
    """The paper's Figure 3, one panel per model: running log-PPL (log-scaled tokens) of each
    mode in `style`. `panels` is [(result, curves)], result a dict with name, positions, tokens
    and trained_context, curves {mode: [[token, value], ...]}. The frame follows the full-text
    modes (window, streaming); dense may leave it, since its breakdown is the point."""
    results = [r for r, _ in panels]
    n = len(results)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.3 * rows + 0.6), squeeze=False, sharex=True)
    for ax, (r, curves) in zip(axes.flat, panels):
        lo, hi = math.inf, -math.inf
        for mode, (label, color, ls) in style.items():
            cv = curves.get(mode)
            if not cv:
                continue
            xs, ys = [p[0] for p in cv], [p[1] for p in cv]
            ax.plot(xs, ys, color=color, ls=ls, lw=1.4, label=label)
            tail = [y for x, y in cv if x >= 2 * S]
            if mode in ("window", "streaming") and tail:  # the frame follows the full-text modes
                lo, hi = min(lo, min(tail)), max(hi, max(tail))
        ax.set_xscale("log")
        ax.axvline(r["trained_context"], color="k", ls="--", lw=0.8)
        ax.set_xlim(S, r["tokens"] * 1.05)
        ticks = [t for t in (S, 2 * S, 1000, 2000, 5000, 10000, 20000, 50000, 100000) if t <= r["tokens"] * 1.05]
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.minorticks_off()
        if math.isfinite(lo):
            ax.set_ylim(lo - 0.25, hi + 0.4)  # dense may leave the frame: its breakdown is the point
        ax.set_title(f"{r['name']} ({r['positions']})", fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("tokens (log scale)", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"log PPL of tokens {S}..x", fontsize=9)
    for ax in axes.flat[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles += [plt.Line2D([], [], color="k", ls="--", lw=0.8)]
    labels += ["trained context"]
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def sink_count_figure(plt, results, S: int, sink_counts):
    """PPL against the number of sinks kept at a fixed cache size S, relative to 4 sinks (Tables 1/2)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for r in results:
        base = r["sinks"][f"4+{S - 4}"]
        ax.plot(sink_counts, [r["sinks"][f"{k}+{S - k}"] / base for k in sink_counts], marker="o", label=r["name"])
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(sink_counts, [str(k) for k in sink_counts])
    ax.set_xlabel(f"sinks kept (cache size fixed at S={S})")
    ax.set_ylabel("PPL / PPL with 4 sinks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def sink_scores_figure(plt, results):
    """Per-layer attention on token 0 for each model, against uniform attention (log scale)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for r in results:
        a = r["attention"]
        ax.plot(range(len(a["per_layer"])), a["per_layer"], marker="o", label=r["name"])
    a = results[0]["attention"]
    ax.axhline(a["uniform"], color="k", ls="--", lw=0.8, label="uniform attention")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"attention on token 0 (queries {a['min_query']}-{a['tokens'] - 1})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_figure(plt, train: dict, attempt1: dict):
    """Held-out loss against training tokens: the first attempt and the shipped weights, the exported checkpoint dotted."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (title, logs) in zip(axes, (("attempt 1 (batch 32)", attempt1), ("shipped weights", train))):
        for name, t in logs.items():
            xs = [x / 1e6 for x, _ in t["history"]]
            ys = [y for _, y in t["history"]]
            line, = ax.plot(xs, ys, lw=1.3, label=f"{name} (batch {t['batch']})")
            ax.plot([t["best_tokens"] / 1e6], [t["best_heldout"]], "o", color=line.get_color())
        ax.set_title(title + ": dots mark the exported checkpoint", fontsize=9)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylim(4.0, 6.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("held-out loss (nats/token)")
    fig.tight_layout()
    return fig
