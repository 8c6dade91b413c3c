"""`minillm serve`: an OpenAI-compatible HTTP server over `minillm.Engine` (needs the `serve` extra).

    protocol.py  the OpenAI request and response shapes, their checks and error JSON
    worker.py    the engine thread, and the bridge of its events to each request's asyncio queue
    app.py       the FastAPI routes: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics
    server.py    the socket, uvicorn, and the drain on SIGINT/SIGTERM

Details: docs/serving.md.
"""
