"""The CPU weight layout: each Linear weight (and a tied head's embedding) stored as the kernel
that matvec.py chose for its shape on this machine reads it fastest.

Decode multiplies one vector by each weight and is bound by reading them, and the library's
matrix-vector product reads a weight at different speeds stored (out, in) or (in, out), by shape and
by CPU (docs/performance.md). `matvec.choose` probes both once per (shape, dtype, threads), or
follows MINILLM_KERNELS. Other devices keep the usual layout. Only strides change: the (out, in)
parameter becomes a transposed view of an (in, out) buffer, so values, the state dict and saved
checkpoints are unchanged, and a tied embedding still looks rows up from the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from . import matvec


def _weights(model: nn.Module):
    """Every weight a product reads: the Linear weights, and the embedding when it is the head."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            yield module.weight
    if getattr(model, "lm_head", "untied") is None:  # tied: F.linear(x, embed.weight) is the head
        yield model.embed.weight


def fit(model: nn.Module) -> None:
    """Give every product weight its chosen layout.

    Every new buffer is made while the old ones are still held, and only then swapped in: freed
    weights would otherwise be recycled, one by one, into the next weight's buffer, and decode read
    the weights measurably slower from that memory (docs/performance.md, session 4)."""
    moves = []
    for w in _weights(model):
        kernel = matvec.choose(w)
        if kernel is not None and not matvec.is_stored_for(w, kernel):
            moves.append((w, matvec.relaid(w.data, kernel)))
    with torch.no_grad():
        for w, data in moves:
            w.data = data
    model._layout_key = _key(model)


def _key(model: nn.Module):
    w = getattr(model.layers[0].attn.wqkv, "weight", None)  # None: int8 weights, no layout to keep
    if w is None:
        return None
    return w.data_ptr(), w.dtype, w.device, torch.get_num_threads(), matvec.mode()


def ensure(model: nn.Module) -> None:
    """`fit` again only when the weights were replaced or moved since, or the thread count or
    MINILLM_KERNELS changed (a load, `.to()` or a state dict assigned replaces the first layer's
    QKV weight, which is checked)."""
    key = _key(model)
    if key is not None and key != getattr(model, "_layout_key", None):
        fit(model)
