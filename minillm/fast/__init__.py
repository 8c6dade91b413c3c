"""The fast layer: what only makes the core (minillm/core/) faster, each path held equal to it.

    minillm.fast.enable(model)           # minillm.load does this unless fast=False
    minillm.fast.compile_decode(model)   # the one-token step through torch.compile

`enable` gives a model a `FastPath`, which the core's `Model._forward` asks for a plan of each call:
- a dense forward or a chunk: SDPA kernels (kernels.py), with the sink correction as a split
  (CPU) or a doubled-head kernel;
- one token per row: the decode step (decode.py), lockstep or per row, with the sinks rotated once
  per step, optionally compiled;
- the CPU weight layout (layout.py), chosen per machine by a timed probe (matvec.py,
  MINILLM_KERNELS), and, for bfloat16/float16, whether a one-row decode step runs torch's own
  matrix-vector kernel rather than oneDNN's ("native"); int8 weights (quant.py) are a separate opt-in.
It declines (returns None, and the core computes) where only explicit scores serve: attention maps
and SoftMax-off-by-one. `FastPath(chunk_kernel=..., decode=...)` forces one path, for the tests.
"""

from __future__ import annotations

import torch

from .decode import plan_decode
from .kernels import KERNELS, plan_chunk, plan_dense
from .layout import decodes_natively, ensure, fit, unfit
from .matvec import natively

DECODE_FORMS = ("auto", "rows")


class FastPath:
    """The fast plans of one model. chunk_kernel: "auto" (split on CPU, doubled elsewhere), "split"
    or "doubled"; decode: "auto" (lockstep when the rows are) or "rows" (the per-row step always)."""

    def __init__(self, chunk_kernel: str = "auto", decode: str = "auto"):
        if chunk_kernel not in KERNELS or decode not in DECODE_FORMS:
            raise ValueError(f"FastPath: chunk_kernel in {KERNELS}, decode in {DECODE_FORMS}; "
                             f"got {chunk_kernel!r}, {decode!r}")
        self.chunk_kernel, self.decode = chunk_kernel, decode
        self.compiled_step = None  # compile_decode

    def plan(self, model, n: int, cache, lengths):
        """The plan of one forward (the core's signature), or None where the core must compute."""
        if not torch.compiler.is_compiling():  # a compiled forward keeps the layout it was traced with
            ensure(model)
        spec = model.spec()
        if spec.config.zero_sink:
            return None
        if cache is None:
            return plan_dense(spec, n)
        if n == 1:
            p = plan_decode(spec, cache, lengths, per_row=self.decode == "rows", step=self.compiled_step)
            if p.step is None and cache.batch_size == 1 and decodes_natively(model):  # one row: torch's kernel
                p.step = natively(model._step)
            return p
        return plan_chunk(spec, n, cache, lengths, kernel=self.chunk_kernel)


def enable(model, **options):
    """Give `model` the fast layer (options: FastPath's), in place; returns the model."""
    model.fast = FastPath(**options)
    fit(model)
    return model


def disable(model):
    """The core alone, from the next call on (the weight layout stays: it changes no value; every
    Linear is an nn.Linear again)."""
    model.fast = None
    unfit(model)
    return model


def compile_decode(model, **options):
    """Run one-token streaming steps through `torch.compile(model._step, **options)`: the fast
    path for compiled decoding (`minillm.load(..., compile=True)` calls it), rather than
    `torch.compile(model)`, which compiles the whole forward, validation included.

    The step's shapes are fixed once the cache is full, and everything that changes from step to
    step (the slot, the rotations) is a tensor, so it compiles once for the steady state, and the
    per-row step once whatever its rows do; cache writes stay in place (writes.py). tools/bench.py
    uses mode="max-autotune" with torch._inductor.config.freezing on CPU, and
    mode="reduce-overhead" (CUDA graphs) on CUDA. Enables the fast layer if it is off."""
    import torch

    from ..checks import check_model

    check_model(model)
    if model.fast is None:
        enable(model)
    model.fast.compiled_step = torch.compile(model._step, **options)
    return model


def __getattr__(name):
    if name in ("quantize_int8", "Int8Linear"):
        from . import quant

        return getattr(quant, name)
    raise AttributeError(f"module 'minillm.fast' has no attribute {name!r}")


__all__ = ["FastPath", "enable", "disable", "compile_decode", "quantize_int8"]
