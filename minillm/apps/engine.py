"""A serving engine: continuous batching with chunked prefill, and conversations kept as streams.

    eng = minillm.Engine(model, tok, batch_size=8, sinks=4, window=1020, max_prefill_tokens=256)
    rid = eng.add_request([{"role": "user", "content": "Hi!"}], temperature=0, max_tokens=64)
    for ev in eng.stream(rid):              # Event(rid, token, text, finish_reason, ...)
        print(ev.text, end="")

The engine owns the model and ONE cache of `batch_size` rows (`model.new_cache`); every row is a
stream of its own (docs/streaming.md). `step()` is one pass of the loop:

1. the commands given since the last step take effect: cancels (also of a request still in its
   prefill, or still queued), then new requests take free rows (admission);
2. prefill: at most `max_prefill_tokens` prompt tokens go through the cache, the oldest admitted
   prompt first, each in its own row (a long prompt is fed in pieces over several steps);
3. sample: every row whose prompt is fed draws its next token with its own seeded generator
   (`Sampler`, as `generate` draws), and an `Event` carries it out with its text;
4. decode: the rows still going feed their token in one batched step over the span of rows they
   occupy (a view of the cache; `lengths`: 0 for an idle row inside the span).
So a long prompt never stalls the others: each step decodes every active row once, and feeds at
most `max_prefill_tokens` of prefill beside it.

Conversations are streams. A request given as chat messages is rendered with the tokenizer's
chat template exactly as a `ChatSession` renders its turns. If a kept stream's conversation (the
earlier messages as sent, the assistant's replies as the stream generated them) is the new
request's messages but its last user message, the engine continues that stream: it feeds only the
new turn's tokens (`Event.cached_tokens` are the tokens the stream already held). If the
only such stream is busy with another request's turn of the same conversation, it is forked: a
copy of it as it was before that turn (replayed from its log, below) serves this one. Otherwise
(an edited history, a first message) a new stream is fed the whole rendered prompt. A prompt given
as text or token ids continues a kept stream whose fed tokens are a prefix of its ids. `session=`
names a conversation: its stream is looked for only under that name (one request at a time per
name, else `SessionBusy`); without it, any unnamed kept stream may match.

An idle stream stays in its row until the row is needed; then it is parked out of the cache
(`export_row`) in an LRU bounded by `max_sessions` streams and `max_parked_bytes`, and restored
(`import_row`) into a free row by its next request. A conversation pushed out of the LRU keeps
only its log, the ids its row consumed (8 bytes a token, at most `max_log_tokens`; at most
`max_logged_sessions` of them): its next request feeds the log into a fresh row before the new
turn, which rebuilds the stream exactly (a re-rendered history would not be what the stream
generated). A reply cut by a `stop` string is kept as generated, so a client that sends back the
cut text starts a new stream. With `session_dir`, `shutdown()` writes every kept stream there (one safetensors file each, with the model's fingerprint, as `SinkCache.save`
writes), and a new Engine over the same directory loads them and continues them exactly; files
saved from another model are left alone and their conversations start fresh (`refused_files`
lists them, one line each).

Exactness: a greedy request equals the same conversation run alone by `ChatSession` turn by turn
(and a seeded one equals it with the session's generator seeded with the request's seed at the
start of each turn), whatever the other requests, parking and restoring, or a restart with
`session_dir`. Rows never interact (the engine's per-row contract).

Threads: exactly one thread steps at a time (`step()` holds a lock, so a second caller waits);
any thread may `add_request`, `cancel`, read `stats()` or iterate `stream(rid)`. `stream(rid)`
waits for a thread that is stepping (`start()` runs one in the background) and, when none is,
steps the engine itself. Events reach a request three ways: `step()`'s return value, the
request's buffer read by `stream(rid)` (pass `buffer=False` when only `step()` is read, or the
events would be kept until read), and `on_event(ev)`, called in the stepping thread (it may
add or cancel requests, but must not step; an exception in it cancels its request).
"""

from __future__ import annotations

import collections
import hashlib
from array import array
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import check_bool, check_int, check_model, check_tokenizer
from ..errors import MiniLLMError, first_line
from .chat import PLAIN_FIRST, PLAIN_NEXT, ChatSession, Reply, _HELD
from .engine_store import load_streams, save_streams
from .generation import new_stream_ids, step_name
from .sampling import check_finite, check_sampling, check_seed, make_sampler, token_ids
from .stream import StopText, check_stop

FINISH_REASONS = ("stop", "length", "cancelled", "error")
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
ROLES = ("system", "user", "assistant")


class QueueFull(MiniLLMError):
    """The engine's queue of waiting requests is full (a server answers 429 or 503)."""


class SessionBusy(MiniLLMError):
    """The named session already has a request queued or in flight (a server answers 409)."""


class EngineClosed(MiniLLMError):
    """The engine is shutting down or shut down: it takes no new requests (a server answers 503)."""


