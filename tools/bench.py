"""minillm benchmarks (issue 6): one command, a table on stdout, JSON and a PNG.

    python tools/bench.py --threads 2 --json bench.json --png bench.png       # all four sections
    python tools/bench.py --only recompute --sizes 256,1024                    # one section
    python tools/bench.py --device cuda --dtype bfloat16 --models 134M,7B      # a GPU (see gpu_bench.sh)

Sections (`--only`, comma-separated):
  recompute  streaming decode vs the sliding window with recomputation (the paper's Figure 10):
             per-token latency at steady state (cache full) vs one dense forward over S tokens,
             and the peak memory of each, for every cache size S in --sizes.
  hf         greedy decoding of 256 tokens after a 2,048-token prompt: minillm through a
             4 + 1020 cache vs transformers' generate() with its default cache, both loading the
             same save_pretrained checkpoint; prefill time and decode tokens/s.
  bandwidth  the machine's read bandwidth (a sum over a >= 1 GiB float32 tensor) vs the bytes a
             decode step must read (weights but the input embedding, plus the K/V it attends);
             also what the cache-relative positions cost (sink re-rotation vs the paper's).
  compile    minillm.fast.compile_decode(model) (torch.compile of the fixed-shape decode step) vs eager.

Models are random (Llama-shaped, std 0.02): the timings do not depend on the values. "134M" is
12 layers, hidden 768, 12 heads, intermediate 2048, vocab 32000, untied; "tiny" is the shipped
weights/llama-tiny when present, else a random model of its shape; "7B" is Llama-2-7B-shaped and
is built directly on the device in the requested dtype.

Noise: every comparison alternates its two sides rep by rep, and each figure is the median of
--reps repetitions (>= 5). The load average before and after each section is recorded, since
these machines are shared. transformers is imported here only, never by minillm.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

# On a shared machine, a core held by another process stalls every OpenMP barrier of a spinning
# thread team: with 2 threads the 134M decode step took 152 ms instead of 33 while one other
# process ran here. Sleeping waiters avoid that; both engines run under the same policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import minillm  # noqa: E402
from minillm.core.config import ModelConfig  # noqa: E402
from minillm.core.model import Model  # noqa: E402
from minillm.random_init import init_random  # noqa: E402
from minillm.core.positions import rope_rotate, rope_tables  # noqa: E402

LLAMA = dict(family="llama", norm="rmsnorm", norm_bias=False, activation="swiglu", norm_eps=1e-5,
             max_position_embeddings=4096)
SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "smoke": (64, 2, 4, 2, 128, 512),
    "tiny": (256, 6, 8, 4, 688, 4096),
    "134M": (768, 12, 12, 12, 2048, 32000),
    "7B": (4096, 32, 32, 32, 11008, 32000),
}
SHIPPED_TINY = REPO / "weights" / "llama-tiny"
SECTIONS = ("recompute", "hf", "bandwidth", "compile")
# torch.compile settings of the compile section. CPU: inductor's own C++ matrix-vector kernels
# (max-autotune picks them over MKL when faster), with the weights frozen as constants
# (inductor's freezing, set by the section on CPU). CUDA: CUDA graphs, since a small model's eager
# decode step is bound by kernel launches.
COMPILE_DEFAULTS = {"cpu": {"mode": "max-autotune"}, "cuda": {"mode": "reduce-overhead"}}


# ---------------------------------------------------------------------------------------------
# Machine, timing, memory


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_avg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(xs) -> float:
    return statistics.median(xs)


class PeakMemory:
    """Peak memory of a block above what was allocated before it: CUDA's allocator statistics, or
    on CPU the resident set's high-water mark (reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _proc_status("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.peak = _proc_status("VmHWM") - self.base


