"""Every figure of the CLI and tools/reproduce.py (matplotlib is an optional extra).

Each function takes `plt` (matplotlib.pyplot, imported by the caller with the Agg backend) and
returns the figure; the caller saves and closes it.
"""

from __future__ import annotations

import math


def attention_map_figure(plt, maps, per_layer_scores, title: str, cols: int | None = None):
    """Per-layer heatmaps of (L, T, T) attention (heads averaged), the paper's Figure 2.

    A log color scale keeps both the sink column and the faint rest of each row visible. Each
    panel is titled with its layer's attention-sink score (mean attention on token 0).
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
        ax.set_title(f"layer {i}: sink {per_layer_scores[i]:.3f}", fontsize=9)
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
