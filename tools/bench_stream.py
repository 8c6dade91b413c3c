"""Benchmark: a decode step stays as fast, and memory stays flat, however long the stream.

    python tools/bench_stream.py --tokens 100000 --threads 2 --json bench_stream.json

Model: a random Llama (4 layers, hidden 256, 4 heads x 64, intermediate 688, vocab 4096, 5.26M
parameters), float32 on CPU. Cache: 4 sinks + a window of 1020 (S = 1024).

Two streams run side by side, one decode step of each in turn, so that whatever else the machine
is doing slows both alike:
- the LONG stream is decoded token by token, from token 0 to --tokens;
- the FRESH stream is a second cache that has *just filled*: S random tokens prefilled in one
  chunk, then --fresh-steps timed decode steps, then back to the just-filled state, and again.
Why just filled: a stream that has not yet reached S tokens attends to fewer keys, so it would be
faster for a reason unrelated to its age. Just past S, it runs exactly what the long stream runs
(S keys, sinks rotated into the query's frame); only the age of the stream differs.
"Back to the just-filled state" copies a snapshot of the cache taken after the first prefill into
the same buffers (k, v, raw sink keys, tokens_seen: the cache's whole state), which is identical
to reset() plus the prefill and costs ~1 ms instead of ~0.3 s per cycle (one thread).

Reported:
- latency ratio long/fresh: per cycle of --fresh-steps paired steps, median(long) / median(fresh);
  the figure is the median over the cycles after the long stream reaches --from tokens (the
  long stream before that point is not comparable: it has to pass S first);
- peak RSS (VmHWM) and current RSS (VmRSS) after --from tokens and at the end, and their growth.
Goals (issue 3): ratio <= 1.05, RSS growth <= 1%. Timings are arrays allocated up front, so
the script's own bookkeeping does not grow memory as the stream gets longer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from array import array
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

from minillm.core.config import ModelConfig  # noqa: E402
import minillm  # noqa: E402
from minillm.core.model import Model  # noqa: E402
from minillm.random_init import init_random  # noqa: E402

SINKS, WINDOW = 4, 1020


def memory_kb() -> dict:
    """{"hwm": peak RSS, "rss": current RSS} in kB, from /proc (Linux) or getrusage (peak only)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        return {"hwm": int(fields["VmHWM"].split()[0]), "rss": int(fields["VmRSS"].split()[0])}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
        return {"hwm": peak // 1024 if sys.platform == "darwin" else peak, "rss": None}


def build_model(seed: int) -> Model:
    config = ModelConfig(family="llama", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4,
                         num_kv_heads=4, head_dim=64, intermediate_size=688, max_position_embeddings=2048,
                         norm="rmsnorm", norm_bias=False, activation="swiglu")
    return minillm.fast.enable(init_random(Model(config), seed, 0.02))


def timed(model, ids, cache) -> float:
    start = time.perf_counter()
    model(ids, cache=cache)
    return time.perf_counter() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000, help="length of the long stream")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--fresh-steps", type=int, default=100, help="timed decode steps per fresh cycle")
    ap.add_argument("--from", dest="start", type=int, default=10_000,
                    help="compare latency from this long-stream length on, and take the first RSS here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    S = SINKS + WINDOW
    if args.start < S or args.tokens <= args.start:
        ap.error(f"need {S} <= --from < --tokens (got --from {args.start}, --tokens {args.tokens})")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args.seed)
    vocab = model.config.vocab_size
    long_ids = torch.randint(0, vocab, (1, args.tokens))
    fresh_prefill = torch.randint(0, vocab, (1, S))
    fresh_ids = torch.randint(0, vocab, (1, args.fresh_steps))
    long_cache = model.new_cache(1, sinks=SINKS, window=WINDOW)
    fresh_cache = model.new_cache(1, sinks=SINKS, window=WINDOW)
    storage = [b.data_ptr() for b in (long_cache.k, long_cache.v, long_cache.raw_sink_k)]

    t_long = array("d", bytes(8 * args.tokens))  # per-step seconds, allocated once
    t_fresh = array("d", bytes(8 * args.tokens))
    mem_start, mem_from = None, None
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.tokens, unit="tok", disable=args.no_progress, mininterval=1.0)
    except ImportError:  # tqdm is a dependency, but the benchmark does not need it
        bar = None
    load_start = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        model(fresh_prefill, cache=fresh_cache)
        filled = [b.clone() for b in (fresh_cache.k, fresh_cache.v, fresh_cache.raw_sink_k)]

        def restore():
            for buf, saved in zip((fresh_cache.k, fresh_cache.v, fresh_cache.raw_sink_k), filled):
                buf.copy_(saved)
            fresh_cache.tokens_seen = S

        # Self-check: a step after restore() is bit-identical to a step right after the prefill.
        first = model(fresh_ids[:, :1], cache=fresh_cache)
        restore()
        assert torch.equal(model(fresh_ids[:, :1], cache=fresh_cache), first), "restore() is not exact"
        step = args.fresh_steps  # forces a fresh cycle on the first step
        for i in range(args.tokens):
            if step == args.fresh_steps:  # back to just filled, in the same buffers
                restore()
                step = 0
            # Alternate which stream goes first, so neither always follows the other's cache misses.
            if i % 2:
                t_long[i] = timed(model, long_ids[:, i : i + 1], long_cache)
                t_fresh[i] = timed(model, fresh_ids[:, step : step + 1], fresh_cache)
            else:
                t_fresh[i] = timed(model, fresh_ids[:, step : step + 1], fresh_cache)
                t_long[i] = timed(model, long_ids[:, i : i + 1], long_cache)
            step += 1
            if i + 1 == S:
                mem_start = memory_kb()
            if i + 1 == args.start:
                mem_from = memory_kb()
            if bar is not None and (i + 1) % 256 == 0:
                bar.update(256)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if bar is not None:
        bar.update(args.tokens - bar.n)
        bar.close()
    mem_end = memory_kb()
    assert [b.data_ptr() for b in (long_cache.k, long_cache.v, long_cache.raw_sink_k)] == storage
    assert long_cache.tokens_seen == args.tokens

    # Cycle c pairs long steps c*F .. c*F+F-1 with one fresh cycle of F steps.
    F = args.fresh_steps
    cycles = []
    for c0 in range(args.start - args.start % F, args.tokens - F + 1, F):
        if c0 >= args.start:
            cycles.append((c0, statistics.median(t_long[c0 : c0 + F]) / statistics.median(t_fresh[c0 : c0 + F])))
    ratio = statistics.median(r for _, r in cycles)
    long_ms = statistics.median(t_long[args.start :]) * 1e3
    fresh_ms = statistics.median(t_fresh[args.start :]) * 1e3
    # Per 10% of the stream after --from: is there a trend?
    span = (args.tokens - args.start) / 10
    trend = []
    for k in range(10):
        rs = [r for c0, r in cycles if args.start + k * span <= c0 < args.start + (k + 1) * span]
        if rs:
            trend.append({"from_token": int(args.start + k * span), "ratio": statistics.median(rs)})

    def growth(key):
        if mem_from[key] is None:
            return None
        return 100.0 * (mem_end[key] - mem_from[key]) / mem_from[key]

    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": "random Llama: 4 layers, hidden 256, 4 heads x 64 (MHA), intermediate 688, vocab 4096, "
                 f"{sum(p.numel() for p in model.parameters())} parameters, float32, CPU",
        "sinks": SINKS, "window": WINDOW, "tokens": args.tokens, "threads": args.threads,
        "fresh_steps": F, "compare_from": args.start, "cycles_compared": len(cycles),
        "latency_ratio_long_over_fresh": ratio,
        "long_step_ms_median": long_ms, "fresh_step_ms_median": fresh_ms,
        "ratio_trend": trend,
        "rss_kb": {"at_S": mem_start, "at_from": mem_from, "end": mem_end},
        "peak_rss_growth_percent": growth("hwm"), "rss_growth_percent": growth("rss"),
        "wall_s": wall, "cpu_s": cpu, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    print(f"{args.tokens} tokens, S = {S} ({SINKS} sinks + {WINDOW}), {args.threads} thread(s), "
          f"{wall:.0f} s wall, {cpu:.0f} s CPU (two streams)")
    print(f"decode step, median from token {args.start}: long {long_ms:.3f} ms, fresh {fresh_ms:.3f} ms")
    print(f"latency ratio long/fresh: {ratio:.3f} (median of {len(cycles)} cycles; goal <= 1.05)")
    print("  trend (from token: ratio): " + ", ".join(f"{t['from_token']}: {t['ratio']:.3f}" for t in trend))
    print(f"peak RSS: {mem_from['hwm'] / 1024:.1f} MiB at {args.start} tokens, {mem_end['hwm'] / 1024:.1f} MiB "
          f"at the end: {growth('hwm'):+.2f}% (goal <= 1%)")
    if mem_from["rss"] is not None:
        print(f"current RSS: {mem_from['rss'] / 1024:.1f} MiB -> {mem_end['rss'] / 1024:.1f} MiB: "
              f"{growth('rss'):+.2f}%")
    print(f"load average at start/end: {load_start[0]:.2f} / {os.getloadavg()[0]:.2f} "
          f"(other work on the machine shows up as noise in the ratio)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