def _proc_status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def _malloc_returns_memory() -> None:
    """glibc keeps freed blocks below a (growing) threshold, which would hide later peaks in the
    RSS; a fixed mmap threshold returns every large block to the system when it is freed. Only
    for the memory probe's child process: it makes every large allocation fault its pages in
    afresh, which would slow down (and bias) the timings of code that allocates big temporaries."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# Models and caches


def config_for(name: str) -> ModelConfig:
    hidden, layers, heads, kv, inter, vocab = SHAPES[name]
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                       head_dim=hidden // heads, intermediate_size=inter, **LLAMA)


def random_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Model:
    """Built on the meta device, materialised on `device` in `dtype`, then filled: a 7B model never
    exists in float32 or on the CPU."""
    with torch.device("meta"):
        model = Model(config_for(name))
    return minillm.fast.enable(init_random(model.to(dtype).to_empty(device=device), seed, 0.02))


def bench_model(name: str, dtype, device) -> tuple[Model, str]:
    if name == "tiny" and (SHIPPED_TINY / "config.json").is_file():
        return minillm.load(SHIPPED_TINY, dtype=dtype, device=device), f"{SHIPPED_TINY.relative_to(REPO)} (shipped)"
    return random_model(name, dtype, device), f"random {name}"


def n_params(model: Model) -> int:
    return sum(p.numel() for p in model.parameters())


def decode_bytes(model: Model, keys: float) -> float:
    """Bytes one decode step must read: every weight but the input embedding table (unless it is
    also the output head), plus K and V of `keys` attended keys in every layer."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if n != "embed.weight" or c.tie_word_embeddings)
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * keys * model.embed.weight.element_size()
    return weights + kv


def full_cache(model: Model, S: int, sinks: int = 4):
    """A cache at steady state (full, sinks being re-rotated every step) without a prefill: the
    decode step's cost does not depend on the values it holds, only on their shape."""
    cache = model.new_cache(1, sinks=sinks, window=S - sinks)
    g = torch.Generator(device=cache.device).manual_seed(1)
    for buf in (cache.k, cache.v, cache.raw_sink_k):
        if buf is not None:
            buf.normal_(0.0, 1.0, generator=g)
    cache.tokens_seen = 10 * S + 7  # well past S: the ring has wrapped, the slot moves each step
    return cache


@torch.inference_mode()
def decode_steps(model: Model, cache, steps: int) -> float:
    """Seconds per token for `steps` decode steps (greedy, the token fed back on the device)."""
    device = model.device
    tok = torch.tensor([[1]], device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
    sync(device)
    return (time.perf_counter() - t0) / steps


# ---------------------------------------------------------------------------------------------
# Section 1: streaming vs sliding window with recomputation


@torch.inference_mode()
def section_recompute(args, device, dtype) -> dict:
    rows = []
    for name in args.recompute_models:
        # CPU memory is measured in a child process, whose allocator returns every freed block;
        # here the allocator keeps its defaults, so the timings are those of an ordinary process.
        memory = _memory_in_child(args, name, dtype) if device.type == "cpu" else None
        model, source = bench_model(name, dtype, device)
        if memory is None:  # CUDA's allocator statistics need no separate process
            memory = peak_memories(model, args.sizes, device)
        for S in args.sizes:
            ids = _recompute_ids(model, S, device)
            cache = full_cache(model, S)
            decode_steps(model, cache, 2)  # warm-up
            model(ids[:, :8])  # warm-up of the dense path
            stream, recompute = [], []
            for _ in range(args.reps):  # alternate the two sides
                stream.append(decode_steps(model, cache, args.steps))
                sync(device)
                t0 = time.perf_counter()
                model(ids, logits_to_keep=1)  # the baseline: a dense forward over the last S tokens
                sync(device)
                recompute.append(time.perf_counter() - t0)
            cache_bytes = cache.k.nbytes + cache.v.nbytes + (cache.raw_sink_k.nbytes if cache.raw_sink_k is not None else 0)
            del cache
            s, r = median(stream), median(recompute)
            mem = memory.get(S, {})
            row = dict(model=name, source=source, S=S, stream_ms=s * 1e3, recompute_ms=r * 1e3, speedup=r / s,
                       stream_mem_mb=_mb(mem.get("stream")), recompute_mem_mb=_mb(mem.get("recompute")),
                       cache_mb=cache_bytes / 1e6, weights_mb=_weights_mb(model),
                       stream_reps_ms=[x * 1e3 for x in stream], recompute_reps_ms=[x * 1e3 for x in recompute])
            rows.append(row)
            print(f"  {name:5s} S={S:5d}  stream {s * 1e3:9.2f} ms/token  recompute {r * 1e3:10.1f} ms/token  "
                  f"x{r / s:7.1f}   memory above weights: stream {_fmt_mb(row['stream_mem_mb'])} "
                  f"(cache {row['cache_mb']:.0f} MB), recompute {_fmt_mb(row['recompute_mem_mb'])}", flush=True)
        del model
        gc.collect()
    return {"rows": rows, "note": "memory: peak above the weights, cache allocation included for streaming; "
                                  "CPU: resident-set high-water mark (in a child process), CUDA: max_memory_allocated"}


def _recompute_ids(model, S: int, device) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (1, S), generator=torch.Generator().manual_seed(S)).to(device)


