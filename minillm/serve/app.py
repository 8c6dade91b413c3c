"""The FastAPI application of `minillm serve`: the OpenAI routes, /health and /metrics.

    POST /v1/chat/completions   messages -> a reply (streamed as server-sent events, or whole)
    POST /v1/completions        prompt -> a continuation
    GET  /v1/models             the one model served
    GET  /health                200 while serving, 503 once draining (no key needed)
    GET  /metrics               Prometheus text: rows, queue, parked streams, tokens/s, TTFT

Each request is checked (minillm/serve/protocol.py), handed to the engine thread
(minillm/serve/worker.py) and answered from its queue of events. A streamed reply sends the role
first, then the text as the engine makes it, then `finish_reason`, then a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`. A client that goes away (a stream's task is
cancelled by Starlette, or a whole reply's connection closes) cancels its request, which frees
its row at the engine's next step.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MiniLLMError
from . import protocol as P
from .worker import EngineThread, engine_stats

METRICS = (
    ("minillm_active_rows", "gauge", "cache rows serving an in-flight request", "active_rows"),
    ("minillm_queued_requests", "gauge", "requests waiting for a row", "queued_requests"),
    ("minillm_parked_sessions", "gauge", "idle conversation streams parked out of the cache", "parked_sessions"),
    ("minillm_tokens_per_second", "gauge", "tokens generated per second over the last seconds", "tokens_per_second"),
    ("minillm_time_to_first_token_seconds", "gauge", "mean time to first token of the last 100 requests",
     "time_to_first_token_seconds"),
)


@dataclass
class ServeConfig:
    model_name: str
    api_key: str | None = None
    limits: P.Limits = field(default_factory=P.Limits)
    drain_timeout: float = 30.0
    fingerprint: str | None = None


def create_app(engine, config: ServeConfig) -> FastAPI:
    """The application around `engine` (a minillm.Engine); its thread starts with the app."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        worker = EngineThread(engine, asyncio.get_running_loop())
        state["worker"], state["loop"] = worker, asyncio.get_running_loop()
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.close, config.drain_timeout)

    app = FastAPI(title="minillm serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.minillm = state
    key = config.api_key.encode() if config.api_key else None
    created = int(time.time())

    def check_key(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare in constant time: the whole header against the whole expected one
        if not hmac.compare_digest((scheme.lower() + " " + token.strip()).encode(), b"bearer " + key):
            raise P.ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                             code="invalid_api_key")

    @app.exception_handler(P.ApiError)
    async def api_error(request, e: P.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse(P.ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # a bug answers this request alone, as OpenAI's JSON
        logging.getLogger("minillm.serve").exception("internal error")
        return JSONResponse(P.ApiError(500, f"internal error: {type(e).__name__}").body(), status_code=500)

    @app.get("/health")
    async def health():
        worker = state.get("worker")
        if worker is None or not worker.accepting:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    v1 = APIRouter(dependencies=[Depends(check_key)])

    @v1.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "minillm"}]}

    @v1.get("/metrics")
    async def metrics():
        stats = engine_stats(engine)
        lines = []
        for name, kind, help_, key_ in METRICS:
            value = stats.get(key_)
            value = 0.0 if value is None else float(value)
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @v1.post("/v1/chat/completions")
    async def chat(request: Request):
        job = P.parse_chat(P.parse_body(await _body(request, config.limits.max_body_bytes)), config.limits,
                           config.model_name)
        return await _run(request, job)

    @v1.post("/v1/completions")
    async def completions(request: Request):
        job = P.parse_completion(P.parse_body(await _body(request, config.limits.max_body_bytes)), config.limits,
                                 config.model_name)
        return await _run(request, job)

    app.include_router(v1)

    async def _run(request: Request, job: P.Job):
        worker: EngineThread = state["worker"]
        sampling = dict(max_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p, seed=job.seed,
                        stop=job.stops or None)
        param = "messages" if job.kind == "chat" else "prompt"

        try:
            rid, queue = await asyncio.to_thread(worker.submit, job.prompt, None, **sampling)
        except MiniLLMError as e:
            message = " ".join(str(e).split())
            if "max_prompt_tokens" in message:
                raise P.ApiError(400, f"{param}: {message} (--max-prompt-tokens)", param=param,
                                 code="context_length_exceeded") from None
            raise P.ApiError(400, f"{param}: {message}", param=param, code="invalid_value") from None
        reply = _Reply(job, rid, queue, worker, config)
        # The first event, before any header is sent: a request the engine cannot start (a
        # conversation the template refuses, say) is still answered with a 4xx status.
        if not await reply.start(request):
            return Response(status_code=499)  # the client went away first
        if job.stream:
            return StreamingResponse(reply.events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await reply.whole(request)

    return app


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise P.ApiError(413, f"the request body is {int(length)} bytes; at most {limit} (--max-body-bytes)",
                         code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise P.ApiError(413, f"the request body exceeds {limit} bytes (--max-body-bytes)",
                             code="request_too_large")
        parts.append(part)
    return b"".join(parts)


class _Reply:
    """One request's events, turned into a streamed or a whole OpenAI response."""

    def __init__(self, job: P.Job, rid, queue: asyncio.Queue, worker: EngineThread, config: ServeConfig):
        self.job, self.rid, self.queue, self.worker, self.config = job, rid, queue, worker, config
        self.id = P.new_id(job.kind)
        self.created = int(time.time())
        self.done = False
        self.last = None  # the last event: finish_reason and the counts
        self.first = None  # the first event, once `start` has it

    async def start(self, request: Request) -> bool:
        """Wait for the request's first event; False if the client went away first."""
        got = await _unless_disconnected(request, self.queue.get())
        if got is None:
            self.worker.cancel(self.rid)
            return False
        if got.finish_reason == "error":
            param = "messages" if self.job.kind == "chat" else "prompt"
            raise P.ApiError(400, f"{param}: {got.error}", param=param, code="invalid_value")
        self.first = got
        return True

    async def _pieces(self):
        """(text, finish_reason) as the engine makes them; finish_reason on the last only."""
        try:
            while True:
                ev, self.first = (self.first, None) if self.first is not None else (await self.queue.get(), None)
                if ev.finish_reason == "error":
                    self.done = True
                    raise P.ApiError(500, f"the request failed: {ev.error}", type="server_error", code="engine_error")
                if ev.finish_reason is not None:
                    self.done, self.last = True, ev
                    yield ev.text, ev.finish_reason
                    return
                if ev.text:
                    yield ev.text, None
        finally:
            if not self.done:  # the client went away (the task was cancelled): free the row
                self.worker.cancel(self.rid)

    def usage(self) -> dict:
        ev = self.last
        return P.usage(ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens)

    async def events(self):
        job, c = self.job, self.config
        name, fp = c.model_name, c.fingerprint
        inc = job.include_usage

        def chunk(**kw):
            return P.sse(P.chunk(job.kind, self.id, name, self.created, fp, include_usage=inc, **kw))
        try:
            if job.kind == "chat":
                yield chunk(role=True)
            async for text, finish in self._pieces():
                if finish is None:
                    yield chunk(text=text)
                else:
                    if text:
                        yield chunk(text=text)
                    yield chunk(finish=finish)
            if inc:
                yield P.sse(P.chunk(job.kind, self.id, name, self.created, fp, no_choices=True, include_usage=True,
                                    use=self.usage()))
        except P.ApiError as e:  # the engine failed this request: say so in the stream, then end it
            yield P.sse(e.body())
        yield P.sse("[DONE]")

    async def whole(self, request: Request) -> Response:
        async def collect():
            texts, finish = [], None
            async for text, finish in self._pieces():
                texts.append(text)
            return "".join(texts), finish

        got = await _unless_disconnected(request, collect())
        if got is None:  # the client went away: the task's cancellation cancelled the request
            return Response(status_code=499)
        text, finish = got  # an ApiError (the engine failed it) is answered by its handler
        return JSONResponse(P.response(self.job.kind, self.id, self.config.model_name, text, finish, self.usage(),
                                       self.config.fingerprint))


async def _unless_disconnected(request: Request, awaitable):
    """The awaitable's result, or None if the client closes the connection first (the
    awaitable's task is then cancelled)."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():  # the client went away, or this handler was cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return task.result() if not task.cancelled() else None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
