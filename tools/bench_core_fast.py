"""Before and after the core/fast split (issue 19), and what the core alone costs.

    python tools/bench_core_fast.py                       # SmolLM2-135M and the random 134M, 5 alternations
    python tools/bench_core_fast.py --models 134M --reps 5 --no-compile

Three sides, each in its own child process, alternating within every repetition, on one machine:
  before   git revision --baseline (the engine before the split), checked out in a temporary worktree;
  after    this tree, `minillm.load(...)` (the fast layer on, the default);
  core     this tree, `minillm.load(..., fast=False)`: the core alone.
Each child loads the model from a safetensors directory written once (SmolLM2 from the pip package's
GGUF, dequantized to float32; the 134M random Llama of tools/bench.py), then measures:
  decode      B=1 decode, ms per step (the fastest of 5 runs of --steps), a full 4+1020 cache past S
              (the sinks re-rotated each step);
  compiled    the same through compile_decode (before/after only; after one warm-up compile);
  prefill     a 2,048-token prompt through an empty 4+1020 cache, seconds (the faster of 2);
  evaluation  the parallel streaming perplexity of 2,048 tokens at S = 256, seconds (the faster of 2);
  b16         one decode step of 16 rows at 16 different positions, ms (the fastest of 3 runs).
Within a child each figure is the fastest of its runs (the least disturbed); across children, the
median over the repetitions, with the order of the sides reversed every other repetition. The JSON
keeps every run and the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
HERE = TOOLS.parent
BASELINE = "1f48cf2"  # the last commit with the engine before the core/fast split
OUT = HERE / "docs" / "bench_core_fast"
MEASURES = ("decode_ms", "compiled_ms", "prefill_s", "eval_s", "b16_ms")


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def child(task: dict) -> dict:
    """Runs with the revision under test first on sys.path (MINILLM_REPO)."""
    sys.path.insert(0, os.environ["MINILLM_REPO"])
    import torch

    import minillm
    from minillm.evaluate import perplexity

    torch.set_num_threads(task["threads"])
    model = minillm.load(task["dir"]).eval()
    if task["side"] == "core":
        minillm.fast.disable(model)
    V = model.config.vocab_size

    def decode(cache, steps, blocks=1):
        """Seconds per step: the fastest of `blocks` runs of `steps` (the least disturbed by the
        machine's other work)."""
        best = float("inf")
        for _ in range(blocks):
            tok = torch.ones(cache.batch_size, 1, dtype=torch.long)
            t0 = time.perf_counter()
            for _ in range(steps):
                tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
            best = min(best, (time.perf_counter() - t0) / steps)
        return best

    def fastest(fn, times=2):
        best = float("inf")
        for _ in range(times):
            t0 = time.perf_counter()
            value = fn()
            best = min(best, time.perf_counter() - t0)
        return best, value

    def full_cache(B):
        cache = model.new_cache(B, 4, 1020)
        g = torch.Generator().manual_seed(1)
        for buf in (cache.k, cache.v, cache.raw_sink_k):
            if buf is not None:
                buf.normal_(0.0, 1.0, generator=g)
        cache.tokens_seen = 10 * 1024 + 7 + 37 * torch.arange(B) if B > 1 else 10 * 1024 + 7
        return cache

    out = {}
    with torch.inference_mode():
        ids = torch.randint(0, V, (1, 2048), generator=torch.Generator().manual_seed(0))
        model(ids[:, :300], cache=model.new_cache(1, 4, 1020))  # warm-up
        out["prefill_s"] = fastest(lambda: model(ids, cache=model.new_cache(1, 4, 1020)))[0]
        perplexity(model, ids[0, :512].tolist(), "streaming", 4, 252)  # warm-up
        out["eval_s"], result = fastest(lambda: perplexity(model, ids[0].tolist(), "streaming", 4, 252))
        out["ppl"] = result.ppl
        cache = full_cache(1)
        decode(cache, 3)
        out["decode_ms"] = decode(cache, task["steps"], 5) * 1e3
        cache16 = full_cache(16)
        decode(cache16, 2)
        out["b16_ms"] = decode(cache16, max(3, task["steps"] // 4), 3) * 1e3
        if task["compile"] and task["side"] != "core":
            if hasattr(model, "compile_decode"):  # the engine before the split; as the CLI's --compile
                model.compile_decode()
            else:
                minillm.fast.compile_decode(model)
            decode(cache, 3)  # compiles here
            out["compiled_ms"] = decode(cache, task["steps"], 5) * 1e3
    return out


def prepare(name: str, tmp: Path) -> Path:
    """The model as a safetensors directory (written once; both revisions load it)."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(1, str(TOOLS))
    import torch

    import minillm

    path = tmp / name
    if name == "smollm2":
        from real_results import gguf_path

        model = minillm.load(gguf_path(), dtype=torch.float32)
    else:
        from bench import random_model

        model = random_model(name, torch.float32, torch.device("cpu"))
    minillm.save_pretrained(model, path)
    return path


def run_child(repo: Path, task: dict) -> dict:
    env = dict(os.environ, MINILLM_REPO=str(repo), PYTHONPATH="")
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], env=env, capture_output=True,
                       text=True, timeout=1800)
    if p.returncode:
        raise SystemExit(f"child {task['side']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,134M")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--json", default=str(OUT / "bench_core_fast.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    sys.path.insert(0, str(TOOLS))
    from bench import _cpu_name  # the machine's CPU, as every benchmark here names it

    result = dict(cpu=_cpu_name(), cpu_flags=cpu_flags(), threads=args.threads, baseline=args.baseline,
                  omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"), models={})
    print(f"CPU: {result['cpu']} ({' '.join(result['cpu_flags'])}), {args.threads} threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "baseline"
        subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", str(old), args.baseline], check=True,
                       capture_output=True)
        try:
            for name in args.models.split(","):
                path = prepare(name, tmp)
                runs = {"before": [], "after": [], "core": []}
                sides = [("before", old), ("after", HERE), ("core", HERE)]
                for rep in range(args.reps):
                    for side, repo in sides if rep % 2 == 0 else sides[::-1]:  # neither side always first
                        task = dict(side=side, dir=str(path), threads=args.threads, steps=args.steps,
                                    compile=not args.no_compile)
                        runs[side].append(run_child(repo, task))
                    print(f"  {name} rep {rep + 1}: " + "; ".join(
                        f"{side} " + " ".join(f"{k}={r[-1][k]:.4g}" for k in MEASURES if k in r[-1])
                        for side, r in runs.items()), flush=True)
                med = {side: {k: statistics.median(r[k] for r in rs) for k in MEASURES if k in rs[0]}
                       for side, rs in runs.items()}
                ratios = {k: med["after"][k] / med["before"][k] for k in med["after"] if k in med["before"]}
                core = {k: med["core"][k] / med["after"][k] for k in med["core"]}
                result["models"][name] = dict(runs=runs, median=med, after_over_before=ratios,
                                              core_over_fast=core,
                                              ppl_rel_diff=abs(runs["after"][0]["ppl"] / runs["before"][0]["ppl"] - 1),
                                              core_ppl_rel_diff=abs(runs["core"][0]["ppl"] / runs["after"][0]["ppl"] - 1))
                print(f"{name}: after/before " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
                      + "; core/fast " + ", ".join(f"{k} {v:.2f}" for k, v in core.items()), flush=True)
        finally:
            subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", str(old)], capture_output=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