@torch.inference_mode()
def peak_memories(model, sizes, device) -> dict:
    """{S: peak bytes above the weights of a full cache and two decode steps ("stream"), and of a
    recompute forward ("recompute")}, after one unmeasured round (one-time buffers, lazy init)."""
    out = {}
    for S in [min(sizes)] + list(sizes):
        with PeakMemory(device) as stream:
            cache = full_cache(model, S)
            decode_steps(model, cache, 2)
        del cache
        ids = _recompute_ids(model, S, device)
        with PeakMemory(device) as recompute:
            model(ids, logits_to_keep=1)
        out[S] = {"stream": stream.peak, "recompute": recompute.peak}  # the warm-up round is overwritten
    return out


def _memory_in_child(args, name: str, dtype) -> dict:
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", name, "--dtype", str(dtype).removeprefix("torch."),
           "--threads", str(args.threads), "--sizes", ",".join(map(str, args.sizes))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=True).stdout
        return {int(k): v for k, v in json.loads(out.strip().splitlines()[-1]).items()}
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        print(f"  (memory probe failed: {type(e).__name__}: {' '.join(str(e).split())[:200]})", flush=True)
        return {}


def _memory_probe(args) -> int:
    """The child of _memory_in_child: one JSON line {S: {"stream": bytes, "recompute": bytes}}."""
    _malloc_returns_memory()
    device, dtype = torch.device("cpu"), minillm.parse_dtype(args.dtype)
    torch.set_num_threads(args.threads)
    model, _ = bench_model(args.memory_probe, dtype, device)
    print(json.dumps(peak_memories(model, args.sizes, device)))
    return 0


def _mb(x) -> float | None:
    return None if x is None else x / 1e6


def _fmt_mb(x) -> str:
    return "n/a" if x is None else f"{x:.0f} MB"


def _weights_mb(model) -> float:
    return sum(p.nbytes for p in model.parameters()) / 1e6


# ---------------------------------------------------------------------------------------------
# Section 2: against transformers


def _hf_checkpoint(name: str, dtype, device, tmp: Path) -> tuple[Path, str]:
    if name == "tiny" and (SHIPPED_TINY / "config.json").is_file():
        return SHIPPED_TINY, f"{SHIPPED_TINY.relative_to(REPO)} (shipped)"
    directory = tmp / name
    model = random_model(name, dtype, device)
    minillm.save_pretrained(model, directory)
    del model
    return directory, f"random {name}, save_pretrained"


@torch.inference_mode()
def ours_generate(model, prompt, new_tokens: int, sinks: int, cache_size: int) -> dict:
    device = model.device
    cache = model.new_cache(1, sinks=sinks, window=cache_size - sinks)
    sync(device)
    t0 = time.perf_counter()
    tok = model(prompt, cache=cache)[:, -1].argmax(-1, keepdim=True)  # prefill: the chunk path
    out = [tok.item()]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
        out.append(tok.item())  # a streaming generator needs each token on the host
    t2 = time.perf_counter()
    return dict(prefill_s=t1 - t0, decode_s=t2 - t1, decode_tokens=new_tokens - 1, tokens=out)


@torch.inference_mode()
def hf_generate(hf, prompt, new_tokens: int) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per new token, right after its forward
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    stamp = Stamp()
    sync(prompt.device)
    t0 = time.perf_counter()
    out = hf.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      logits_processor=LogitsProcessorList([stamp]), pad_token_id=0)
    sync(prompt.device)
    gen = out[0, prompt.shape[1]:].tolist()
    if len(gen) != new_tokens:
        raise RuntimeError(f"transformers generated {len(gen)} tokens, not {new_tokens}")
    return dict(prefill_s=stamp.t[0] - t0, decode_s=stamp.t[-1] - stamp.t[0], decode_tokens=len(stamp.t) - 1,
                tokens=gen)