@dataclass(frozen=True)
class Event:
    """What one step did for request `rid`: a token (None on a last event that draws none) and
    the text it adds (incrementally detokenized, "" while a character or a possible stop string
    is incomplete). `finish_reason` is None until the request's last event: "stop" (an EOS or
    end-of-turn id, or a stop string), "length" (max_tokens), "cancelled" or "error" (`error`
    then holds the one-line message). The counts are the request's so far: `prompt_tokens` its
    prompt (the whole conversation), `cached_tokens` those a kept stream already held, and
    `completion_tokens` the tokens drawn."""
    rid: int
    token: int | None
    text: str
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class EngineStats:
    """The engine at a glance (a server's /metrics). `tokens_per_second` is over the last
    `RATE_SECONDS`; `time_to_first_token_seconds` the mean over the last 100 first tokens."""
    active_rows: int  # rows serving a request in flight (prefilling or decoding)
    queued_requests: int
    parked_sessions: int  # streams parked out of the cache
    kept_sessions: int  # every kept stream: idle in a row, parked, or serving a request
    parked_bytes: int
    logged_sessions: int  # conversations out of the LRU, kept as their token log (replayed when they return)
    tokens_per_second: float
    time_to_first_token_seconds: float
    requests_finished: int
    tokens_generated: int
    prompt_tokens: int
    cached_tokens: int


def conversation_digest(messages) -> str:
    """A name for a conversation: SHA-256 over its messages' roles and contents, in order."""
    h = hashlib.sha256()
    for m in messages:
        h.update(json.dumps([m["role"], m["content"]]).encode("ascii") + b"\n")  # \u-escaped: any str encodes
    return h.hexdigest()


