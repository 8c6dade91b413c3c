"""Soak: stream a very long run through ONE sink + window cache and check it stays healthy.

    python tools/soak.py --mode decode --dtype float32 --steps 1000000 --json docs/soak/decode-float32.json
    python tools/soak.py --mode chunk --steps 1000000 --json docs/soak/chunk-float32.json

Model: a random Llama built with minillm's own API (`ModelConfig` + `Model`), seeded init, by
default (--layers, --hidden) 2 layers, hidden 64, 4 heads x 16, intermediate 171, vocab 512, 164,288 parameters (see `build_model`, its
parameter count goes into the JSON). Cache: `model.new_cache(1, sinks=4, window=--window)`.

Modes:
- decode: one token per step, `model(next_id, cache=cache)` with a (1, 1) tensor (the decode path).
  The token fed back is SAMPLED from softmax(logits) (temperature 1, float32) by torch.multinomial
  with a seeded torch.Generator, so the stream neither collapses onto one repeated token (argmax of
  a random model soon cycles) nor depends on anything but --seed. The JSON records how many
  distinct tokens the last 10k steps fed back.
- chunk: the tokens go through the chunk path in chunks of varying length, `model(ids, cache=cache)`
  with ids (1, n). The lengths repeat a fixed seeded pattern (1 to about 3 x S, including lengths
  above S, which window inside the chunk, and above the model's 1024-token piece size), so any two
  stretches of whole periods carry the same work and their timings are comparable. Each chunk's
  first token is sampled from the previous chunk's last logits (as above); the rest are drawn
  uniformly from a second seeded generator. --steps counts tokens in this mode.

Checked and reported (JSON, plus one line per --progress steps on stdout):
- NaN/Inf: the number of non-finite logits over every position the model returned (must be 0),
  counted on the device in a running tensor, and the largest |logit| seen;
- latency: median step time (decode) over the first 10k steps after the cache fills against the
  last 10k steps, and their ratio last/first; for chunk mode, the median per-period time over the
  whole periods in the first and last ~10k tokens after the fill; plus medians per 10% of the run.
  Each is measured twice: wall time (perf_counter) and the thread's own CPU time (thread_time,
  intra-op threads = 1 so the work runs on this thread). On a shared machine the wall figures
  move with the other processes' load (the load averages are recorded); CPU time much less so;
- memory: VmRSS and VmHWM (peak) from /proc/self/status right after the cache fills and at the end;
- steps/s, wall and CPU time, machine (platform.processor(), /proc/cpuinfo model name), torch
  version and threads.
Per-step times go into an array allocated before the run, so bookkeeping does not grow memory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from array import array
from pathlib import Path

# On a shared machine a spinning OpenMP team stalls when another process holds a core
# (tools/bench.py says the same); sleeping waiters avoid it. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install needed

import minillm  # noqa: E402

SINKS = 4
LATENCY_WINDOW = 10_000  # steps (decode) or tokens (chunk) compared at each end of the run


def read_status() -> dict:
    """{"rss_kb": VmRSS, "hwm_kb": VmHWM} from /proc/self/status (Linux); None where unavailable."""
    out = {"rss_kb": None, "hwm_kb": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                out["hwm_kb"] = int(line.split()[1])
    except OSError:
        pass
    return out


def cpu_model_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def build_model(seed: int, dtype: torch.dtype, layers: int = 2, hidden: int = 64, heads: int = 4,
                vocab: int = 512) -> minillm.Model:
    """A random Llama (RMSNorm, SwiGLU, RoPE), seeded: weights ~ N(0, 1/fan_in), embedding ~ N(0, 1),
    norms 1, so logits have a spread of order one (not a flat distribution)."""
    head_dim = hidden // heads
    config = minillm.ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers,
                                 num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                                 intermediate_size=int(hidden * 8 / 3 + 1), max_position_embeddings=4096,
                                 norm="rmsnorm", norm_bias=False, activation="swiglu")
    model = minillm.Model(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 2 and "embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g))
    return minillm.fast.enable(model.to(dtype).eval())


def chunk_pattern(seed: int, S: int) -> list[int]:
    """A fixed, seeded sequence of chunk lengths, repeated for the whole chunk run."""
    g = torch.Generator().manual_seed(seed + 1)
    lengths = [1, 2, 3, S - 1, S, S + 1, 1100]  # edges: decode-sized, around S, past the 1024 piece
    lengths += torch.randint(4, 64, (8,), generator=g).tolist()
    lengths += torch.randint(64, 3 * S, (3,), generator=g).tolist()
    perm = torch.randperm(len(lengths), generator=g).tolist()
    return [lengths[i] for i in perm]


def git_state() -> dict:
    """The commit the engine was run from, and whether minillm/ differed from it."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    out = {"engine": str(Path(minillm.__file__).parent), "commit": None, "minillm_modified": None}
    if (root / "ENGINE_COMMIT").is_file():  # a `git archive COMMIT` snapshot, no .git
        out["commit"] = (root / "ENGINE_COMMIT").read_text().strip()
        out["snapshot"] = "git archive"
        return out
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "minillm"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out.update(commit=head or None, minillm_modified=bool(dirty))
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def latency(times, k: int, idx_fill: int, pattern, ends, S: int) -> dict:
    """Median time of the first and last LATENCY_WINDOW steps (tokens) after the fill, and per tenth."""
    if pattern is None:
        n_after = k - idx_fill
        w = min(LATENCY_WINDOW, n_after // 2)
        first, last = times[idx_fill:idx_fill + w], times[k - w:k]
        lat = {"unit": "decode step", "window": w}
        tenths = [times[idx_fill + j * n_after // 10: idx_fill + (j + 1) * n_after // 10] for j in range(10)]
    else:
        P = len(pattern)
        # whole periods: period p covers chunks [p*P, (p+1)*P); keep only those starting after the fill
        n_full = k // P
        period_time = [sum(times[p * P:(p + 1) * P]) for p in range(n_full)]
        ok = [p for p in range(n_full) if (0 if p == 0 else ends[p * P - 1]) >= S]
        period_tokens = sum(pattern)
        w = max(1, min(math.ceil(LATENCY_WINDOW / period_tokens), len(ok) // 2))
        first, last = [period_time[p] for p in ok[:w]], [period_time[p] for p in ok[-w:]]
        lat = {"unit": f"period of {P} chunks ({period_tokens} tokens)", "window": w, "pattern": pattern}
        tenths = [period_time[ok[0] + j * len(ok) // 10: ok[0] + (j + 1) * len(ok) // 10] for j in range(10)]
    lat["first_median_ms"] = 1e3 * statistics.median(first)
    lat["last_median_ms"] = 1e3 * statistics.median(last)
    lat["ratio_last_over_first"] = lat["last_median_ms"] / lat["first_median_ms"]
    lat["median_ms_per_tenth"] = [round(1e3 * statistics.median(t), 5) for t in tenths if len(t)]
    return lat


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("decode", "chunk"), default="decode")
    ap.add_argument("--steps", type=int, default=100_000, help="decode steps, or tokens in chunk mode")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 (or float64)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--window", type=int, default=1020, help="window (cache S = 4 sinks + window)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--progress", type=int, default=50_000, help="print a line every N steps/tokens")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    dtype = minillm.parse_dtype(args.dtype)
    if args.threads < 1 or args.window < 1 or args.steps < 1 or args.progress < 1:
        ap.error("--threads, --window, --steps and --progress must be >= 1")
    S = SINKS + args.window
    if args.steps <= S:
        ap.error(f"--steps must exceed the cache size S={S}, so that the cache fills")
    if args.mode == "chunk":  # the latency comparison needs two whole periods after the fill
        need = S + 3 * sum(chunk_pattern(args.seed, S))
        if args.steps < need:
            ap.error(f"--mode chunk with S={S} needs --steps >= {need} (the fill plus three periods)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.with_name(args.json.name + ".tmp").write_text("")  # fail now, not after the run
        args.json.with_name(args.json.name + ".tmp").unlink()

    torch.set_num_threads(args.threads)
    git = git_state()
    model = build_model(args.seed, dtype, layers=args.layers, hidden=args.hidden)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    cache = model.new_cache(batch_size=1, sinks=SINKS, window=args.window)
    sample_gen = torch.Generator().manual_seed(args.seed)
    fill_gen = torch.Generator().manual_seed(args.seed + 2)

    bad = torch.zeros((), dtype=torch.int64)  # non-finite logits, counted without a sync per step
    amax = torch.zeros((), dtype=torch.float32)
    first_token = torch.zeros((1, 1), dtype=torch.int64)

    def check(logits):
        nonlocal bad, amax
        f = logits.float()
        bad += (~torch.isfinite(f)).sum()
        amax = torch.maximum(amax, f.abs().nan_to_num(0.0, 0.0, 0.0).max())
        last = f[0, -1].nan_to_num(0.0, 0.0, 0.0)
        probs = torch.softmax(last, dim=-1)
        return torch.multinomial(probs, 1, generator=sample_gen).view(1, 1)

    if args.mode == "decode":
        n_units = args.steps  # one time per step
        pattern = None
    else:
        pattern = chunk_pattern(args.seed, S)
        n_units = args.steps  # at most one chunk per token
    times = array("d", bytes(8 * n_units))  # per-step (decode) or per-chunk (chunk) wall seconds
    cpu_times = array("d", bytes(8 * n_units))  # the same, this thread's CPU seconds
    ends = array("q", bytes(8 * n_units)) if pattern else None  # tokens seen after each chunk
    fed = array("l", bytes(array("l").itemsize * LATENCY_WINDOW))  # last tokens fed back (ring)
    mem_fill, t_fill, idx_fill, load_fill = None, None, None, None
    load_start = os.getloadavg()
    print(f"soak: mode={args.mode} dtype={args.dtype} steps={args.steps} S={S} model=llama "
          f"{c.num_layers}x{c.hidden_size} vocab {c.vocab_size} ({n_params:,} params) threads={args.threads}",
          flush=True)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    last_print, last_print_t, last_print_n = 0, wall0, 0
    n_done, k = 0, 0  # tokens through the cache, timed units
    nxt = first_token
    with torch.inference_mode():
        while n_done < args.steps:
            if pattern is None:
                ids = nxt
            else:
                n = min(pattern[k % len(pattern)], args.steps - n_done)
                rest = torch.randint(0, c.vocab_size, (1, n - 1), generator=fill_gen)
                ids = torch.cat([nxt, rest], dim=1)
            t0, c0 = time.perf_counter(), time.thread_time()
            logits = model(ids, cache=cache)
            nxt = check(logits)
            times[k] = time.perf_counter() - t0
            cpu_times[k] = time.thread_time() - c0
            n_done += ids.shape[1]
            if ends is not None:
                ends[k] = n_done
            fed[k % LATENCY_WINDOW] = int(nxt)
            k += 1
            if idx_fill is None and n_done >= S:
                mem_fill, t_fill, idx_fill, load_fill = read_status(), time.perf_counter() - wall0, k, os.getloadavg()
            if n_done - last_print >= args.progress or n_done == args.steps:
                now = time.perf_counter()
                rate = (n_done - last_print_n) / (now - last_print_t)
                st = read_status()
                print(f"soak: {n_done:>9,} tokens  {rate:7.1f} tok/s  non-finite {int(bad)}  "
                      f"RSS {st['rss_kb']} kB  peak {st['hwm_kb']} kB  elapsed {now - wall0:7.1f} s", flush=True)
                last_print = n_done - n_done % args.progress
                last_print_t, last_print_n = now, n_done
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    mem_end = read_status()
    nonfinite = int(bad)

    # Latency: first LATENCY_WINDOW after the fill vs the last LATENCY_WINDOW, wall and CPU.
    lat = {"wall": latency(times, k, idx_fill, pattern, ends, S), "cpu": latency(cpu_times, k, idx_fill, pattern, ends, S)}

    tail = min(k, LATENCY_WINDOW)
    result = {
        "tool": "tools/soak.py", "argv": sys.argv[1:] if argv is None else list(argv),
        "mode": args.mode, "dtype": str(dtype).removeprefix("torch."), "tokens": n_done, "timed_calls": k,
        "seed": args.seed, "sinks": SINKS, "window": args.window, "cache_size": S,
        "model": {"family": c.family, "layers": c.num_layers, "hidden": c.hidden_size, "heads": c.num_heads,
                  "head_dim": c.head_dim, "intermediate": c.intermediate_size, "vocab": c.vocab_size,
                  "params": n_params, "init": "seeded: N(0,1/fan_in) linears, N(0,1) embedding, norms 1"},
        "feedback": "multinomial sample of softmax(float32 logits), seeded torch.Generator",
        "distinct_tokens_fed_last_10k": len(set(fed[:tail])),
        "nonfinite_logits": nonfinite, "max_abs_logit": float(amax),
        "latency": lat, "latency_note": "wall: perf_counter, moves with the machine's load; cpu: thread_time",
        "memory_kb": {"after_fill": mem_fill, "end": mem_end,
                      "rss_growth_kb": mem_end["rss_kb"] - mem_fill["rss_kb"] if mem_fill["rss_kb"] else None},
        "time_to_fill_s": t_fill, "wall_s": wall, "cpu_s": cpu, "tokens_per_s": n_done / wall,
        "calls_per_s": k / wall,
        "machine": {"processor": platform.processor(), "cpu_model": cpu_model_name(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "loadavg_start": load_start, "loadavg_at_fill": load_fill, "loadavg_end": os.getloadavg()},
        "cache_tokens_seen": int(cache.tokens_seen[0]), "git": git,
    }
    print(f"soak: done {args.mode} {result['dtype']}: {n_done:,} tokens in {wall:.1f} s "
          f"({n_done / wall:.1f} tok/s), non-finite logits {nonfinite}, latency last/first: wall "
          f"{lat['wall']['ratio_last_over_first']:.3f} ({lat['wall']['first_median_ms']:.4f} -> "
          f"{lat['wall']['last_median_ms']:.4f} ms), CPU {lat['cpu']['ratio_last_over_first']:.3f} "
          f"({lat['cpu']['first_median_ms']:.4f} -> {lat['cpu']['last_median_ms']:.4f} ms), "
          f"RSS {mem_fill['rss_kb']} -> {mem_end['rss_kb']} kB, peak {mem_fill['hwm_kb']} -> {mem_end['hwm_kb']} kB",
          flush=True)
    if args.json is not None:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, args.json)
    return 1 if nonfinite else 0


if __name__ == "__main__":
    sys.exit(main())
