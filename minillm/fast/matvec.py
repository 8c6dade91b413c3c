"""Which layout each CPU weight is stored in, chosen per machine by a short timed probe.

Decode multiplies one vector by every weight and is bound by reading them. The library's product
(MKL, or oneDNN/ATen for bfloat16) reads a weight at very different speeds depending on how it is
stored and on the CPU: on an AMD EPYC (docs/performance.md) the 49,152 x 576 tied head read at
6.7 GB/s stored (out, in) and at 15 GB/s stored (in, out), about a plain `sum`'s speed, while the
narrow down projection read faster as stored. On an Intel Xeon with AVX-512/AMX the same head read
only 18% faster transposed. So the choice is measured, not taken from one machine's notes:

    KERNELS        "rowmajor": the weight (out, in) contiguous, `F.linear(x, W)` (the core's own)
                   "colmajor": an (in, out) buffer, W its transposed view: `x @ W.T` reads it by rows
    MINILLM_KERNELS=probe      (the default) time both per (shape, dtype, threads), keep the faster
    MINILLM_KERNELS=core       every weight as the core stores it (row-major): no probe
    MINILLM_KERNELS=<kernel>   that kernel for every weight: no probe

Both kernels are the same product with the same values (only strides differ, so the state dict,
saved checkpoints and every other path see the same numbers); they differ only in the order of the
additions, which tests/test_kernels.py bounds. The probe runs on synthetic weights of the shape
(enough copies to be read from memory, not from the cache, as decode reads them), alternates the two
kernels, and keeps the earlier rule (wide weights, out >= in, column-major) unless the other kernel's
best time is at least 10% shorter, so that a probe on a busy machine does not flip a verdict on
noise; it caches its verdict for the process; it takes well under a
second for a model's few distinct shapes. A weight under 256 KiB is read from the cache whatever its
layout, and timing it would time noise: it keeps the rule, so small models, and the tests, take the same path on every machine. Only CPU weights are laid out; CUDA and other devices keep
the library's usual layout. int8 weights (quant.py) have one kernel.
"""

from __future__ import annotations

import os
import time

import torch

from ..errors import MiniLLMError

KERNELS = ("rowmajor", "colmajor")
MODES = ("probe", "core")
ENV = "MINILLM_KERNELS"
_verdicts: dict[tuple, str] = {}  # (out, in, dtype, threads) -> kernel
PROBE_BYTES = 40 << 20  # the probe reads at least this much per kernel and repetition (beyond a 32 MB L3)
PROBE_COPIES = 64  # at most this many copies of a small weight (those are read from the cache anyway)
PROBE_REPS = 3
PROBE_MIN_BYTES = 256 << 10  # smaller weights are read from the cache: the rule below, no probe
MARGIN = 0.9  # the probe departs from the rule only for a kernel at least 10% faster


def mode() -> str:
    """MINILLM_KERNELS (probe by default), checked: an unknown name is a one-line MiniLLMError."""
    name = os.environ.get(ENV, "").strip() or "probe"
    if name not in MODES + KERNELS:
        raise MiniLLMError(f"{ENV}={name!r} is not a kernel choice; use one of: {', '.join(MODES + KERNELS)}")
    return name


def _product(kernel: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, in) times the weight `w` as stored by `kernel` (rowmajor: (out, in); colmajor: (in, out))."""
    return torch.mm(x, w.t()) if kernel == "rowmajor" else torch.mm(x, w)


def probe(out: int, inn: int, dtype: torch.dtype, threads: int | None = None) -> dict[str, float]:
    """Best seconds of one (1, in) x (in, out) product per kernel, read from memory. Alternates the
    kernels; each repetition reads every copy once."""
    size = out * inn
    copies = max(1, min(PROBE_COPIES, -(-PROBE_BYTES // (size * torch.finfo(dtype).bits // 8))))
    flat = torch.empty(copies * size, dtype=dtype).fill_(0.5)  # no denormals; values do not matter
    stored = {"rowmajor": flat.view(copies, out, inn), "colmajor": flat.view(copies, inn, out)}
    x = torch.full((1, inn), 0.25, dtype=dtype)
    best = {k: float("inf") for k in KERNELS}
    for k in KERNELS:  # warm up each kernel once (first-call setup)
        _product(k, x, stored[k][0])
    for rep in range(PROBE_REPS):
        for k in KERNELS if rep % 2 == 0 else KERNELS[::-1]:
            w = stored[k]
            t0 = time.perf_counter()
            for i in range(copies):
                _product(k, x, w[i])
            best[k] = min(best[k], (time.perf_counter() - t0) / copies)
    return best


def choose(w: torch.Tensor) -> str | None:
    """The kernel for weight `w` (out, in) on this machine: row-major (the library's usual layout) on
    every other device, whatever MINILLM_KERNELS says; None for a weight no product here reads."""
    if w.dim() != 2 or not w.dtype.is_floating_point:
        return None
    if w.device.type != "cpu":
        return "rowmajor"
    name = mode()
    if name == "core":
        return "rowmajor"
    if name != "probe":
        return name
    if w.numel() * w.element_size() < PROBE_MIN_BYTES:  # timing it would time noise
        return _rule(w)
    key = (w.shape[0], w.shape[1], w.dtype, torch.get_num_threads())
    if key not in _verdicts:
        times = probe(w.shape[0], w.shape[1], w.dtype)
        rule = _rule(w)
        other = KERNELS[1 - KERNELS.index(rule)]
        _verdicts[key] = other if times[other] < MARGIN * times[rule] else rule
    return _verdicts[key]


def _rule(w: torch.Tensor) -> str:
    """The layout rule used before the probe (session 1): wide weights (out >= in) column-major."""
    return "colmajor" if w.shape[0] >= w.shape[1] else "rowmajor"


def stored_as(w: torch.Tensor) -> str | None:
    """The kernel that weight `w` is stored for now (None: neither layout, e.g. a slice)."""
    if w.is_contiguous():
        return "rowmajor"
    if w.t().is_contiguous():
        return "colmajor"
    return None


def is_stored_for(w: torch.Tensor, kernel: str) -> bool:
    """Whether `w` is stored as `kernel` reads it (both, for a weight with one row or column)."""
    return w.is_contiguous() if kernel == "rowmajor" else w.t().is_contiguous()


def relaid(w: torch.Tensor, kernel: str) -> torch.Tensor:
    """A new tensor with `w`'s values stored for `kernel` (the (out, in) shape kept)."""
    return w.contiguous() if kernel == "rowmajor" else w.t().contiguous().t()


def verdicts() -> dict[tuple, str]:
    """The probe's cached verdicts so far (a copy), for benchmarks and reports."""
    return dict(_verdicts)
