"""Running the server: the socket, uvicorn, and the drain on SIGINT/SIGTERM.

The socket is bound before uvicorn starts, so a port in use is one line (`minillm: error: ...`,
exit 2) and `--port 0` picks a free port; the line `minillm: serving MODEL on http://HOST:PORT`
on stderr names the real one. SIGINT and SIGTERM drain: the server stops accepting connections
and answers new requests on open ones with a 503, the requests in flight finish (those still
running after --drain-timeout seconds are cancelled), every kept stream is parked (to
--session-dir, when given), and the command exits 0. uvicorn re-raises a signal it caught once it
has shut down; here it does not, so the exit is the drain's, not the signal's. A second SIGINT
during the drain stops waiting for the requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading

from ..errors import MiniLLMError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise MiniLLMError(f"--host {host}: cannot resolve it ({e.strerror or e})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise MiniLLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket, *, on_signal, log_level: str = "warning", drain_timeout: float = 30.0) -> None:
    """Serve `app` on `sock` until SIGINT/SIGTERM, then drain (`on_signal` is called at the
    first signal, from the event loop)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():  # pragma: no cover
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
            try:
                yield
            finally:  # restored, and the signal is not raised again: the drain was the answer to it
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig, frame):
            first = not self.should_exit
            super().handle_exit(sig, frame)
            if first:
                on_signal()
            elif self.force_exit:  # a second SIGINT: the tasks in flight are cancelled, which is no error
                logging.getLogger("uvicorn.error").setLevel(logging.CRITICAL)

    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=drain_timeout + 5, server_header=False)
    server = Server(config)
    asyncio.run(server.serve(sockets=[sock]))


def run_server(args, model, tok, sinks: int, window: int) -> int:
    """`minillm serve`: the engine, the app, and uvicorn until a signal; 0 after the drain."""
    import minillm

    from .app import ServeConfig, create_app
    from .protocol import Limits

    name = model_name(args)
    engine_kwargs = dict(batch_size=args.batch_size, sinks=sinks, window=window,
                         max_prefill_tokens=args.max_prefill_tokens, max_sessions=args.max_sessions,
                         max_queue=args.queue_size, max_prompt_tokens=args.max_prompt_tokens,
                         positions=args.positions)
    if args.session_dir is not None:
        engine_kwargs["session_dir"] = args.session_dir
    engine = minillm.Engine(model, tok, **engine_kwargs)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_messages=args.max_messages,
                    max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens_limit,
                    default_max_tokens=min(args.default_max_tokens, args.max_tokens_limit))
    fingerprint = None
    try:
        from ..identity import fingerprint as model_fingerprint

        fingerprint = "minillm-" + str(model_fingerprint(model))[:16]
    except Exception:
        pass
    config = ServeConfig(model_name=name, api_key=args.api_key, limits=limits,
                         drain_timeout=args.drain_timeout,
                         fingerprint=fingerprint)
    app = create_app(engine, config)
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"minillm: serving {name} on http://{shown}:{port} (batch {args.batch_size}, cache {sinks}+{window}, "
          f"sessions {args.max_sessions}{', session dir ' + str(args.session_dir) if args.session_dir else ''}"
          f"{', API key required' if args.api_key else ''})", file=sys.stderr, flush=True)

    def drain():
        print("minillm: draining (finishing the requests in flight, parking the streams)", file=sys.stderr,
              flush=True)
        worker = app.state.minillm.get("worker")
        if worker is not None:
            worker.begin_drain()
            asyncio.get_running_loop().call_later(args.drain_timeout, worker.cancel_all)

    def on_signal():  # in the signal handler: hand the work to the event loop
        loop = app.state.minillm.get("loop")
        if loop is not None:
            loop.call_soon_threadsafe(drain)

    logging.getLogger("minillm.serve").setLevel(logging.WARNING)
    try:
        serve(app, sock, on_signal=on_signal, drain_timeout=args.drain_timeout)
    finally:
        sock.close()
        worker = app.state.minillm.get("worker")
        if worker is not None and not worker.closed:  # a second signal skipped the app's shutdown:
            worker.close(timeout=0)  # cancel what is left, and still park the streams
    print("minillm: stopped", file=sys.stderr, flush=True)
    return 0


def model_name(args) -> str:
    """The id clients send as `model`: --served-model-name, else the checkpoint's name."""
    from pathlib import Path

    if getattr(args, "served_model_name", None):
        return args.served_model_name
    if args.model is None:
        return "llama-tiny"
    p = Path(args.model)
    return p.name if p.exists() else args.model
