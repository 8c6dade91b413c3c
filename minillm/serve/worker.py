"""The engine thread: one thread steps `minillm.Engine`, the server's event loop adds and cancels.

The engine's contract (minillm/apps/engine.py) is that one thread steps and any thread may add or
cancel. `EngineThread` is that one thread: while any request is in flight it calls `step()`, and
hands each event to its request's asyncio queue with `loop.call_soon_threadsafe`, so a token
reaches its HTTP stream as soon as the step that made it returns. When nothing is in flight it
sleeps on an event that `submit` sets.

Admission: at most `batch_size + queue_size` requests are in flight; one more is a 429 (the
client retries), and once draining has begun every new request is a 503. Draining lets the
requests in flight finish, cancels what is left after `drain_timeout` seconds, and then shuts the
engine down, which parks every kept stream (to `--session-dir`, when given).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from ..errors import MiniLLMError
from .protocol import ApiError

log = logging.getLogger("minillm.serve")


@dataclass
class Failure:
    """Put in a request's queue instead of an event when the engine failed it."""
    message: str
    finish_reason: str = "error"
    rid: object = None
    token: object = None
    text: str = ""


class EngineThread:
    def __init__(self, engine, loop: asyncio.AbstractEventLoop, *, capacity: int):
        self.eng, self.loop, self.capacity = engine, loop, capacity
        self.requests: dict = {}  # rid -> asyncio.Queue of its events
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.accepting = True
        self.stop = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="minillm-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- any thread -------------------------------------------------------------------------

    def submit(self, prompt, session=None, **sampling):
        """Add a request; (rid, queue of its events). Called off the event loop (rendering and
        tokenizing a long conversation takes a while)."""
        with self.lock:
            if not self.accepting:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self.requests) >= self.capacity:
                raise ApiError(429, f"the server is busy ({len(self.requests)} requests in flight, the queue is "
                                    f"full); retry later", code="queue_full")
            try:
                rid = self.eng.add_request(prompt, session=session, **sampling)
            except MiniLLMError:
                raise
            except Exception as e:
                if type(e).__name__ == "QueueFull":
                    raise ApiError(429, f"the engine's queue is full ({e}); retry later", code="queue_full") from None
                raise
            queue: asyncio.Queue = asyncio.Queue()
            self.requests[rid] = queue
        self.wake.set()
        return rid, queue

    def cancel(self, rid) -> None:
        """The client went away (or a stop sequence ended the reply): free its row at the next step."""
        with self.lock:
            self.requests.pop(rid, None)
        try:
            self.eng.cancel(rid)
        except Exception:  # already finished
            pass
        self.wake.set()

    def in_flight(self) -> int:
        return len(self.requests)

    # -- the engine thread ------------------------------------------------------------------

    def _busy(self) -> bool:
        if self.requests:
            return True
        stats = engine_stats(self.eng)  # a cancelled request still holds its row until the next step
        return bool(stats.get("active_rows") or stats.get("queued"))

    def _run(self) -> None:
        while True:
            if not self._busy():
                if self.stop:
                    return
                self.wake.wait(0.5)
                self.wake.clear()
                continue
            try:
                events = self.eng.step()
            except Exception as e:  # the engine itself failed: fail what is in flight, keep serving
                log.exception("engine step failed")
                with self.lock:
                    failed, self.requests = self.requests, {}
                for rid, queue in failed.items():
                    self._put(queue, Failure(f"the engine failed: {type(e).__name__}: {e}", rid=rid))
                    try:
                        self.eng.cancel(rid)
                    except Exception:
                        pass
                time.sleep(0.05)
                continue
            with self.lock:
                for ev in events:
                    queue = self.requests.get(ev.rid)
                    if queue is None:
                        continue
                    if ev.finish_reason is not None:
                        del self.requests[ev.rid]
                    self._put(queue, ev)

    def _put(self, queue: asyncio.Queue, item) -> None:
        try:
            self.loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    # -- shutting down ----------------------------------------------------------------------

    def begin_drain(self) -> None:
        with self.lock:
            self.accepting = False

    def cancel_all(self) -> None:
        with self.lock:
            rids = list(self.requests)
        for rid in rids:
            try:
                self.eng.cancel(rid)
            except Exception:
                pass
        self.wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the thread once nothing is in flight (cancelling what is left after `timeout`),
        then shut the engine down: every kept stream is parked (to --session-dir, if given)."""
        self.begin_drain()
        deadline = time.monotonic() + timeout
        while self.requests and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.requests:
            self.cancel_all()
        self.stop = True
        self.wake.set()
        self.thread.join(timeout=max(5.0, timeout))
        shutdown = getattr(self.eng, "shutdown", None)
        if shutdown is not None:
            shutdown()


def engine_stats(eng) -> dict:
    """The engine's counters as a dict: active_rows, queued, parked, tokens_per_second, ttft."""
    stats = getattr(eng, "stats", None)
    if stats is None:
        return {}
    s = stats() if callable(stats) else stats
    if isinstance(s, dict):
        return s
    return {k: getattr(s, k) for k in dir(s) if not k.startswith("_") and not callable(getattr(s, k))}
