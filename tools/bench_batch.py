"""Batched streams (issue 13): decode throughput of B independent streams through one cache.

    python tools/bench_batch.py                                  # SmolLM2-135M and random 134M, S 256 and 1024
    python tools/bench_batch.py --models 134M --sizes 256 --batches 1,4,16 --steps 10   # a quick look
    python tools/bench_batch.py --device cuda --dtype bfloat16   # a GPU (record the device)

What it measures, per model and cache size S = 4 + (S - 4):
  sweep     one decode step of B streams at B = --batches, every row's cache full and the rows at
            different stream positions (10 S + 7 + 37 b: different slots, different sink frames), so
            the step is the per-row one a server runs. Aggregate tokens/s (B / step time), per-stream
            latency (the step time), and memory per stream (the cache's bytes per row, exact, and the
            step's peak working memory over the weights and caches, measured).
  baseline  B = 1 decode and the exact parallel streaming evaluation (`perplexity(..., "streaming")`
            on --eval-tokens random ids) against the same two measurements of the engine before
            per-row streams (git revision --baseline, checked out in a temporary worktree). Each side
            runs in its own child process, alternating, --reps times; medians.

Every figure is a median of --reps repetitions of --steps steps, after warm-up steps. The machine
(CPU model, threads, load average, OMP_WAIT_POLICY) is recorded: only ratios from one run count.
Never run it beside other work (two 2-thread jobs on 2 cores slow each other down many times
over). OpenMP's wait policy is the environment's: unset (threads spin a while between parallel
regions) is what a user gets and what this measures by default; OMP_WAIT_POLICY=PASSIVE (tools/bench.py's
choice on shared machines) makes every small op wake a sleeping thread, which here slowed the B=1
SmolLM2 step from 29 to 52 ms and so flatters the batched ratios. Writes JSON and a PNG (`--json`,
`--png`; defaults under docs/bench_batch/).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch  # noqa: E402

REPO = Path(os.environ.get("MINILLM_REPO", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # tools/, for bench.py's helpers

import minillm  # noqa: E402

POLICY = os.environ.get("OMP_WAIT_POLICY")  # the environment's; bench.py would default it to PASSIVE
from bench import PeakMemory, load_avg, machine, median, random_model, sync  # noqa: E402

if POLICY is None:  # keep the environment's own policy, here and in the child processes
    os.environ.pop("OMP_WAIT_POLICY", None)

BASELINE = "7d8689a"  # the last commit before per-row streams (lockstep rows, an int tokens_seen)
OUT = Path(__file__).resolve().parents[1] / "docs" / "bench_batch"


def smollm2_path() -> Path:
    from real_results import gguf_path  # tools/real_results.py: the pip package's GGUF file
    return gguf_path()


def load_model(name: str, dtype, device):
    if name == "smollm2":
        return minillm.load(smollm2_path(), dtype=dtype, device=device)
    return random_model(name, dtype, device)


def filled_cache(model, B: int, S: int, sinks: int = 4, per_row: bool = True):
    """A full cache of B rows at different stream positions (all past S, so every row re-rotates its
    sinks each step); with per_row=False, every row at one position (the lockstep step)."""
    cache = model.new_cache(B, sinks=sinks, window=S - sinks)
    g = torch.Generator(device=cache.device).manual_seed(1)
    for buf in (cache.k, cache.v, cache.raw_sink_k):
        if buf is not None:
            buf.normal_(0.0, 1.0, generator=g)
    base = 10 * S + 7
    # An int for one position (also what the engine before per-row streams takes).
    cache.tokens_seen = base + 37 * torch.arange(B) if per_row and B > 1 else base
    return cache


@torch.inference_mode()
def decode_time(model, cache, steps: int) -> float:
    """Seconds per decode step of all rows (greedy, each row's token fed back on the device)."""
    tok = torch.ones(cache.batch_size, 1, dtype=torch.long, device=model.device)
    sync(model.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
    sync(model.device)
    return (time.perf_counter() - t0) / steps


def row_bytes(cache) -> int:
    """The cache's bytes per stream: K, V and the un-rotated sink keys of one row."""
    bufs = [b for b in (cache.k, cache.v, cache.raw_sink_k) if b is not None]
    return sum(b[:, 0].numel() * b.element_size() for b in bufs)


def sweep(args, name: str, model, S: int) -> list[dict]:
    rows = []
    for B in args.batches:
        cache = filled_cache(model, B, S)
        decode_time(model, cache, args.warmup)
        times = [decode_time(model, cache, args.steps) for _ in range(args.reps)]
        step = median(times)
        with PeakMemory(model.device) as peak:
            decode_time(model, cache, 2)
        rows.append(dict(model=name, S=S, B=B, step_ms=step * 1e3, tokens_per_s=B / step, latency_ms=step * 1e3,
                         reps_ms=[t * 1e3 for t in times], cache_mb_per_stream=row_bytes(cache) / 1e6,
                         step_peak_mb=None if peak.peak is None else peak.peak / 1e6))
        base = rows[0]["tokens_per_s"]
        print(f"  {name:7s} S={S:5d} B={B:3d}: {step * 1e3:8.2f} ms/step  {B / step:8.1f} tok/s  "
              f"({B / step / base:5.2f}x B=1)  cache {row_bytes(cache) / 1e6:.1f} MB/stream", flush=True)
        del cache
        gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------
# Before/after: B = 1 decode and the parallel evaluation, each side in its own child process


@torch.inference_mode()
def child(task: dict) -> dict:
    """Runs in a child process whose minillm is the revision under test (MINILLM_REPO)."""
    from minillm.evaluate import perplexity

    torch.set_num_threads(task["threads"])
    model = load_model(task["model"], getattr(torch, task["dtype"]), torch.device(task["device"]))
    S = task["S"]
    cache = filled_cache(model, 1, S)
    decode_time(model, cache, task["warmup"])
    decode = decode_time(model, cache, task["steps"])
    ids = torch.randint(0, model.config.vocab_size, (task["eval_tokens"],),
                        generator=torch.Generator().manual_seed(0)).tolist()
    perplexity(model, ids[: 2 * S], "streaming", 4, S - 4)  # warm-up
    t0 = time.perf_counter()
    result = perplexity(model, ids, "streaming", 4, S - 4)
    evaluation = time.perf_counter() - t0
    return {"decode_ms": decode * 1e3, "eval_s": evaluation, "ppl": result.ppl}


def worktree(rev: str, tmp: Path) -> Path:
    path = tmp / f"minillm-{rev}"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                   capture_output=True)
    return path


def run_child(repo: Path, task: dict) -> dict:
    env = dict(os.environ, MINILLM_REPO=str(repo))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def before_after(args, name: str, S: int) -> dict:
    task = dict(model=name, S=S, threads=args.threads, dtype=args.dtype, device=args.device, steps=args.steps,
                warmup=args.warmup, eval_tokens=args.eval_tokens)
    runs = {"after": [], "before": []}
    with tempfile.TemporaryDirectory() as tmp:
        old = worktree(args.baseline, Path(tmp))
        try:
            for rep in range(args.reps):  # alternate the two revisions
                for side, repo in (("before", old), ("after", REPO)):
                    runs[side].append(run_child(repo, task))
                print(f"  {name:7s} S={S:5d} rep {rep + 1}: " + ", ".join(
                    f"{side} decode {r[-1]['decode_ms']:.2f} ms, eval {r[-1]['eval_s']:.2f} s"
                    for side, r in runs.items()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)
    med = {side: {k: median([r[k] for r in rs]) for k in ("decode_ms", "eval_s")} for side, rs in runs.items()}
    ppl_rel_diff = abs(runs["after"][0]["ppl"] / runs["before"][0]["ppl"] - 1)
    out = dict(model=name, S=S, baseline=args.baseline, runs=runs, median=med, ppl_rel_diff=ppl_rel_diff,
               decode_after_over_before=med["after"]["decode_ms"] / med["before"]["decode_ms"],
               eval_after_over_before=med["after"]["eval_s"] / med["before"]["eval_s"])
    print(f"  {name:7s} S={S:5d}: B=1 decode after/before {out['decode_after_over_before']:.3f}, parallel "
          f"evaluation after/before {out['eval_after_over_before']:.3f} (time ratios; PPL relative difference "
          f"{ppl_rel_diff:.1e})",
          flush=True)
    return out


# ---------------------------------------------------------------------------------------------


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (name, S), rows in group(result["sweep"]).items():
        Bs = [r["B"] for r in rows]
        ax1.plot(Bs, [r["tokens_per_s"] for r in rows], marker="o", label=f"{name}, S={S}")
        ax2.plot(Bs, [r["latency_ms"] for r in rows], marker="o", label=f"{name}, S={S}")
    for ax, title, unit in ((ax1, "aggregate decode throughput", "tokens/s"),
                            (ax2, "per-stream latency (one step)", "ms per token")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("streams B (rows at different positions)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(f"minillm batched streams, {result['dtype']}, {m['threads']} threads, {m['cpu']}"
                 + (f", {m['gpu']}" if m.get("gpu") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def group(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault((r["model"], r["S"]), []).append(r)
    return out


def print_summary(result: dict) -> None:
    print("\nthroughput vs B=1 (aggregate decode tokens/s):")
    for (name, S), rows in group(result["sweep"]).items():
        base = rows[0]["tokens_per_s"]
        print(f"  {name:7s} S={S:5d}: " + "  ".join(f"B={r['B']}: {r['tokens_per_s'] / base:.2f}x" for r in rows))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,134M", help="smollm2 (the pip package's GGUF) and/or random shapes "
                   "of tools/bench.py (134M, tiny, 7B, ...)")
    p.add_argument("--sizes", default="256,1024", help="cache sizes S (4 sinks + S - 4 window)")
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--baseline", default=BASELINE, help="git revision to compare B=1 decode and evaluation against")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--json", default=str(OUT / "bench_batch.json"))
    p.add_argument("--png", default=str(OUT / "bench_batch.png"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    result = {"machine": machine(device), "omp_wait_policy": POLICY, "dtype": args.dtype, "device": args.device, "load_before": load_avg(),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "sweep": [], "before_after": []}
    print(f"machine: {result['machine']['cpu']}, {args.threads} threads, torch {torch.__version__}, {args.dtype} "
          f"on {args.device}" + (f" ({result['machine']['gpu']})" if device.type == "cuda" else ""), flush=True)
    started = time.perf_counter()
    for name in args.models:
        model = load_model(name, dtype, device)
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
        for S in args.sizes:
            result["sweep"] += sweep(args, name, model, S)
        del model
        gc.collect()
        if not args.no_baseline:
            for S in args.sizes:
                result["before_after"].append(before_after(args, name, S))
    result["load_after"] = load_avg()
    result["seconds"] = time.perf_counter() - started
    print_summary(result)
    for path in (args.json, args.png):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    plot(result, Path(args.png))
    print(f"wrote {args.json} and {args.png} ({result['seconds']:.0f} s; load average {result['load_before']} -> "
          f"{result['load_after']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
