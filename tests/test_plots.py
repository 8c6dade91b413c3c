"""Every figure in minillm/apps/plots.py draws from data shaped like its callers' (the CLI and
tools/reproduce.py), so a refactor of either cannot break a figure unnoticed."""

import io

import pytest
import torch

from minillm.apps import plots

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def drawn(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    plt.close(fig)
    return buf.getvalue()


def curve(n, level):
    return [[x, level + 1.0 / x] for x in range(1, n, 7)]


def test_every_figure_draws():
    S = 64
    results = [{"name": f"m{i}", "positions": "rope", "tokens": 2000, "trained_context": 512,
                "sinks": {f"{k}+{S - k}": 10.0 + k for k in (0, 1, 2, 4, 8)},
                "attention": {"per_layer": [0.5, 0.3, 0.2], "uniform": 0.01, "min_query": 32, "tokens": 64}}
               for i in range(2)]
    curves = {"dense": curve(2000, 3), "window": curve(2000, 4), "streaming": curve(2000, 3.1)}
    train = {"m": {"history": [[1e5, 5.5], [2e5, 5.0]], "batch": 64, "best_tokens": 2e5, "best_heldout": 5.0}}
    figures = [
        plots.running_ppl_figure(plt, {"streaming (PPL 20.00)": curve(300, 3)}, S, 200, 300, "t"),
        plots.running_ppl_figure(plt, {}, S, 200, 300, "nothing scored"),
        plots.attention_map_figure(plt, torch.softmax(torch.randn(3, 8, 8), -1).tril(), [0.5, 0.3, 0.2], "maps"),
        plots.fig3_grid_figure(plt, [(r, curves) for r in results], S),
        plots.sink_count_figure(plt, results, S, (0, 1, 2, 4, 8)),
        plots.sink_scores_figure(plt, results),
        plots.training_figure(plt, train, train),
    ]
    for fig in figures:
        assert drawn(fig)[:4] == b"\x89PNG"