def section_hf(args, device, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.hf_models:
            directory, source = _hf_checkpoint(name, dtype, device, Path(tmp))
            ours = minillm.load(directory, dtype=dtype, device=device)
            hf = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
            hf.generation_config.eos_token_id = None  # random weights: never stop early
            vocab = ours.config.vocab_size
            g = torch.Generator().manual_seed(0)
            prompt = torch.randint(0, vocab, (1, args.prompt), generator=g).to(device)
            # Sanity: for a prompt that fits the cache, both engines compute the same thing.
            short = torch.randint(0, vocab, (1, 32), generator=g).to(device)
            a = ours_generate(ours, short, 16, args.sinks, args.cache_size)["tokens"]
            b = hf_generate(hf, short, 16)["tokens"]
            agree = sum(x == y for x, y in zip(a, b))
            ours_generate(ours, prompt[:, :64], 4, args.sinks, args.cache_size)  # warm-up
            hf_generate(hf, prompt[:, :64], 4)
            compiled = None
            if args.hf_compile:  # the same generation with the decode step compiled (section 4's settings)
                compiled = _compiled_step(ours, device, args)
                ours_generate(ours, prompt[:, :64], 4, args.sinks, args.cache_size)  # compiles here
            o_runs, h_runs, c_runs = [], [], []
            for _ in range(args.reps):  # alternate the engines
                ours.fast.compiled_step = None
                o_runs.append(ours_generate(ours, prompt, args.new_tokens, args.sinks, args.cache_size))
                h_runs.append(hf_generate(hf, prompt, args.new_tokens))
                if compiled is not None:
                    ours.fast.compiled_step = compiled
                    c_runs.append(ours_generate(ours, prompt, args.new_tokens, args.sinks, args.cache_size))
            o_tps = median([r["decode_tokens"] / r["decode_s"] for r in o_runs])
            h_tps = median([r["decode_tokens"] / r["decode_s"] for r in h_runs])
            o_pre = median([r["prefill_s"] for r in o_runs])
            h_pre = median([r["prefill_s"] for r in h_runs])
            # Bytes read per decode step: ours attends cache_size keys; transformers' cache grows
            # from prompt + 1 to prompt + new_tokens - 1 keys (its mean is used).
            hf_keys = args.prompt + args.new_tokens / 2
            row = dict(model=name, source=source, params=n_params(ours), ours_decode_tok_s=o_tps,
                       hf_decode_tok_s=h_tps, speedup=o_tps / h_tps, ours_prefill_s=o_pre, hf_prefill_s=h_pre,
                       ours_bytes_per_step=decode_bytes(ours, args.cache_size),
                       hf_bytes_per_step=decode_bytes(ours, hf_keys),
                       short_prompt_agreement=f"{agree}/16",
                       ours_runs=[{k: v for k, v in r.items() if k != "tokens"} for r in o_runs],
                       hf_runs=[{k: v for k, v in r.items() if k != "tokens"} for r in h_runs])
            if c_runs:
                c_tps = median([r["decode_tokens"] / r["decode_s"] for r in c_runs])
                row.update(compiled_decode_tok_s=c_tps, compiled_speedup=c_tps / h_tps,
                           compiled_runs=[{k: v for k, v in r.items() if k != "tokens"} for r in c_runs])
            rows.append(row)
            print(f"  {name:5s} decode: minillm {o_tps:8.1f} tok/s  transformers {h_tps:8.1f} tok/s  "
                  f"x{o_tps / h_tps:5.2f}   prefill {o_pre:.2f} s vs {h_pre:.2f} s   "
                  f"(greedy tokens equal on a short prompt: {agree}/16)", flush=True)
            if c_runs:
                print(f"        minillm compiled decode {c_tps:8.1f} tok/s: x{c_tps / h_tps:5.2f} transformers", flush=True)
            del ours, hf
            torch._dynamo.reset()
            gc.collect()
    return {"rows": rows, "prompt": args.prompt, "new_tokens": args.new_tokens, "sinks": args.sinks,
            "cache_size": args.cache_size}


# ---------------------------------------------------------------------------------------------
# Section 3: the memory-bandwidth bound, and what cache-relative positions cost


def read_bandwidth(device, gib: float, reps: int) -> tuple[float, list]:
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32, device=device)
    x.sum()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - t0)
    return x.nbytes / median(times), times


