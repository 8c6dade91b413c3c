"""Figures shared by the CLI and tools/reproduce.py (matplotlib is an optional extra)."""

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
