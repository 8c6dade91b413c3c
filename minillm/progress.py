"""Progress of the long phases (loading a checkpoint, prefilling a prompt), for whoever shows it.

The library calls `report(phase, done, total)` as it goes; that does nothing unless a caller has
installed a reporter with `reporting(fn)` (the command line does, minillm/cli/status.py). No
output of the library depends on it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

_reporter: Callable[[str, int, int], None] | None = None


def report(phase: str, done: int, total: int) -> None:
    """`done` of `total` units of `phase` ("tensors", "prefill") are finished."""
    if _reporter is not None:
        _reporter(phase, done, total)


@contextmanager
def reporting(fn: Callable[[str, int, int], None]):
    """Send `report` calls to `fn` inside the block."""
    global _reporter
    before, _reporter = _reporter, fn
    try:
        yield
    finally:
        _reporter = before
