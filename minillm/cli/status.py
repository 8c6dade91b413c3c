"""The status line: what a long phase is doing, on stderr, redrawn in place on a terminal.

- When stderr is a terminal, each long phase (importing torch, loading or dequantizing a
  checkpoint, prefilling a long prompt) redraws one line (`\\r`, erase to the end of the line)
  and erases it when the phase ends, so what stays on the screen is the output, the warnings and
  the closing summary (`minillm: 60 tokens at ... tokens/s (...); prompt 7 tokens at ...`).
- When stderr is not a terminal (a pipe, a file, a test), nothing is drawn: a log gets the
  closing summary only, and a refusal is still its single `minillm: error:` line.
- `clear()` runs before anything else is written to stderr (a warning, an error), so a status
  line never mixes with them.
"""

from __future__ import annotations

import shutil
import sys
import time

ERASE = "\r\x1b[K"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Status:
    def __init__(self, stream=None):
        self._stream = stream
        self.shown = False
        self._last = 0.0

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stderr

    @property
    def active(self) -> bool:
        return _isatty(self.stream)

    def show(self, text: str, *, every: float = 0.1) -> None:
        """Redraw the line with `text` (at most every `every` seconds; 0: now)."""
        now = time.monotonic()
        if not self.active or (self.shown and now - self._last < every):
            return
        self._last = now
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        try:
            self.stream.write(ERASE + text[:width])
            self.stream.flush()
        except (OSError, ValueError):
            return
        self.shown = True

    def clear(self) -> None:
        """Erase the line, if one is drawn."""
        if not self.shown:
            return
        self.shown = False
        try:
            self.stream.write(ERASE)
            self.stream.flush()
        except (OSError, ValueError):
            pass


STATUS = Status()


class PhaseReporter:
    """A `minillm.progress` reporter drawing `label: what done/total` on the status line; a phase
    shows only once it has run `after` seconds (a short prefill draws nothing). It records when
    each phase finished, and its total, for the closing summary."""

    def __init__(self, label: str, names: dict[str, str], after: dict[str, float] | None = None):
        self.label, self.names, self.after = label, names, after or {}
        self.started: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.totals: dict[str, int] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.perf_counter()
        start = self.started.setdefault(phase, now)
        self.totals[phase] = total
        if done >= total:
            self.finished[phase] = now
        if now - start < self.after.get(phase, 0.0):
            return
        rate = done / (now - start) if now > start and done else 0.0
        what = self.names.get(phase, phase)
        STATUS.show(f"{self.label}: {what} {done:,}/{total:,}" + (f" ({rate:,.0f}/s)" if rate >= 1 else ""))