@torch.inference_mode()
def section_bandwidth(args, device, dtype) -> dict:
    bw, bw_times = read_bandwidth(device, args.bw_gib, args.reps)
    rows = []
    for name in args.bw_models:
        model, source = bench_model(name, dtype, device)
        S = args.cache_size
        cache = full_cache(model, S)
        decode_steps(model, cache, 2)
        steps, bws = [], []
        for _ in range(args.reps):  # alternate: bandwidth, decode steps
            b, _ = read_bandwidth(device, args.bw_gib, 1)
            bws.append(b)
            steps.append(decode_steps(model, cache, args.steps))
        step = median(steps)
        nbytes = decode_bytes(model, S)
        bw_here = median(bws + [bw])
        row = dict(model=name, source=source, S=S, step_ms=step * 1e3, bytes_per_step=nbytes,
                   achieved_gb_s=nbytes / step / 1e9, read_bw_gb_s=bw_here / 1e9,
                   fraction=nbytes / step / bw_here, positions=positions_cost(model, cache, step))
        rows.append(row)
        p = row["positions"]
        print(f"  {name:5s} S={S}: {nbytes / 1e6:.0f} MB per step in {step * 1e3:.2f} ms = "
              f"{row['achieved_gb_s']:.1f} GB/s of {row['read_bw_gb_s']:.1f} GB/s read bandwidth: "
              f"{100 * row['fraction']:.0f}% of the bound", flush=True)
        print(f"        positions: sink re-rotation {p['sinks_us']:.1f} us/step ({100 * p['sinks_frac']:.2f}% "
              f"of a step); re-rotating all {S} keys as the paper does {p['all_keys_ms']:.2f} ms/step "
              f"(+{100 * p['all_keys_frac']:.0f}%)", flush=True)
        del model, cache
        gc.collect()
    return {"read_bw_gb_s": bw / 1e9, "read_bw_reps_s": bw_times, "bw_tensor_gib": args.bw_gib, "rows": rows}


def positions_cost(model, cache, step_s: float) -> dict:
    """What one decode step spends on cache-relative positions: minillm re-rotates only the sinks
    (all layers at once, from their un-rotated keys); the paper re-rotates every cached key of
    every layer to 0..L-1."""
    c, device, dtype = model.config, model.device, model.dtype
    inv_freq = model.spec().inv_freq
    S = cache.capacity
    pos = torch.arange(S, device=device)
    cos, ssin = rope_tables(pos[: cache.sinks] + 12345, inv_freq, dtype)
    cos_all, ssin_all = rope_tables(pos, inv_freq, dtype)

    def sinks():
        cache.k[:, :, :, : cache.sinks] = rope_rotate(cache.raw_sink_k, cos, ssin)

    def all_keys():  # the paper: un-rotated keys rotated to 0..L-1, per layer, every step
        for layer in range(c.num_layers):
            rope_rotate(cache.k[layer], cos_all, ssin_all)

    out = {}
    for key, fn, n in (("sinks", sinks, 50), ("all_keys", all_keys, 3)):
        fn()
        times = []
        for _ in range(5):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync(device)
            times.append((time.perf_counter() - t0) / n)
        out[key] = median(times)
    return dict(sinks_us=out["sinks"] * 1e6, sinks_frac=out["sinks"] / step_s,
                all_keys_ms=out["all_keys"] * 1e3, all_keys_frac=out["all_keys"] / step_s)


# ---------------------------------------------------------------------------------------------
# Section 4: torch.compile of the decode step


def section_compile(args, device, dtype) -> dict:
    rows = []
    for name in args.compile_models:
        kwargs = args.compile_kwargs if args.compile_kwargs is not None else COMPILE_DEFAULTS.get(device.type, {})
        try:
            rows.append(_compile_one(args, name, device, dtype, kwargs))
        except Exception as e:  # report it, keep the run going
            msg = f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"
            print(f"  {name:5s} torch.compile({kwargs}) failed: {msg}", flush=True)
            rows.append(dict(model=name, compile_kwargs=kwargs, error=msg))
        torch._dynamo.reset()
        gc.collect()
    return {"rows": rows}


def _compiled_step(model, device, args):
    """minillm.fast.compile_decode(model) with the section-4 settings; returns the compiled step (lazy: it
    compiles on its first call)."""
    kwargs = args.compile_kwargs if args.compile_kwargs is not None else COMPILE_DEFAULTS.get(device.type, {})
    # CPU: the weights frozen as constants, so inductor may lay them out for its own kernels.
    torch._inductor.config.freezing = device.type == "cpu"
    minillm.fast.compile_decode(model, **kwargs)
    return model.fast.compiled_step


