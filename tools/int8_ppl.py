"""What weight-only int8 costs in perplexity on real text: minillm's int8 against llama.cpp's Q8_0.

    python tools/int8_ppl.py                      # 8 windows of 1,024 tokens of Frankenstein
    python tools/int8_ppl.py --windows 4 --json out.json

Four runs score the same tokens the same way: SmolLM2-135M-Instruct, dense attention within each of
--windows non-overlapping windows of --window tokens (every token after the first of a window is
scored), the text tokenized once by minillm's GGUF tokenizer.
  minillm float32   the F32 GGUF (tools/bench_real.py's rewrite of the package's Q4_1 file)
  minillm int8      the same model after minillm.quantize_int8 (per-row absmax scales)
  llama.cpp F32     the F32 GGUF, logits of every position (llama-cpp-python, logits_all)
  llama.cpp Q8_0    a Q8_0 GGUF written from the F32 one by the gguf package (32-weight blocks)
  minillm Q8_0      the same Q8_0 file read by minillm (dequantized to float32): the cost of Q8_0's
                    weight rounding alone, without llama.cpp's 8-bit activations
The cost is each engine's int8 PPL over its own float32 PPL, so the engines' own float rounding
cancels. llama.cpp runs in a child process (its build may lack an instruction this CPU has not);
without llama-cpp-python its rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).resolve().parent))

BOOK = REPO.parent / "shared" / "corpus" / "frankenstein.txt"


def ppl_of(nll_sum: float, n: int) -> float:
    return math.exp(nll_sum / n)


def minillm_ppl(gguf_path: Path, windows: list[list[int]], int8: bool) -> dict:
    import torch
    import minillm

    model = minillm.load(gguf_path, dtype=torch.float32)
    if int8:
        minillm.quantize_int8(model)
    total, n = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            ids = torch.tensor([w])
            logp = torch.log_softmax(model(ids)[0, :-1].double(), -1)
            total -= float(logp.gather(-1, ids[0, 1:, None]).sum())
            n += len(w) - 1
    return {"ppl": ppl_of(total, n), "tokens": n}


def llama_ppl(task: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama

    windows = task["windows"]
    llm = Llama(model_path=task["gguf"], n_ctx=max(map(len, windows)) + 8, n_batch=512, n_ubatch=512,
                n_threads=task["threads"], n_threads_batch=task["threads"], logits_all=True, verbose=False)
    total, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[:, 0]
        total -= float((logits[np.arange(len(w) - 1), w[1:]] - logz).sum())
        n += len(w) - 1
    return {"ppl": ppl_of(total, n), "tokens": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(REPO / "docs" / "bench_real" / "int8_ppl.json"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(llama_ppl(json.loads(args.child))))
        return 0

    import torch
    import minillm
    from bench_real import f32_gguf, typed_gguf
    from real_results import gguf_path
    from minillm.formats.text import read_text

    torch.set_num_threads(args.threads)
    f32 = f32_gguf(gguf_path(), Path("/tmp/SmolLM2-135M-Instruct.F32.gguf"))
    tok = minillm.load_tokenizer(f32)
    ids = tok.encode(read_text(BOOK))
    windows = [ids[i * args.window : (i + 1) * args.window] for i in range(args.windows)]
    result = {"text": BOOK.name, "windows": args.windows, "window": args.window, "rows": {}}
    started = time.perf_counter()
    for name, int8 in (("minillm float32", False), ("minillm int8", True)):
        result["rows"][name] = minillm_ppl(f32, windows, int8)
        print(f"{name:16s} PPL {result['rows'][name]['ppl']:.4f}", flush=True)
    q8 = typed_gguf(f32, "Q8_0")  # beside the F32 file, shared with tools/bench_real.py
    result["rows"]["minillm Q8_0"] = minillm_ppl(q8, windows, False)
    print(f"{'minillm Q8_0':16s} PPL {result['rows']['minillm Q8_0']['ppl']:.4f}", flush=True)
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp: skipped (pip install llama-cpp-python, which compiles llama.cpp, ~15 minutes)")
    else:
        for name, path in (("llama.cpp F32", f32), ("llama.cpp Q8_0", q8)):
            task = json.dumps({"gguf": str(path), "windows": windows, "threads": args.threads})
            r = subprocess.run([sys.executable, __file__, "--child", task], capture_output=True, text=True)
            if r.returncode != 0:
                result["rows"][name] = {"error": f"exit {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1]}"}
                print(f"{name:16s} failed: {result['rows'][name]['error']}", flush=True)
                continue
            result["rows"][name] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{name:16s} PPL {result['rows'][name]['ppl']:.4f}", flush=True)
    rows = result["rows"]
    for engine, f, q in (("minillm", "minillm float32", "minillm int8"), ("q8_0_weights", "minillm float32", "minillm Q8_0"),
                         ("llama.cpp", "llama.cpp F32", "llama.cpp Q8_0")):
        if "ppl" in rows.get(f, {}) and "ppl" in rows.get(q, {}):
            result[f"{engine}_cost"] = rows[q]["ppl"] / rows[f]["ppl"] - 1
            print(f"{engine}: int8 costs {100 * result[f'{engine}_cost']:+.2f}% perplexity")
    result["seconds"] = time.perf_counter() - started
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
