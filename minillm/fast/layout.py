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
    """Give every Linear weight its device's layout."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            with torch.no_grad():
                if _want_column_major(w) and w.is_contiguous():
                    w.data = w.data.t().contiguous().t()
                elif not _want_column_major(w) and not w.is_contiguous():
                    w.data = w.data.contiguous()


def ensure(model: nn.Module) -> None:
    """`fit` again only when the weights were replaced or moved since (checked on one weight: a
    load, `.to()` or a state dict assigned changes them all)."""
    first = next((m.weight for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is not None and _want_column_major(first) == first.is_contiguous():
        fit(model)