@torch.inference_mode()
def _compile_one(args, name, device, dtype, kwargs) -> dict:
    model, source = bench_model(name, dtype, device)
    S = args.cache_size
    cache = full_cache(model, S)
    if device.type == "cuda":  # CUDA graphs need the cache at fixed addresses
        for buf in (cache.k, cache.v, cache.raw_sink_k):
            if buf is not None:
                torch._dynamo.mark_static_address(buf)
    decode_steps(model, cache, 2)
    tok = torch.tensor([[3]], device=device)
    want = model(tok, cache=cache)
    cache.tokens_seen -= 1  # the same step again: it rewrites the same slot with the same K/V
    compiled_fn = _compiled_step(model, device, args)
    t0 = time.perf_counter()
    got = model(tok, cache=cache)
    sync(device)
    compile_s = time.perf_counter() - t0
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    decode_steps(model, cache, 3)  # any last recompile (or CUDA graph recording) happens here
    e_times, c_times = [], []
    for _ in range(args.reps):  # alternate eager and compiled on the same model and cache
        model.fast.compiled_step = None
        e_times.append(decode_steps(model, cache, args.steps))
        model.fast.compiled_step = compiled_fn
        c_times.append(decode_steps(model, cache, args.steps))
    e, cm = median(e_times), median(c_times)
    print(f"  {name:5s} S={S}: eager {e * 1e3:.2f} ms/token, compiled {cm * 1e3:.2f} ms/token: x{e / cm:.2f} "
          f"(first call {compile_s:.0f} s; logits rel err vs eager {err:.1e}; {kwargs})", flush=True)
    nbytes = decode_bytes(model, S)
    return dict(model=name, source=source, S=S, eager_ms=e * 1e3, compiled_ms=cm * 1e3, gain=e / cm,
                bytes_per_step=nbytes, eager_gb_s=nbytes / e / 1e9, compiled_gb_s=nbytes / cm / 1e9,
                compile_s=compile_s, rel_err_vs_eager=err, compile_kwargs=kwargs,
                eager_reps_ms=[x * 1e3 for x in e_times], compiled_reps_ms=[x * 1e3 for x in c_times])


# ---------------------------------------------------------------------------------------------
# Report


