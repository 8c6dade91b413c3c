"""The CPU weight layout: wide Linear weights (out >= in) stored column-major.

Decode multiplies one vector by each weight and is bound by reading them. MKL's matrix-vector
product for `x @ W.T` reads a wide W (Llama's fused QKV, gate/up and head) faster stored (in, out)
than (out, in), while a narrow one (the down projection) is faster as stored (docs/performance.md
has the measurements and the machines). Other devices keep the usual layout. Only strides change:
the (out, in) parameter becomes a transposed view of an (in, out) buffer, so values, the state dict
and saved checkpoints are unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def _want_column_major(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and w.shape[0] >= w.shape[1]


def fit(model: nn.Module) -> None:
    """Give every Linear weight its device's layout.

    Every new buffer is made while the old ones are still held, and only then swapped in: freed
    weights would otherwise be recycled, one by one, into the next weight's buffer, and decode read
    the weights measurably slower from that memory (docs/performance.md, session 4)."""
    moves = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if _want_column_major(w) and w.is_contiguous():
                moves.append((w, w.data.t().contiguous().t()))
            elif not _want_column_major(w) and not w.is_contiguous():
                moves.append((w, w.data.contiguous()))
    with torch.no_grad():
        for w, data in moves:
            w.data = data


def ensure(model: nn.Module) -> None:
    """`fit` again only when the weights were replaced or moved since (checked on the first layer's
    QKV weight: a load, `.to()` or a state dict assigned changes them all)."""
    w = getattr(model.layers[0].attn.wqkv, "weight", None)  # None: int8 weights, no layout to keep
    if w is not None and _want_column_major(w) == w.is_contiguous():
        fit(model)
