"""The bridge between `minillm.Engine`'s stepping thread and the server's asyncio event loop.

The engine's contract (minillm/apps/engine.py) is that one thread steps and any thread may add or
cancel: `Engine.start()` runs that thread, which steps while there is work. Each request is added
with an `on_event` callback that hands its events to the request's asyncio queue with
`loop.call_soon_threadsafe`, so a token reaches its HTTP stream as soon as the step that made it
returns (nothing is buffered in the engine: `buffer=False`).

Admission: the engine's queue holds `--queue-size` requests beyond the `--batch-size` rows; one
more is a 429 (the client retries), and once draining has begun every new request is a 503. A
named session with a request already in flight is a 409. Draining lets the requests in flight
finish, cancels what is left after `drain_timeout` seconds, and shuts the engine down, which
parks every kept stream (to `--session-dir`, when given).
"""

from __future__ import annotations

import asyncio
import threading

from ..apps.engine import EngineClosed, QueueFull, SessionBusy
from .protocol import ApiError


class EngineThread:
    def __init__(self, engine, loop: asyncio.AbstractEventLoop):
        self.eng, self.loop = engine, loop
        self.accepting = True
        self.lock = threading.Lock()
        self.in_flight: set = set()  # the rids whose last event has not come yet
        self.closed = False

    def start(self) -> None:
        self.eng.start()

    def submit(self, prompt, session=None, **sampling):
        """Add a request; (rid, queue of its events). Called off the event loop: the engine
        checks and encodes the prompt, which takes a while for a long one."""
        queue: asyncio.Queue = asyncio.Queue()
        loop = self.loop

        def on_event(ev) -> None:  # in the engine's thread
            if ev.finish_reason is not None:
                with self.lock:
                    self.in_flight.discard(ev.rid)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        with self.lock:
            if not self.accepting:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
        try:
            rid = self.eng.add_request(prompt, session, on_event=on_event, buffer=False, **sampling)
        except QueueFull as e:
            raise ApiError(429, f"{e}", code="queue_full") from None
        except SessionBusy as e:
            raise ApiError(409, f"{e}", code="session_busy") from None
        except EngineClosed:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None
        with self.lock:
            self.in_flight.add(rid)
        return rid, queue

    def cancel(self, rid) -> None:
        """The client went away: the engine frees its row at its next step."""
        self.eng.cancel(rid)

    def begin_drain(self) -> None:
        with self.lock:
            self.accepting = False

    def cancel_all(self) -> None:
        with self.lock:
            rids = list(self.in_flight)
        for rid in rids:  # an rid that has just finished is refused by the engine, harmlessly
            self.eng.cancel(rid)

    def close(self, timeout: float = 30.0) -> None:
        """Let the requests in flight finish (at most `timeout` seconds), cancel the rest, stop
        the engine's thread, and park every kept stream (to --session-dir, if given)."""
        self.begin_drain()
        if not self.closed:
            self.closed = True
            self.eng.shutdown(finish=True, timeout=timeout)


def engine_stats(eng) -> dict:
    """The engine's counters (`Engine.stats()`) as a dict."""
    s = eng.stats()
    return dict(vars(s)) if hasattr(s, "__dict__") else {k: getattr(s, k) for k in s.__dataclass_fields__}
