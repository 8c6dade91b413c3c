"""The weight-layout choices (minillm/fast/matvec.py) side by side on SmolLM2-135M, in one process.

    python tools/bench_kernels.py                                  # float32: probe, core, colmajor, rowmajor
    python tools/bench_kernels.py --dtype bfloat16 --sides probe,core
    python tools/bench_kernels.py --sides probe,core,int8 --reps 9 --steps 8 --window 252
    python tools/bench_kernels.py --products 49152x576,3072x576,576x1536   # single products, no model

Each side is its own copy of the model, laid out as MINILLM_KERNELS=<side> says (int8: the probe's
layout, then quantize_int8), with a full 4 + window cache. The sides and a `sum` over a float32
tensor of the weights' size alternate rep by rep (the order reversed every other rep), so each
figure sees the same moment of a shared machine; each rep times --steps decode steps. Printed per
side: the median and best ms per step, the weights' bytes over the best step (GB/s), and that over
the `sum`'s best GB/s (the fraction of the read bound, weights only; the K/V read is not counted).
It also prints the probe's verdict per weight shape. Ratios within one run are what count.

`--products` times single (1, in) x (in, out) products instead, each over enough copies of the
weight to be read from memory, alternated with a `sum` over the same bytes: float32 stored (out, in)
and (in, out), the (out, in) rows split over threads by hand (one F.linear per thread on its
slice), bfloat16 both ways, and torch._weight_int8pack_mm with float32 and bfloat16 activations.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import minillm  # noqa: E402
from minillm.apps.generation import prefill  # noqa: E402
from minillm.fast import layout, matvec  # noqa: E402


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every product's weight once (a tied embedding as
    the head), int8 weights and their scales included; norms and biases too."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen or name == "embed.weight" and model.lm_head is not None:
            continue  # an untied embedding is read one row per token
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def products(shapes: list[tuple[int, int]], reps: int) -> None:
    import torch.nn.functional as F
    from concurrent.futures import ThreadPoolExecutor

    T = torch.get_num_threads()
    pool = ThreadPoolExecutor(T)

    def split_rows(x, w):  # one product per thread-sized slice of the output rows
        step = -(-w.shape[0] // T)
        return torch.cat(list(pool.map(lambda i: F.linear(x, w[i * step:(i + 1) * step]), range(T))), -1)

    for out, inn in shapes:
        copies = max(1, int(200e6 // (out * inn * 4)))
        g = torch.Generator().manual_seed(0)
        w32 = [torch.randn(out, inn, generator=g) for _ in range(copies)]
        sides = {"f32 rowmajor": ([w.contiguous() for w in w32], lambda x, w: F.linear(x, w), torch.float32),
                 "f32 colmajor": ([w.t().contiguous().t() for w in w32], lambda x, w: F.linear(x, w), torch.float32),
                 "f32 split rows": (w32, split_rows, torch.float32),
                 "bf16 rowmajor": ([w.bfloat16() for w in w32], lambda x, w: F.linear(x, w), torch.bfloat16),
                 "bf16 colmajor": ([w.bfloat16().t().contiguous().t() for w in w32], lambda x, w: F.linear(x, w),
                                   torch.bfloat16)}
        q = []
        for w in w32:
            scale = w.abs().amax(1) / 127
            q.append((torch.round(w / scale[:, None]).to(torch.int8), scale))
        sides["int8pack f32 x"] = (q, lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1]), torch.float32)
        sides["int8pack bf16 x"] = (q, lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1].bfloat16()), torch.bfloat16)
        sides["sum f32"] = (w32, lambda x, w: w.sum(), torch.float32)
        del w32
        times = {k: [] for k in sides}
        names = list(sides)
        for rep in range(reps):
            for k in names if rep % 2 == 0 else names[::-1]:
                ws, f, dt = sides[k]
                x = torch.ones(1, inn, dtype=dt)
                t0 = time.perf_counter()
                for w in ws:
                    f(x, w)
                times[k].append((time.perf_counter() - t0) / len(ws))
        for k in names:
            ws = sides[k][0]
            w = ws[0][0] if isinstance(ws[0], tuple) else ws[0]
            nbytes = w.numel() * w.element_size()
            print(f"{out}x{inn} {k:16s} median {statistics.median(times[k]) * 1e3:8.3f} ms  best "
                  f"{min(times[k]) * 1e3:8.3f} ms  {nbytes / min(times[k]) / 1e9:5.1f} GB/s (best)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="probe,core,colmajor,rowmajor")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--products", default="", help="time single products of these shapes (OUTxIN,...) instead")
    args = p.parse_args(argv)
    from real_results import gguf_path

    torch.set_num_threads(args.threads)
    if args.products:
        products([tuple(int(v) for v in s.split("x")) for s in args.products.split(",")], args.reps)
        return 0
    dtype = getattr(torch, args.dtype)
    sides = args.sides.split(",")
    models, caches, toks = {}, {}, {}
    ids = torch.randint(256, 40000, (1, 4 + args.window + 4), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for side in sides:
            os.environ[matvec.ENV] = "probe" if side == "int8" else side
            t0 = time.perf_counter()
            model = minillm.load(gguf_path(), dtype=dtype)
            if side == "int8":
                minillm.quantize_int8(model)
            load_s = time.perf_counter() - t0
            cache = model.new_cache(1, 4, args.window)
            toks[side] = prefill(model, ids, cache).argmax().view(1, 1)
            models[side], caches[side] = model, cache
            kinds = sorted({(tuple(w.shape), matvec.stored_as(w)) for w in layout._weights(model)})
            print(f"{side:9s} loaded in {load_s:.1f} s, {weight_bytes(model) / 1e6:.0f} MB of weights; layouts {kinds}",
                  flush=True)
        print("probe verdicts:", {f"{o}x{i} {str(d)[6:]} {t}t{'' if lin else ' head'}": k for (o, i, d, t, lin), k in matvec.verdicts().items()})
        nbytes = {s: weight_bytes(m) for s, m in models.items()}
        buf = torch.ones(max(nbytes.values()) // 4)
        times = {s: [] for s in sides + ["sum"]}
        for rep in range(args.reps):
            order = sides + ["sum"]
            for side in order if rep % 2 == 0 else order[::-1]:
                if side == "sum":
                    t0 = time.perf_counter()
                    buf.sum()
                    times["sum"].append(time.perf_counter() - t0)
                    continue
                os.environ[matvec.ENV] = "probe" if side == "int8" else side
                model, cache, tok = models[side], caches[side], toks[side]
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
                    tok.item()
                times[side].append((time.perf_counter() - t0) / args.steps)
                toks[side] = tok
    sum_gbs = buf.numel() * 4 / min(times["sum"]) / 1e9
    print(f"\n{args.dtype}, {args.threads} threads, window {args.window}, {args.reps} reps x {args.steps} steps; "
          f"sum over {buf.numel() * 4 / 1e6:.0f} MB: best {sum_gbs:.1f} GB/s, median "
          f"{buf.numel() * 4 / statistics.median(times['sum']) / 1e9:.1f} GB/s; load {os.getloadavg()[0]:.2f}")
    base = statistics.median(times[sides[0]])
    for side in sides:
        t = times[side]
        gbs = nbytes[side] / min(t) / 1e9
        print(f"{side:9s} median {statistics.median(t) * 1e3:7.2f} ms  best {min(t) * 1e3:7.2f} ms  "
              f"{gbs:5.1f} GB/s (best) = {100 * gbs / sum_gbs:3.0f}% of sum; median / {sides[0]}'s "
              f"{statistics.median(t) / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
