"""Which layout each CPU weight is stored in, chosen per machine by a short timed probe.

Decode multiplies one vector by every weight and is bound by reading them. The library's product
(MKL, or oneDNN/ATen for bfloat16) reads a weight at very different speeds depending on how it is
stored and on the CPU: on an AMD EPYC (docs/performance.md) the 49,152 x 576 tied head read at
6.7 GB/s stored (out, in) and at 15 GB/s stored (in, out), about a plain `sum`'s speed, while the
narrow down projection read faster as stored. On an Intel Xeon with AVX-512/AMX the same head read
only 18% faster transposed. So the choice is measured, not taken from one machine's notes:

    KERNELS        "rowmajor": the weight (out, in) contiguous, `F.linear(x, W)` (the core's own)
                   "colmajor": an (in, out) buffer, W its transposed view: `x @ W.T` reads it by rows
                   "native":   row-major, and a one-row bfloat16/float16 product by torch's own
                               matrix-vector kernel rather than oneDNN's (see below)
                   "onednn":   row-major, and a float32 Linear's product of a few rows (decode) by
                               oneDNN's inner product rather than MKL's (`OneDNNLinear`)
    MINILLM_KERNELS=probe      (the default) time them per (shape, dtype, threads), keep the faster
    MINILLM_KERNELS=core       every weight as the core stores it (row-major): no probe
    MINILLM_KERNELS=<kernel>   that kernel for every weight: no probe

"native": `F.linear` in bfloat16 or float16 goes to oneDNN whenever torch's global oneDNN switch is
on, and oneDNN's product of one row read SmolLM2's bfloat16 weights at 8-10 GB/s on the AMD EPYC,
where torch's own matrix-vector kernel (taken with the switch off) read them at 21-23 GB/s, about a
`sum`'s speed (docs/performance.md, session 7). With four rows oneDNN was faster again. So "native"
is a decode choice for a whole model, made from the probe's times of its shapes: a one-row decode
step of a bfloat16/float16 model runs with oneDNN off (`onednn_off`, reference-counted across
threads), every weight row-major; prefill and batched steps keep oneDNN. The switch is torch's own
and global: while a native step runs, another thread's bfloat16 products take torch's kernel too
(the same product, perhaps slower). For float32 the switch changes nothing (MKL computes those
products), so "native" is "rowmajor" there.

"onednn" is the other way round: float32 `F.linear` is MKL's, and MKL's product of one row read
SmolLM2's weights slower than oneDNN's (41 ms column-major against 36 for all of them, medians) and
of two or sixteen rows much slower (45 against 68 ms, 64 against 87-106). The probe times it per
float32 shape for one row and for BATCH_ROWS, and the fast layer gives each Linear it wins for the
class `OneDNNLinear` (the weights and the state dict are unchanged), for one row and batches, or
for batches only (`batch_onednn`). It is a Linear's kernel only: a tied head is the embedding,
which the core multiplies by `F.linear`, so the head chooses between the two layouts.

The kernels are the same product with the same values (only strides, or the library's kernel,
differ, so the state dict, saved checkpoints and every other path see the same numbers); they
differ only in the order of the additions, which tests/test_kernels.py bounds. The probe runs on
synthetic weights of the shape (enough copies to be read from memory, not from the cache, as decode
reads them), alternates the kernels that differ for the dtype, and keeps the earlier rule (wide
weights, out >= in, column-major) unless another kernel's best time is at least 10% shorter, so
that a probe on a busy machine does not flip a verdict on noise. It caches its times and verdicts
for the process, and takes under a second for a model's few distinct shapes. A weight under 256 KiB
is read from the cache whatever its layout, and timing it would time noise: it keeps the rule, so
small models, and the tests, take the same path on every machine. Only CPU weights are laid out;
CUDA and other devices keep the library's usual layout. int8 weights (quant.py) have one kernel.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MiniLLMError

KERNELS = ("rowmajor", "colmajor", "native", "onednn")
LAYOUTS = ("rowmajor", "colmajor")  # what the probe chooses per weight; "native" is chosen per model
REDUCED = (torch.bfloat16, torch.float16)  # the dtypes whose products oneDNN computes
MODES = ("probe", "core")
ENV = "MINILLM_KERNELS"
_verdicts: dict[tuple, str] = {}  # (out, in, dtype, threads, linear) -> kernel (a layout, or "onednn")
_times: dict[tuple, dict[str, float]] = {}  # (out, in, dtype, threads, rows) -> the probe's best seconds per kernel
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


_off = threading.Lock()
_off_depth = 0
_off_saved = True


@contextlib.contextmanager
def onednn_off():
    """torch's global oneDNN switch off inside, as it was after: reference-counted, so that threads
    that overlap restore it once, to what it was before the first of them."""
    global _off_depth, _off_saved
    with _off:
        if _off_depth == 0:
            _off_saved = torch._C._get_mkldnn_enabled()
            torch._C._set_mkldnn_enabled(False)
        _off_depth += 1
    try:
        yield
    finally:
        with _off:
            _off_depth -= 1
            if _off_depth == 0:
                torch._C._set_mkldnn_enabled(_off_saved)


def natively(step):
    """`step` run with oneDNN off: the "native" decode step (FastPath.plan wraps the model's)."""
    def native_step(*args, **kwargs):
        with onednn_off():
            return step(*args, **kwargs)
    return native_step


ONEDNN_ROWS = 64  # OneDNNLinear's products of more rows (prefill) are F.linear's, as in the core
BATCH_ROWS = 16  # the rows of the probe's batched timing (batch_onednn)


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


class OneDNNLinear(nn.Linear):
    """An nn.Linear whose float32 CPU products of `onednn_from` (1: the "onednn" kernel; 2: batches
    only, see batch_onednn) to ONEDNN_ROWS rows are oneDNN's inner product; the others, any that
    autograd must differentiate, any in another dtype (a model cast since its layout was fitted),
    and any inside torch.compile (inductor lowers this op only for frozen weights) are
    `F.linear`'s. The fast layer (layout.fit) gives a Linear this class, and takes it back, in place."""

    onednn_from = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // max(1, x.shape[-1])
        if (not self.onednn_from <= rows <= ONEDNN_ROWS or x.dtype != torch.float32 or w.dtype != torch.float32
                or x.device.type != "cpu" or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return F.linear(x, w, self.bias)
        return _onednn(x, w, self.bias)


def _product(kernel: str, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (M, in) times the weight `w` as stored by `kernel` (colmajor: (in, out); the others (out, in))."""
    if kernel == "native":
        with onednn_off():
            return torch.mm(x, w.t())
    if kernel == "onednn":
        return _onednn(x, w)
    return torch.mm(x, w) if kernel == "colmajor" else torch.mm(x, w.t())


def _kernels(dtype: torch.dtype) -> tuple[str, ...]:
    """The kernels that differ for `dtype`: "native" from "rowmajor" only where oneDNN computes a
    Linear's product (bfloat16, float16), "onednn" only where it would not (float32)."""
    if dtype in REDUCED:
        return LAYOUTS + ("native",)
    if dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return LAYOUTS + ("onednn",)
    return LAYOUTS


def probe(out: int, inn: int, dtype: torch.dtype, threads: int | None = None, rows: int = 1) -> dict[str, float]:
    """Best seconds of one (rows, in) x (in, out) product per kernel (those that differ for `dtype`;
    "native" only for one row), read from memory. Alternates the kernels; each repetition reads
    every copy once."""
    size = out * inn
    copies = max(1, min(PROBE_COPIES, -(-PROBE_BYTES // (size * torch.finfo(dtype).bits // 8))))
    flat = torch.empty(copies * size, dtype=dtype).fill_(0.5)  # no denormals; values do not matter
    by_rows = flat.view(copies, out, inn)
    by_cols = flat.view(copies, inn, out)
    # "onednn@colmajor": oneDNN on a column-major weight (batch_onednn: a Linear whose one-row
    # verdict is column-major keeps that layout for its batched oneDNN products).
    stored = {"rowmajor": by_rows, "native": by_rows, "onednn": by_rows, "colmajor": by_cols,
              "onednn@colmajor": by_cols.transpose(1, 2)}
    x = torch.full((rows, inn), 0.25, dtype=dtype)
    kernels = tuple(k for k in _kernels(dtype) if rows == 1 or k != "native")
    if rows > 1 and "onednn" in kernels:
        kernels += ("onednn@colmajor",)
    best = {k: float("inf") for k in kernels}
    for k in kernels:  # warm up each kernel once (first-call setup)
        _product(k.split("@")[0], x, stored[k][0])
    for rep in range(PROBE_REPS):
        for k in kernels if rep % 2 == 0 else kernels[::-1]:
            w, kernel = stored[k], k.split("@")[0]
            t0 = time.perf_counter()
            for i in range(copies):
                _product(kernel, x, w[i])
            best[k] = min(best[k], (time.perf_counter() - t0) / copies)
    return best


def _probed(w: torch.Tensor, rows: int = 1) -> dict[str, float]:
    """The probe's times for `w`'s shape, dtype, the thread count now and `rows` (once per process)."""
    key = (w.shape[0], w.shape[1], w.dtype, torch.get_num_threads(), rows)
    if key not in _times:
        _times[key] = probe(w.shape[0], w.shape[1], w.dtype, rows=rows)
    return _times[key]


def batch_onednn(w: torch.Tensor) -> bool:
    """Whether a float32 Linear's products of 2 to ONEDNN_ROWS rows (a batched decode step) are
    oneDNN's: MINILLM_KERNELS=onednn, or, probing, when oneDNN's time for BATCH_ROWS rows is at least
    10% shorter than MKL's, both on the layout `choose` gives the weight for one row (on the AMD
    EPYC, oneDNN took 64 against MKL's 87-106 ms for SmolLM2's weights at 16 rows, 45 against 68
    at 2)."""
    if w.dim() != 2 or w.device.type != "cpu" or "onednn" not in _kernels(w.dtype):
        return False
    name = mode()
    if name != "probe" or w.numel() * w.element_size() < PROBE_MIN_BYTES:
        return name == "onednn"
    layout = choose(w)
    if layout == "onednn":
        return True
    times = _probed(w, BATCH_ROWS)
    onednn = times.get("onednn@colmajor", times["onednn"]) if layout == "colmajor" else times["onednn"]
    return onednn < MARGIN * times[layout]


def choose(w: torch.Tensor, linear: bool = True) -> str | None:
    """The kernel for weight `w` (out, in) on this machine: row-major (the library's usual layout) on
    every other device, whatever MINILLM_KERNELS says; None for a weight no product here reads.
    `linear`: an nn.Linear's weight, which may take "onednn" (float32); else (a tied head) a layout.
    "native" is chosen per model (`decode_kernel`), not here, unless MINILLM_KERNELS names it."""
    if w.dim() != 2 or not w.dtype.is_floating_point:
        return None
    if w.device.type != "cpu":
        return "rowmajor"
    name = mode()
    if name == "core":
        return "rowmajor"
    if name == "onednn":  # where it applies; elsewhere the core's layout
        return "onednn" if linear and "onednn" in _kernels(w.dtype) else "rowmajor"
    if name != "probe":
        return name
    if w.numel() * w.element_size() < PROBE_MIN_BYTES:  # timing it would time noise
        return _rule(w)
    key = (w.shape[0], w.shape[1], w.dtype, torch.get_num_threads(), linear)
    if key not in _verdicts:
        times = _probed(w)
        rule = _rule(w)
        candidates = [k for k in LAYOUTS + (("onednn",) if linear else ()) if k in times]
        best = min(candidates, key=times.__getitem__)
        _verdicts[key] = best if times[best] < MARGIN * times[rule] else rule
    return _verdicts[key]


def decode_kernel(weights: list[torch.Tensor]) -> str | None:
    """"native" when a one-row decode step of the model whose product weights these are should run
    with oneDNN off (module docstring), else None. Only bfloat16/float16 CPU weights qualify: when
    MINILLM_KERNELS=native, or, probing, when the probe's times say the model's weights (those it
    times; smaller ones are read from the cache either way) take at least 10% less time natively
    than in the layouts `choose` gives them."""
    ws = [w for w in weights if w.dim() == 2 and w.device.type == "cpu" and w.dtype in REDUCED]
    if not ws or len(ws) < len(weights):
        return None
    name = mode()
    if name != "probe":
        return "native" if name == "native" else None
    timed = [w for w in ws if w.numel() * w.element_size() >= PROBE_MIN_BYTES]
    if not timed:
        return None
    native = sum(_probed(w)["native"] for w in timed)
    layouts = sum(_probed(w)[choose(w, linear=False)] for w in timed)
    return "native" if native < MARGIN * layouts else None


def _rule(w: torch.Tensor) -> str:
    """The layout rule used before the probe (session 1): wide weights (out >= in) column-major."""
    return "colmajor" if w.shape[0] >= w.shape[1] else "rowmajor"


def stored_as(w: torch.Tensor) -> str | None:
    """The kernel that weight `w` is stored for now (None: neither layout, e.g. a slice)."""
    if w.is_contiguous():
        return "rowmajor"  # "native" and "onednn" too
    if w.t().is_contiguous():
        return "colmajor"
    return None


def is_stored_for(w: torch.Tensor, kernel: str) -> bool:
    """Whether `w` is stored as `kernel` reads it (both, for a weight with one row or column)."""
    return w.t().is_contiguous() if kernel == "colmajor" else w.is_contiguous()


def relaid(w: torch.Tensor, kernel: str) -> torch.Tensor:
    """A new tensor with `w`'s values stored for `kernel` (the (out, in) shape kept)."""
    return w.t().contiguous().t() if kernel == "colmajor" else w.contiguous()


def verdicts() -> dict[tuple, str]:
    """The probe's cached verdicts so far (a copy), for benchmarks and reports."""
    return dict(_verdicts)
