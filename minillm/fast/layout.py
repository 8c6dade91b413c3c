"""The CPU weight layout: each Linear weight (and a tied head's embedding) stored as the kernel
that matvec.py chose for its shape on this machine reads it fastest, and each Linear given the
kernel's class (nn.Linear, or matvec.OneDNNLinear for "onednn").

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


def unfit(model: nn.Module) -> None:
    """Every Linear back to nn.Linear (fast.disable; the strides stay: they change no value)."""
    for module in model.modules():
        if type(module) is matvec.OneDNNLinear:
            module.__class__ = nn.Linear
    model._decode_native = False
    model._layout_key = None


def decodes_natively(model: nn.Module) -> bool:
    """Whether `fit` chose the "native" one-row decode step for `model` (matvec.decode_kernel)."""
    return getattr(model, "_decode_native", False)


def _products(model: nn.Module):
    """(Linear or None, weight) for every weight a product reads: the Linear weights, and the
    embedding (None: no Linear of its own) when it is the head."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            yield module, module.weight
    if getattr(model, "lm_head", "untied") is None:  # tied: F.linear(x, embed.weight) is the head
        yield None, model.embed.weight


def _weights(model: nn.Module):
    """Every weight a product reads (`_products` without the modules)."""
    return (w for _, w in _products(model))


def fit(model: nn.Module) -> None:
    """Give every product weight its chosen layout.

    Every new buffer is made while the old ones are still held, and only then swapped in: freed
    weights would otherwise be recycled, one by one, into the next weight's buffer, and decode read
    the weights measurably slower from that memory (docs/performance.md, session 4)."""
    products = list(_products(model))
    native = matvec.decode_kernel([w for _, w in products]) == "native"  # every weight row-major, read natively
    moves = []
    for module, w in products:
        kernel = "native" if native else matvec.choose(w, linear=module is not None)
        if kernel is not None and not matvec.is_stored_for(w, kernel):
            moves.append((w, matvec.relaid(w.data, kernel)))
        if type(module) in (nn.Linear, matvec.OneDNNLinear):  # not int8's or another subclass
            first = 1 if kernel == "onednn" else 2 if not native and matvec.batch_onednn(w) else None
            module.__class__ = nn.Linear if first is None else matvec.OneDNNLinear
            if first is not None:
                module.onednn_from = first
    with torch.no_grad():
        for w, data in moves:
            w.data = data
    model._decode_native = native
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