def check_messages(messages) -> list[dict]:
    """Chat messages as a list of {"role", "content"} dicts of strings, the last one the user's."""
    if not messages:
        raise MiniLLMError("messages must not be empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise MiniLLMError(f"messages[{i}] must be a {{'role': ..., 'content': ...}} dict, got {type(m).__name__}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise MiniLLMError(f"messages[{i}] has an unsupported field {extra[0]!r} (only 'role' and 'content')")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise MiniLLMError(f"messages[{i}]: role must be one of {', '.join(ROLES)}, got {role!r:.40}")
        if not isinstance(content, str):
            raise MiniLLMError(f"messages[{i}]: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise MiniLLMError(f"the last message must be the user's, got role {out[-1]['role']!r}")
    return out


# What a SinkCache holds: per-row buffers (sliced by `row_view`) and settings of the whole cache.
ROW_BUFFERS = ("k", "v", "raw_sink_k", "_seen")
CACHE_SETTINGS = ("sinks", "window", "batch_size", "owner_id", "positions")


def row_view(cache, b: int, end: int | None = None):
    """A cache over rows b..end-1 of `cache` (row b alone by default), sharing its buffers and
    counts: a forward through it writes those rows in place and advances their counts, and touches
    no other row (a prefill of one row then costs one row's compute, and a decode step the span of
    the rows in flight, not the padded batch's). None when the cache holds anything this function
    does not know how to slice (the caller then makes a ragged call over the whole batch)."""
    if set(vars(cache)) - set(ROW_BUFFERS) - set(CACHE_SETTINGS):
        return None
    end = b + 1 if end is None else end
    view = object.__new__(type(cache))
    view.__dict__.update(cache.__dict__)
    view.k, view.v = cache.k[:, b:end], cache.v[:, b:end]
    view.raw_sink_k = None if cache.raw_sink_k is None else cache.raw_sink_k[:, b:end]
    view._seen = cache._seen[b:end]  # a view: `advance` adds to these rows' counts
    view.batch_size = end - b
    return view


class _Unplaced:
    """Stands for a cache while a ChatSession is built in no row (the engine places it later)."""
    tokens_seen = torch.zeros(1, dtype=torch.int64)
    batch_size = 1


def new_chat(engine) -> ChatSession:
    """A ChatSession over the engine's cache, in no row yet (`Engine._claim` places it)."""
    chat = ChatSession(engine.model, engine.tok, cache=_Unplaced(), row=0, use_template=engine.use_template,
                       max_new_tokens=None, temperature=0)
    chat.cache, chat.row = engine.cache, None
    return chat


def _state_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in (state.k, state.v, state.raw_sink_k) if t is not None)


class _Stream:
    """A kept stream: a conversation (a ChatSession over the engine's cache) or a token stream.
    It is in a row (`row`), parked out of the cache (`parked`, a RowState), or, for a
    conversation evicted from the parking LRU, only logged: `log` holds every id its row consumed,
    and replaying them into a fresh row restores it exactly."""

    def __init__(self, key, chat: ChatSession | None):
        self.key = key  # the session name, or None
        self.chat = chat
        self.digest: str | None = None  # chat: the conversation so far (messages + replies)
        self.tokens: list[int] = []  # token stream: the ids in the cache (after any sink prefix)
        self.row: int | None = None
        self.parked = None
        self.log: array | None = array("q") if chat is not None else None  # None: not replayable
        self.busy = None  # the request it serves, or None
        self.used = 0  # when it last served (the LRU's clock)
        self.file: str | None = None  # its file name in session_dir


class _Request:
    def __init__(self, rid: int, messages, ids, key, settings: dict, on_event, buffer: bool):
        self.rid, self.messages, self.ids, self.key = rid, messages, ids, key
        # the conversation a kept stream must hold for this request to continue it
        self.digest = conversation_digest(messages[:-1]) if messages is not None and len(messages) > 1 else None
        self.settings, self.on_event = settings, on_event
        self.buffer = collections.deque() if buffer else None
        self.stream: _Stream | None = None
        self.row: int | None = None
        self.feed: torch.Tensor | None = None  # (1, L): the ids to prefill
        self.pos = 0  # how many of them are fed
        self.logits: torch.Tensor | None = None
        self.sampler = None
        self.reply: Reply | None = None  # chat
        self.decoder = None  # token stream
        self.stops = StopText(settings["stop"])
        self.saved = None  # a chat's state before its turn began (restored if the turn cannot start)
        self.log_backup = None  # its log before the turn
        self.start = 0  # the row's count before the prefill
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.added = time.monotonic()
        self.first: float | None = None
        self.done = False


class Engine:
    """Continuous batching over one cache of `batch_size` rows, with chunked prefill and kept
    conversations (the module docstring). Sampling defaults for every request: `max_tokens`,
    `temperature`, `top_p`, `top_k`; a request's own keywords replace them. Other keywords go to
    `model.new_cache` (`positions`, where the core has it)."""

    RATE_SECONDS = 10.0

    def __init__(self, model, tokenizer, *, batch_size: int = 8, sinks: int = 4, window: int = 1020,
                 max_prefill_tokens: int = 256, max_queue: int | None = None, max_sessions: int = 64,
                 max_parked_bytes: int | None = 2**31, session_dir=None, max_tokens: int | None = 256,
                 temperature: float = 0.8, top_p: float | None = 0.95, top_k: int | None = None,
                 use_template: bool = True, max_logged_sessions: int = 1024, max_log_tokens: int = 1 << 20,
                 max_prompt_tokens: int | None = None, **cache_options):
        check_model(model)
        check_tokenizer(tokenizer)
        check_int("batch_size", batch_size, 1)
        check_int("max_prefill_tokens", max_prefill_tokens, 1)
        check_int("max_queue", max_queue, 1, none_ok=True)
        check_int("max_sessions", max_sessions, 0)
        check_int("max_parked_bytes", max_parked_bytes, 0, none_ok=True)
        check_bool("use_template", use_template)
        check_int("max_logged_sessions", max_logged_sessions, 0)
        check_int("max_log_tokens", max_log_tokens, 0)
        self.max_prompt_tokens = check_int("max_prompt_tokens", max_prompt_tokens, 1, none_ok=True)
        self.max_logged_sessions, self.max_log_tokens = max_logged_sessions, max_log_tokens
        self.model, self.tok = model, tokenizer
        self.batch_size, self.max_prefill_tokens = batch_size, max_prefill_tokens
        self.max_queue = 4 * batch_size if max_queue is None else max_queue
        self.max_sessions, self.max_parked_bytes = max_sessions, max_parked_bytes
        self.use_template = use_template
        self.defaults = self._settings(dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                            top_k=top_k, seed=None, stop=None, ignore_eos=False), "Engine")
        self.cache = model.new_cache(batch_size=batch_size, sinks=sinks, window=window, **cache_options)
        self.text_eos = frozenset(getattr(model, "eos_ids", ())) | tokenizer.stop_ids
        self.rows: list[_Stream | None] = [None] * batch_size
        self.streams: list[_Stream] = []  # every kept stream
        self.requests: dict[int, _Request] = {}
        self.queue: collections.deque[_Request] = collections.deque()
        self.active: list[_Request] = []  # admitted, in admission order
        self._cancels: set[int] = set()
        self._next_rid = 1
        self._clock = 0
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._step_lock = threading.Lock()
        self._runner: threading.Thread | None = None
        self._stop_runner = False
        self.closed = False
        self._rate: collections.deque = collections.deque()  # (time, tokens) of recent steps
        self._ttft: collections.deque = collections.deque(maxlen=100)
        self.totals = dict(requests_finished=0, tokens_generated=0, prompt_tokens=0, cached_tokens=0)
        self.session_dir = None if session_dir is None else Path(session_dir)
        self.refused_files: list[str] = []
        if self.session_dir is not None:
            load_streams(self)

    def new_stream(self, key, conversation: bool) -> "_Stream":
        """A kept stream in no row yet: a conversation (a ChatSession over this engine's cache) or
        a token stream (engine_store.py builds the streams it reads back with this)."""
        return _Stream(key, new_chat(self) if conversation else None)

    # ------------------------------------------------------------------------------------------
    # Requests in

    def _settings(self, given: dict, what: str) -> dict:
        unknown = sorted(set(given) - set(SAMPLING))
        if unknown:
            raise MiniLLMError(f"{what}: unknown setting {unknown[0]!r} (known: {', '.join(SAMPLING)})")
        s = {**getattr(self, "defaults", {}), **given}
        check_sampling(s["temperature"], s["top_k"], s["top_p"])
        check_int("max_tokens", s["max_tokens"], 0, none_ok=True)
        if s["seed"] is not None:
            check_seed(s["seed"])
        s["stop"] = check_stop(s["stop"])
        check_bool("ignore_eos", s["ignore_eos"])
        return s

    def add_request(self, prompt, session=None, *, on_event: Callable[[Event], None] | None = None,
                    buffer: bool | None = None, **sampling) -> int:
        """Queue a request; return its id. `prompt` is chat messages ([{"role", "content"}, ...],
        the last one the user's), a string (encoded as the tokenizer's files say) or token ids.
        `session`: a name (str or int) for the conversation, or None. Sampling keywords:
        max_tokens (None: until a stop), temperature (0: greedy), top_p, top_k, seed (None: a
        random one), stop (a string or a list), ignore_eos. `on_event(ev)` is called with each of
        the request's events in the stepping thread; `buffer` (default: True without on_event)
        keeps them for `stream(rid)`. Raises QueueFull, SessionBusy, EngineClosed or, for a bad
        argument, MiniLLMError naming it."""
        settings = self._settings(sampling, "add_request")
        if settings["seed"] is None:
            settings["seed"] = int.from_bytes(os.urandom(8), "little") >> 1
        if session is not None and (isinstance(session, bool) or not isinstance(session, (str, int))):
            raise MiniLLMError(f"session must be a string or an integer, got {type(session).__name__}")
        if on_event is not None and not callable(on_event):
            raise MiniLLMError(f"on_event must be callable, got {type(on_event).__name__}")
        buffer = on_event is None if buffer is None else check_bool("buffer", buffer)
        messages = ids = None
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            messages = check_messages(prompt)
            if (self.tok.chat_template is None or not self.use_template) and any(
                    m["role"] == "system" for m in messages):
                raise MiniLLMError("messages: a system message needs a chat template to render it, and this "
                                   "model has none")
        elif isinstance(prompt, str):
            ids = self.tok.encode(prompt)
        elif isinstance(prompt, (list, tuple, torch.Tensor)):
            ids = token_ids(prompt, "prompt")
        else:
            raise MiniLLMError(f"prompt must be chat messages, a string or token ids, got {type(prompt).__name__}")
        if self.max_prompt_tokens is not None:
            n = len(ids) if ids is not None else self.prompt_size(messages)
            if n > self.max_prompt_tokens:
                raise MiniLLMError(f"prompt: {n} tokens, more than the engine's max_prompt_tokens "
                                   f"({self.max_prompt_tokens})")
        if ids is not None:
            if not ids:
                raise MiniLLMError("prompt is empty (no token ids to start from)")
            bad = [i for i in ids if not 0 <= i < self.model.config.vocab_size]
            if bad:
                raise MiniLLMError(f"prompt: token id {bad[0]} is out of range for the model's vocabulary of "
                                   f"{self.model.config.vocab_size}")
        with self._cond:
            if self.closed:
                raise EngineClosed("the engine is shutting down and takes no new requests")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            if session is not None and any(r.key == session and not r.done for r in self.requests.values()):
                raise SessionBusy(f"session {session!r} already has a request in flight; wait for it to finish")
            rid, self._next_rid = self._next_rid, self._next_rid + 1
            req = _Request(rid, messages, ids, session, settings, on_event, buffer)
            self.requests[rid] = req
            self.queue.append(req)
            self._cond.notify_all()
        return rid

    def prompt_size(self, messages) -> int:
        """The tokens of a conversation rendered whole (its size, whatever a kept stream holds)."""
        messages = check_messages(messages)
        template = self.tok.chat_template if self.use_template else None
        if template is not None:
            return len(self.tok.apply_chat_template(messages, add_generation_prompt=True))
        text = "".join(PLAIN_FIRST.format(text=m["content"]) if i == 0 else
                       PLAIN_NEXT.format(text=m["content"]) if m["role"] == "user" else m["content"]
                       for i, m in enumerate(messages))
        return len(self.tok.encode(text))

    def cancel(self, rid: int) -> bool:
        """Cancel request `rid` at the next step (queued, prefilling or decoding): its last event
        has finish_reason "cancelled". False if it is unknown or already finished."""
        with self._cond:
            req = self.requests.get(rid)
            if req is None or req.done:
                return False
            self._cancels.add(rid)
            self._cond.notify_all()
            return True

    # ------------------------------------------------------------------------------------------
    # Events out

    def stream(self, rid: int) -> Iterator[Event]:
        """The events of request `rid` (added with its buffer), up to its last. Waits for the
        thread that steps the engine; when no thread is stepping, steps the engine itself (the
        other requests' events are kept for their own readers)."""
        with self._lock:
            req = self.requests.get(rid)
            if req is None or req.buffer is None:
                raise MiniLLMError(f"stream: no buffered request {rid!r} (unknown, already read, or added "
                                   f"with buffer=False)")
        while True:
            with self._cond:
                ev = req.buffer.popleft() if req.buffer else None
                if ev is None and self._runner is not None and self._runner.is_alive():
                    self._cond.wait(0.5)
                    continue
            if ev is not None:
                if ev.finish_reason is not None:
                    with self._lock:
                        self.requests.pop(rid, None)
                    yield ev
                    return
                yield ev
                continue
            if self._step_lock.acquire(blocking=False):  # nobody is stepping: step here
                try:
                    self._step()
                finally:
                    self._step_lock.release()
            else:
                with self._cond:
                    if not req.buffer:
                        self._cond.wait(0.5)

    def _emit(self, req: _Request, events: list, token, text: str, finish: str | None = None,
              error: str | None = None) -> None:
        ev = Event(req.rid, token, text, finish, error, req.prompt_tokens, req.cached_tokens, req.completion_tokens)
        events.append(ev)
        if finish is not None:
            req.done = True
            if req.buffer is None:
                with self._lock:
                    self.requests.pop(req.rid, None)
        if req.buffer is not None:
            with self._cond:
                req.buffer.append(ev)
        if req.on_event is not None:
            try:
                req.on_event(ev)
            except Exception:  # a listener's failure must not stop the engine: the request is cancelled
                if finish is None:
                    with self._lock:
                        self._cancels.add(req.rid)

    # ------------------------------------------------------------------------------------------
    # The loop

    def step(self) -> list[Event]:
        """One pass: cancels and admissions, at most `max_prefill_tokens` of prefill, one token
        for every row whose prompt is fed, one batched decode step. Returns its events."""
        with self._step_lock:
            return self._step()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.queue or self.active or self._cancels)

    def _step(self) -> list[Event]:
        events: list[Event] = []
        with self._lock:
            cancels, self._cancels = self._cancels, set()
        for rid in cancels:
            req = self.requests.get(rid)
            if req is not None and not req.done:
                self._cancel(req, events)
        self._admit(events)
        self._prefill(events)
        n = self._sample_and_decode(events)
        now = time.monotonic()
        with self._cond:
            if n:  # (an idle step adds nothing: a loop of them must not grow this)
                self._rate.append((now, n))
            while self._rate and self._rate[0][0] < now - self.RATE_SECONDS:
                self._rate.popleft()
            self._cond.notify_all()
        return events

    # admission -----------------------------------------------------------------------------

    def _admit(self, events: list) -> None:
        while True:
            with self._lock:
                if not self.queue:
                    return
                req = self.queue[0]
            stream = self._match(req)
            row = stream.row if stream is not None and stream.row is not None else self._free_row(stream)
            if row is None:
                return  # every row serves a request: wait for one to finish
            with self._lock:
                self.queue.popleft()
            try:
                self._begin(req, stream, row)
            except Exception as e:  # one request's failure fails it alone
                self._fail(req, e, events)

    def _match(self, req: _Request) -> _Stream | None:
        """The kept stream this request continues, or None."""
        candidates = [s for s in self.streams if s.key == req.key and s.busy is None]
        if req.messages is not None:
            if req.digest is None:
                return None
            same = [s for s in self.streams if s.key == req.key and s.chat is not None and s.digest == req.digest]
            idle = next((s for s in same if s.busy is None), None)
            if idle is not None:
                return idle
            for s in same:  # the same conversation, busy with another request's turn: fork it
                fork = self._fork(s)
                if fork is not None:
                    return fork
            return None
        for s in candidates:
            if s.chat is None and len(s.tokens) < len(req.ids) and req.ids[: len(s.tokens)] == s.tokens:
                return s
        return None

    def _fork(self, s: _Stream) -> _Stream | None:
        """A copy of conversation s as it was before the turn it is serving: a logged stream (its
        log replays it exactly), or None if s keeps no log."""
        r = s.busy
        if r is None or r.saved is None or r.log_backup is None:
            return None
        fork = _Stream(s.key, new_chat(self))
        c = fork.chat
        c.prompt_text, c.unfed, c.messages, c.turns = r.saved[0], r.saved[1], [dict(m) for m in r.saved[2]], r.saved[3]
        fork.digest, fork.log, fork.used = s.digest, array("q", r.log_backup), s.used
        self.streams.append(fork)
        return fork

    def _free_row(self, keep: _Stream | None) -> int | None:
        """A row for a request: an empty one, else the row of the least recently used idle
        stream, which is parked to free it."""
        for b, s in enumerate(self.rows):
            if s is None:
                return b
        idle = [s for s in self.rows if s.busy is None and s is not keep]
        if not idle:
            return None
        victim = min(idle, key=lambda s: s.used)
        b = victim.row
        self._park(victim, keep)
        return b

    def _park(self, s: _Stream, keep: _Stream | None = None) -> None:
        b = s.row
        s.parked = self.cache.export_row(b)
        self._release(s)
        self._evict(keep)

    def _release(self, s: _Stream) -> None:
        """Take stream s out of its row (its keys stay there until the row is reused)."""
        b, s.row = s.row, None
        if b is not None and self.rows[b] is s:
            self.rows[b] = None
        if s.chat is not None:
            held = _HELD.get(self.cache, {})
            if b in held and held[b]() is s.chat:
                del held[b]

    def _claim(self, s: _Stream, b: int) -> None:
        if self.rows[b] is not None:  # the invariant: a row belongs to one stream at a time
            raise MiniLLMError(f"row {b} already holds another session's stream")
        self.rows[b], s.row = s, b
        if s.chat is not None:
            s.chat.row = b
            s.chat._claim()

    def parked(self) -> list[_Stream]:
        return [s for s in self.streams if s.parked is not None]

    def logged(self) -> list[_Stream]:
        return [s for s in self.streams if s.row is None and s.parked is None]

    def _evict(self, keep: _Stream | None = None) -> None:
        """Past `max_sessions` or `max_parked_bytes`, the oldest parked streams leave the LRU (not
        `keep`, which a request is about to restore): a conversation keeps its log (it is replayed
        on its next request), a token stream is forgotten (its next prompt feeds it whole, which
        is the same). Past `max_logged_sessions`, the oldest logged conversations are forgotten."""
        parked = sorted((s for s in self.parked() if s is not keep), key=lambda s: s.used)
        total = sum(_state_bytes(s.parked) for s in parked)
        while parked and (len(parked) > self.max_sessions
                          or (self.max_parked_bytes is not None and total > self.max_parked_bytes)):
            s = parked.pop(0)
            total -= _state_bytes(s.parked)
            if s.log is not None:
                s.parked = None
            else:
                self._drop(s)
        logged = sorted((s for s in self.logged() if s is not keep), key=lambda s: s.used)
        while len(logged) > self.max_logged_sessions:
            self._drop(logged.pop(0))

    def _drop(self, s: _Stream) -> None:
        """Forget a kept stream."""
        self._release(s)
        s.parked = None
        if s in self.streams:
            self.streams.remove(s)
        if s.chat is not None:
            s.chat.closed = True

    def _begin(self, req: _Request, stream: _Stream | None, row: int) -> None:
        """Put the request's stream in `row` and work out the ids to feed."""
        cache, model = self.cache, self.model
        fresh, replay = stream is None, None
        if fresh:
            if int(cache.tokens_seen[row]):
                cache.reset([row])
            stream = _Stream(req.key, new_chat(self) if req.messages is not None else None)
            self._claim(stream, row)
            self.streams.append(stream)
        elif stream.row is None:
            if stream.parked is not None:
                cache.import_row(row, stream.parked)
                stream.parked = None
            else:  # a logged conversation: its log is fed again first, into a fresh row
                replay = list(stream.log)
                if int(cache.tokens_seen[row]):
                    cache.reset([row])
            self._claim(stream, row)
        stream.busy, req.stream, req.row = req, stream, row
        req.start = int(cache.tokens_seen[row])
        if stream.log is not None:  # what to go back to if the turn is cancelled mid-prefill
            req.log_backup = stream.log
            stream.log = array("q") if replay is not None else array("q", stream.log)
        try:
            if req.messages is not None:
                ids = self._chat_ids(req, stream, fresh)
            else:
                ids = req.ids[len(stream.tokens):]
            if replay:
                req.feed = torch.tensor([replay + list(ids)], dtype=torch.long, device=model.device)
            else:
                req.feed = new_stream_ids(model, ids, req.start)
            st = req.settings
            req.sampler = make_sampler(model, max_new_tokens=st["max_tokens"], temperature=st["temperature"],
                                       top_k=st["top_k"], top_p=st["top_p"],
                                       eos_ids=stream.chat.stop_ids if stream.chat is not None else self.text_eos,
                                       ignore_eos=st["ignore_eos"], vocab_size=self.tok.vocab_size,
                                       generator=torch.Generator(device=model.device).manual_seed(st["seed"]))
        except BaseException:
            if fresh:
                self._drop(stream)
            else:  # the kept stream stays as it was
                self._restore_chat(req)
                stream.busy = None
                if req.log_backup is not None:
                    stream.log = req.log_backup
                if replay is not None:  # the row holds nothing of it yet: it stays logged
                    self._release(stream)
            req.stream = None
            raise
        if stream.chat is None:
            req.decoder = self.tok.decoder(start_of_text=False)
        req.cached_tokens = req.start
        req.prompt_tokens = req.start + req.feed.shape[1]
        self.active.append(req)

    def _chat_ids(self, req: _Request, stream: _Stream, fresh: bool) -> list[int]:
        """A chat turn's ids, as ChatSession.begin_turn makes them."""
        chat = stream.chat
        req.saved = (chat.prompt_text, chat.unfed, list(chat.messages), chat.turns)
        chat.sampling["ignore_eos"] = req.settings["ignore_eos"]
        text = req.messages[-1]["content"]
        if not fresh:
            req.reply = chat.begin_turn(text)
            return req.reply.ids
        history = req.messages[:-1]
        if chat.template is None and history:
            # The plain format, as ChatSession feeds it turn by turn, rendered as one text.
            roles = [m["role"] for m in history]
            if len(history) % 2 or roles != ["user", "assistant"] * (len(history) // 2):
                raise MiniLLMError("without a chat template, the messages must alternate user and assistant "
                                   "(no system message)")
            parts = [PLAIN_FIRST.format(text=history[0]["content"]), history[1]["content"]]
            for i in range(2, len(history), 2):
                parts += [PLAIN_NEXT.format(text=history[i]["content"]), history[i + 1]["content"]]
            parts.append(PLAIN_NEXT.format(text=text))
            chat.messages, chat.turns, chat.unfed = [dict(m) for m in history], len(history) // 2, None
            req.reply = Reply(chat, text, self.tok.encode("".join(parts)))
            return req.reply.ids
        if history and history[0]["role"] == "system" and chat.template is None:
            raise MiniLLMError("a system message needs a chat template to render it, and this model has none")
        chat.messages, chat.turns = [dict(m) for m in history], 0
        req.reply = chat.begin_turn(text)
        return req.reply.ids

    def _restore_chat(self, req: _Request) -> None:
        if req.saved is not None and req.stream is not None and req.stream.chat is not None:
            c = req.stream.chat
            c.prompt_text, c.unfed, c.messages, c.turns = req.saved[0], req.saved[1], req.saved[2], req.saved[3]

    # prefill ---------------------------------------------------------------------------------

    def _prefill(self, events: list) -> None:
        budget = self.max_prefill_tokens
        for req in [r for r in self.active if r.logits is None and r.pos < r.feed.shape[1]]:
            if budget == 0:
                return
            n = min(budget, req.feed.shape[1] - req.pos)
            chunk = req.feed[:, req.pos : req.pos + n]
            try:
                logits = self._feed_row(req.row, chunk)
                req.pos += n
                budget -= n
                if req.stream.log is not None:
                    req.stream.log.extend(chunk[0].tolist())
                    if len(req.stream.log) > self.max_log_tokens:
                        req.stream.log = req.log_backup = None
                if req.pos == req.feed.shape[1]:
                    check_finite(logits[: self.tok.vocab_size], self.model, req.feed,
                                 f"request {req.rid}: {step_name(0, req.start + req.pos - 1, req.start)}")
                    req.logits = logits
                    if req.stream.chat is None:  # the stream now holds the whole prompt
                        req.stream.tokens = list(req.ids)
            except Exception as e:  # one request's failure fails it alone
                self._fail(req, e, events)

    def _feed_row(self, b: int, chunk: torch.Tensor) -> torch.Tensor:
        """Feed (1, n) ids to row b alone; its logits (V,) at the last one."""
        view = row_view(self.cache, b)
        with torch.no_grad():
            if view is not None:
                return self.model(chunk, cache=view, logits_to_keep=1)[0, -1]
            ids = torch.zeros((self.batch_size, chunk.shape[1]), dtype=torch.long, device=chunk.device)
            ids[b] = chunk[0]
            lengths = [chunk.shape[1] if r == b else 0 for r in range(self.batch_size)]
            return self.model(ids, cache=self.cache, lengths=lengths, logits_to_keep=1)[b, -1]

    # sampling and decoding -----------------------------------------------------------------------

    def _sample_and_decode(self, events: list) -> int:
        B = self.batch_size
        step = torch.zeros((B, 1), dtype=torch.long, device=self.model.device)
        lengths = [0] * B
        going: list[_Request] = []
        drawn = 0
        for req in [r for r in self.active if r.logits is not None]:
            if req.sampler.done:  # max_tokens=0: the prompt is fed, no token is drawn
                self._finish(req, events, None, "", "length")
                continue
            try:
                token, stop = req.sampler.next(req.logits)
            except Exception as e:  # one request's failure fails it alone
                self._fail(req, e, events)
                continue
            drawn += 1
            req.completion_tokens += 1
            if req.first is None:
                req.first = time.monotonic()
                self._ttft.append(req.first - req.added)
            text, finish = self._text(req, token, stop)
            if finish is not None:
                self._finish(req, events, token, text, finish)
                continue
            self._emit(req, events, token, text)
            step[req.row, 0] = token
            lengths[req.row] = 1
            going.append(req)
        if going:
            # Only the span of rows in flight is computed (a view of the cache: idle rows are
            # neither read nor written), so one request does not pay for the whole batch.
            lo, hi = min(r.row for r in going), max(r.row for r in going) + 1
            view = row_view(self.cache, lo, hi) if (lo, hi) != (0, B) else None
            if view is None:
                lo, hi, view = 0, B, self.cache
            try:
                with torch.no_grad():
                    logits = self.model(step[lo:hi], cache=view, lengths=lengths[lo:hi], logits_to_keep=1)
            except Exception as e:  # one request's failure fails it alone
                for req in going:
                    self._fail(req, e, events)
                return drawn
            V = self.tok.vocab_size
            finite = torch.isfinite(logits[:, -1, :V]).all(dim=-1).tolist()  # one check for every row
            seen = self.cache.tokens_seen
            for req in going:
                req.logits = logits[req.row - lo, -1]
                s = req.stream
                if s.chat is None:
                    s.tokens.append(int(step[req.row, 0]))
                elif s.log is not None:
                    s.log.append(int(step[req.row, 0]))
                    if len(s.log) > self.max_log_tokens:  # too long to replay: kept only while parked
                        s.log = None
                if not finite[req.row - lo]:
                    try:
                        check_finite(req.logits[:V], self.model, step[req.row : req.row + 1],
                                     f"request {req.rid}: {step_name(req.sampler.n, int(seen[req.row]) - 1, req.start)}")
                    except Exception as e:  # one request's failure fails it alone
                        self._fail(req, e, events)
        return drawn

    def _text(self, req: _Request, token: int, stop: str | None) -> tuple[str, str | None]:
        """The text `token` adds (through the stop strings) and the request's finish reason."""
        st = req.stops
        if req.reply is not None:
            piece = req.reply.push(token)  # None: the stop token (EOS, end-of-turn)
            if piece is None:
                stop = "eos"
            source_flush = req.reply.flush
        else:
            piece = None if stop == "eos" else req.decoder.push(token)
            source_flush = req.decoder.flush
        if stop == "eos":
            text = st.push(source_flush())
            return text + ("" if st.stopped else st.flush()), "stop"
        text = st.push(piece)
        if st.stopped:
            return text, "stop"
        if stop == "length":
            text += st.push(source_flush())
            return text + ("" if st.stopped else st.flush()), "stop" if st.stopped else "length"
        return text, None

    # finishing -------------------------------------------------------------------------------

    def _finish(self, req: _Request, events: list, token, text: str, finish: str) -> None:
        """The request's last event; its stream stays kept (idle in its row)."""
        s = req.stream
        if req in self.active:
            self.active.remove(req)
        if s is not None:
            if s.chat is not None and req.reply is not None:
                req.reply.close()
                s.digest = conversation_digest(req.messages + [s.chat.messages[-1]])
            s.busy = None
            self._clock += 1
            s.used = self._clock
            if s.key is not None:  # a name has one stream: an older one under it is forgotten
                for other in [o for o in self.streams if o.key == s.key and o is not s]:
                    self._drop(other)
        with self._lock:
            t = self.totals
            t["requests_finished"] += 1
            t["tokens_generated"] += req.completion_tokens
            t["prompt_tokens"] += req.prompt_tokens
            t["cached_tokens"] += req.cached_tokens
        self._emit(req, events, token, text, finish)

    def _cancel(self, req: _Request, events: list) -> None:
        if req in self.queue:
            with self._lock:
                self.queue.remove(req)
            self._emit(req, events, None, "", "cancelled")
            return
        if req.logits is None:  # mid-prefill: the row holds part of a turn
            self.active.remove(req)
            s = req.stream
            if s.chat is not None and s.digest is not None and req.log_backup is not None:
                # A conversation goes back to where it was, logged: its next request replays it.
                self._restore_chat(req)
                s.log, s.busy = req.log_backup, None
                self._release(s)
            else:
                self._drop(s)
            self._emit(req, events, None, "", "cancelled")
            return
        st = req.stops
        source = req.reply.flush if req.reply is not None else req.decoder.flush
        text = st.push(source())
        self._finish(req, events, None, text + ("" if st.stopped else st.flush()), "cancelled")

    def _fail(self, req: _Request, e: BaseException, events: list) -> None:
        """The request ends with an error; its stream (if it began) is dropped."""
        if req in self.active:
            self.active.remove(req)
        if req.stream is not None:
            self._drop(req.stream)
        self._emit(req, events, None, "", "error", first_line(e))

    # ------------------------------------------------------------------------------------------
    # Threads, stats, shutdown

    def start(self) -> None:
        """Step in a background thread while there is work (`shutdown()` stops it)."""
        with self._cond:
            if self._runner is not None:
                return
            self._stop_runner = False
            self._runner = threading.Thread(target=self._run, name="minillm-engine", daemon=True)
            self._runner.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop_runner and not self.has_work():
                    self._cond.wait(1.0)
                if self._stop_runner:
                    return
            try:
                self.step()
            except Exception as e:  # a failure outside any one request: fail them all, keep serving
                self._fail_all(e)

    def _fail_all(self, e: BaseException) -> None:
        """Fail every request in flight or queued (their streams are dropped)."""
        with self._step_lock:
            events: list[Event] = []
            for req in list(self.active):
                self._fail(req, e, events)
            with self._lock:
                queued, self.queue = list(self.queue), collections.deque()
            for req in queued:
                self._fail(req, e, events)

    def stats(self) -> EngineStats:
        """The counts and rates of `EngineStats`; any thread may call it (a snapshot: the lists
        the stepping thread changes are copied, not locked)."""
        with self._lock:
            now = time.monotonic()
            recent = [(t, n) for t, n in self._rate if t >= now - self.RATE_SECONDS]
            span = now - recent[0][0] if len(recent) > 1 else 0.0
            rate = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
            ttft = sum(self._ttft) / len(self._ttft) if self._ttft else 0.0
            totals, queued = dict(self.totals), len(self.queue)
        states = [(s.row, s.parked) for s in list(self.streams)]
        parked = [p for _, p in states if p is not None]
        return EngineStats(active_rows=len(list(self.active)), queued_requests=queued, parked_sessions=len(parked),
                           kept_sessions=len(states), parked_bytes=sum(_state_bytes(p) for p in parked),
                           logged_sessions=sum(r is None and p is None for r, p in states), tokens_per_second=rate,
                           time_to_first_token_seconds=ttft, **totals)

    def shutdown(self, *, finish: bool = False, timeout: float | None = None) -> None:
        """Stop: take no new requests; let the requests in flight finish (`finish=True`, for at
        most `timeout` seconds) or cancel them; stop the background thread; with `session_dir`,
        write every kept stream there. Their last events are delivered as usual."""
        with self._cond:
            self.closed = True
        deadline = None if timeout is None else time.monotonic() + timeout
        if finish:
            while self.has_work() and (deadline is None or time.monotonic() < deadline):
                if self._runner is not None:
                    with self._cond:
                        self._cond.wait(0.1)
                else:
                    self.step()
        with self._cond:
            for rid, req in self.requests.items():
                if not req.done:
                    self._cancels.add(rid)
            self._stop_runner = True
            self._cond.notify_all()
        if self._runner is not None:
            self._runner.join()
            self._runner = None
        while self.has_work():
            self.step()
        if self.session_dir is not None:
            save_streams(self)

    def drain(self, timeout: float | None = None) -> None:
        """`shutdown(finish=True, timeout=timeout)`."""
        self.shutdown(finish=True, timeout=timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        """`shutdown()`: what is in flight is cancelled, the kept streams are written to session_dir."""
        self.shutdown()