def print_tables(result: dict) -> None:
    m = result["machine"]
    print(f"\nminillm bench on {m.get('gpu') or m['cpu']} ({m['cpu_count']} CPUs), torch {m['torch']}, "
          f"{m['threads']} threads, {result['dtype']}, {result['device']}")
    s = result["sections"]
    if "recompute" in s and "rows" in s["recompute"]:
        print("\n| model | S | streaming ms/token | recompute ms/token | speed-up | memory above weights: streaming | recompute |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in s["recompute"]["rows"]:
            print(f"| {r['model']} | {r['S']} | {r['stream_ms']:.2f} | {r['recompute_ms']:.1f} | {r['speedup']:.0f}x "
                  f"| {_fmt_mb(r['stream_mem_mb'])} | {_fmt_mb(r['recompute_mem_mb'])} |")
    if "hf" in s and "rows" in s["hf"]:
        print("\n| model | minillm decode tok/s | transformers decode tok/s | ratio | minillm compiled tok/s | ratio "
              "| prefill s (minillm / transformers) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in s["hf"]["rows"]:
            comp = (f"{r['compiled_decode_tok_s']:.1f} | {r['compiled_speedup']:.2f}x" if "compiled_decode_tok_s" in r
                    else "- | -")
            print(f"| {r['model']} | {r['ours_decode_tok_s']:.1f} | {r['hf_decode_tok_s']:.1f} | {r['speedup']:.2f}x "
                  f"| {comp} | {r['ours_prefill_s']:.2f} / {r['hf_prefill_s']:.2f} |")
    if "bandwidth" in s and "rows" in s["bandwidth"]:
        print("\n| model | S | MB per step | ms per step | achieved GB/s | read bandwidth GB/s | fraction |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in s["bandwidth"]["rows"]:
            print(f"| {r['model']} | {r['S']} | {r['bytes_per_step'] / 1e6:.0f} | {r['step_ms']:.2f} | "
                  f"{r['achieved_gb_s']:.1f} | {r['read_bw_gb_s']:.1f} | {100 * r['fraction']:.0f}% |")
    if "compile" in s and "rows" in s["compile"]:
        bw = s.get("bandwidth", {}).get("read_bw_gb_s")
        print("\n| model | S | eager ms/token | compiled ms/token | gain | compiled GB/s" + (" | of read bandwidth |" if bw else " |"))
        print("|---|---:|---:|---:|---:|---:|" + ("---:|" if bw else ""))
        for r in s["compile"]["rows"]:
            if "error" in r:
                print(f"| {r['model']} | | | failed: {r['error'][:80]} | | |" + (" |" if bw else ""))
            else:
                frac = f" {100 * r['compiled_gb_s'] / bw:.0f}% |" if bw else ""
                print(f"| {r['model']} | {r['S']} | {r['eager_ms']:.2f} | {r['compiled_ms']:.2f} | {r['gain']:.2f}x "
                      f"| {r['compiled_gb_s']:.1f} |{frac}")
    for name, sec in s.items():
        if "error" in sec:
            print(f"\n{name}: FAILED: {sec['error']}")


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["sections"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    rows = s.get("recompute", {}).get("rows", [])
    for name in dict.fromkeys(r["model"] for r in rows):
        rr = [r for r in rows if r["model"] == name]
        ax.plot([r["S"] for r in rr], [r["recompute_ms"] for r in rr], "o-", label=f"{name} recompute")
        ax.plot([r["S"] for r in rr], [r["stream_ms"] for r in rr], "s-", label=f"{name} streaming")
        for r in rr:
            ax.annotate(f"{r['speedup']:.0f}x", (r["S"], r["recompute_ms"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set(xscale="log", yscale="log", xlabel="cache size S", ylabel="ms per token",
           title="streaming vs sliding window with recomputation")
    ax.set_xticks([r["S"] for r in rows] or [1])
    ax.set_xticklabels([str(r["S"]) for r in rows] or [""])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    ax = axes[1]
    rows = s.get("hf", {}).get("rows", [])
    x = range(len(rows))
    ax.bar([i - 0.27 for i in x], [r["ours_decode_tok_s"] for r in rows], 0.27, label="minillm (4+1020 cache)")
    ax.bar([i for i in x], [r.get("compiled_decode_tok_s", 0) for r in rows], 0.27, label="minillm, compiled step")
    ax.bar([i + 0.27 for i in x], [r["hf_decode_tok_s"] for r in rows], 0.27, label="transformers generate")
    for i, r in zip(x, rows):
        ax.annotate(f"{r['speedup']:.2f}x", (i - 0.27, r["ours_decode_tok_s"]), ha="center", va="bottom", fontsize=8)
        if "compiled_speedup" in r:
            ax.annotate(f"{r['compiled_speedup']:.2f}x", (i, r["compiled_decode_tok_s"]), ha="center", va="bottom",
                        fontsize=8)
    ax.set(xticks=list(x), yscale="log", ylabel="decode tokens/s",
           title=f"greedy, {s.get('hf', {}).get('prompt', '?')}-token prompt")
    ax.set_xticklabels([r["model"] for r in rows])
    ax.legend(fontsize=8)
    ax = axes[2]
    rows = s.get("bandwidth", {}).get("rows", [])
    labels, vals = [], []
    for r in rows:
        labels += [f"{r['model']}\nminillm"]
        vals += [r["fraction"]]
    for r in s.get("hf", {}).get("rows", []):
        if r["model"] in [b["model"] for b in rows]:
            bw = next(b["read_bw_gb_s"] for b in rows if b["model"] == r["model"]) * 1e9
            labels += [f"{r['model']}\ntransformers"]
            vals += [r["hf_bytes_per_step"] * r["hf_decode_tok_s"] / bw]
    for r in s.get("compile", {}).get("rows", []):
        if "compiled_gb_s" in r and r["model"] in [b["model"] for b in rows]:
            bw = next(b["read_bw_gb_s"] for b in rows if b["model"] == r["model"])
            labels += [f"{r['model']}\nminillm compiled"]
            vals += [r["compiled_gb_s"] / bw]
    ax.bar(labels, [100 * v for v in vals],
           color=["C1" if "compiled" in lb else "C0" if "minillm" in lb else "C2" for lb in labels])
    ax.axhline(100, color="k", lw=0.8)
    ax.set(ylabel="% of measured read bandwidth", title="decode vs the memory-bandwidth bound")
    m = result["machine"]
    fig.suptitle(f"minillm {result['dtype']} on {m.get('gpu') or m['cpu']}, {m['threads']} threads, torch {m['torch']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5, help="repetitions per figure (medians; at least 5)")
    p.add_argument("--steps", type=int, default=10, help="decode steps timed per repetition")
    p.add_argument("--sizes", default="256,512,1024,2048,4096", help="cache sizes S for the recompute section")
    p.add_argument("--models", default=None, help="shorthand: the same models for every section")
    p.add_argument("--recompute-models", default="134M")
    p.add_argument("--hf-models", default="tiny,134M")
    p.add_argument("--bw-models", default="134M")
    p.add_argument("--compile-models", default="tiny,134M")
    p.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="hf section: also time minillm with its decode step compiled")
    p.add_argument("--compile-kwargs", default=None,
                   help="torch.compile keyword arguments as JSON; default: on CPU "
                        f"{json.dumps(COMPILE_DEFAULTS['cpu'])}, on CUDA {json.dumps(COMPILE_DEFAULTS['cuda'])}")
    p.add_argument("--prompt", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--cache-size", type=int, default=1024)
    p.add_argument("--bw-gib", type=float, default=1.0, help="size of the bandwidth tensor (>= 1 GiB)")
    p.add_argument("--budget", type=float, default=None, help="seconds: skip the sections left after this")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)  # internal: see _memory_in_child
    args = p.parse_args(argv)
    args.only = [x for x in args.only.split(",") if x]
    bad = [x for x in args.only if x not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    if args.reps < 5:
        print(f"bench: note: --reps {args.reps} is below the 5 the issue asks for", file=sys.stderr)
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    for key in ("recompute_models", "hf_models", "bw_models", "compile_models"):
        value = args.models if args.models is not None else getattr(args, key)
        names = [x for x in value.split(",") if x]
        for n in names:
            if n not in SHAPES:
                p.error(f"unknown model {n!r}; choose from {list(SHAPES)}")
        setattr(args, key, names)
    if args.compile_kwargs is not None:
        try:
            args.compile_kwargs = json.loads(args.compile_kwargs)
        except json.JSONDecodeError as e:
            p.error(f"--compile-kwargs is not JSON: {e}")
    if min(args.sizes, default=5) <= args.sinks or args.cache_size <= args.sinks:
        p.error("every cache size must exceed --sinks")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        return _memory_probe(args)
    try:
        device, dtype = minillm.parse_device(args.device), minillm.parse_dtype(args.dtype)
    except minillm.MiniLLMError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    result = {"command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else list(argv))),
              "machine": machine(device), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "reps": args.reps, "steps_per_rep": args.steps, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "sections": {}}
    print(f"bench: {result['machine'].get('gpu') or result['machine']['cpu']}, torch {torch.__version__}, "
          f"{args.threads} threads, {dtype}, {device}", flush=True)
    start = time.perf_counter()
    run = {"recompute": section_recompute, "hf": section_hf, "bandwidth": section_bandwidth, "compile": section_compile}
    for name in args.only:
        if args.budget is not None and time.perf_counter() - start > args.budget:
            result["sections"][name] = {"error": f"skipped: past the --budget of {args.budget:.0f} s"}
            print(f"[{name}] skipped (budget)", flush=True)
            continue
        before = load_avg()
        print(f"[{name}] load average {before}", flush=True)
        t0 = time.perf_counter()
        try:
            sec = run[name](args, device, dtype)
        except Exception as e:  # one failing section must not lose the others (a GPU run is one shot)
            import traceback
            traceback.print_exc()
            sec = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"}
        sec.update(seconds=time.perf_counter() - t0, load_avg_before=before, load_avg_after=load_avg())
        result["sections"][name] = sec
        _save(result, args)  # after every section: a run cut short still reports what it measured
    result["seconds"] = time.perf_counter() - start
    print_tables(result)
    _save(result, args)
    for path in (args.json, args.png):
        if path:
            print(f"wrote {path}")
    return 0


def _save(result: dict, args) -> None:
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        try:
            plot(result, args.png)
        except Exception as e:  # a figure must never cost the numbers
            print(f"bench: no PNG: {type(e).__name__}: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
