"""The streaming contract: which keys token t attends to, where they live, at which positions.

For a cache of capacity S = sinks + window (docs/streaming.md has a worked example):
- token t attends to K_t = {0..t} while t < S, else the sinks {0..sinks-1} plus {t-window+1..t};
- positions follow the cache's convention (`POSITIONS`):
  * "cache" (the paper, the default): a key's position is its rank in K_t, so the query sits at
    c_t = |K_t| - 1 = min(t, S-1), sink i at i, and window key j at c_t - (t - j);
  * "absolute": every key keeps its text position j and the query sits at t; it is the same
    formula with c_t = t (a sink i < sinks is at i in both), so one function serves both;
- token j is stored in slot j while j < sinks, else in ring slot sinks + (j - sinks) % window, so
  which token holds which slot is a pure function of how many tokens a row has seen.
Every path of the engine, core and fast, takes its key sets and positions from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import MiniLLMError

POSITIONS = ("cache", "absolute")  # the two position conventions; "cache" is the paper's


def check_positions(positions, what: str = "positions") -> str:
    """`positions` if it names a convention, else a one-line MiniLLMError naming it."""
    if not isinstance(positions, str) or positions not in POSITIONS:
        raise MiniLLMError(f"{what} must be \"cache\" or \"absolute\", got {positions!r:.60}")
    return positions


def query_position(t, S: int, positions: str = "cache"):
    """The query's own position for stream position(s) t (an int, or an int64 tensor) through a
    cache of capacity S: c_t = min(t, S-1) under "cache", t itself under "absolute"."""
    if positions == "absolute":
        return t
    return min(t, S - 1) if isinstance(t, int) else t.clamp(max=S - 1)


def slot_of(positions: int | torch.Tensor, sinks: int, window: int) -> int | torch.Tensor:
    """The slot that stream position(s) j are written to (a Python int for an int)."""
    ring = sinks + (positions - sinks) % window  # floor mod, ints and tensors alike
    if isinstance(positions, int):
        return positions if positions < sinks else ring
    return torch.where(positions < sinks, positions, ring)


def slot_positions(tokens_seen: torch.Tensor | int, sinks: int, window: int, device=None) -> torch.Tensor:
    """(B, S) int64: the stream position each slot holds after tokens_seen[b] tokens, -1 if empty.

    tokens_seen is (B,), or an int for all rows ((1, S) then)."""
    if isinstance(tokens_seen, torch.Tensor):
        device = tokens_seen.device
        t = tokens_seen.to(torch.int64)[:, None]  # (B, 1)
    else:
        t = tokens_seen
    slots = torch.arange(sinks + window, device=device)[None, :]  # (1, S)
    sink_pos = torch.where(slots < t, slots, -1)
    k = slots - sinks  # ring slot sinks + k holds the latest j = sinks + k + m * window with j < t
    filled = t - sinks  # tokens that ever went to the ring
    latest = sinks + k + window * torch.div(filled - 1 - k, window, rounding_mode="floor")
    return torch.where(slots < sinks, sink_pos, torch.where(k < filled, latest, -1))


@dataclass
class KeyPositions:
    """Per row b, query i (stream position t = tokens_seen[b] + i) and key column k."""
    key: torch.Tensor  # (B, Nk) stream position of each key column, -1 for an empty slot
    query: torch.Tensor  # (B, n) stream position t of each query
    allowed: torch.Tensor  # (B, n, Nk) bool: column k is in K_t
    query_position: torch.Tensor  # (B, n) int64 c_t, the query's own position (t under "absolute")
    sinks: int
    dense: bool  # no cache: absolute positions, a key's position is the same for every query
    positions: str = "cache"  # the convention (POSITIONS); under "absolute" c_t = t

    @cached_property
    def position(self) -> torch.Tensor:
        """(B, n, Nk) position of key k for query t (meaningful where allowed): its rank in K_t
        under "cache", its stream position under "absolute"; (B, 1, Nk) when dense."""
        return self.positions_of(slice(None))

    def positions_of(self, cols) -> torch.Tensor:
        """`position` for the key columns `cols` only."""
        kp = self.key[:, None, cols]  # (B, 1, k)
        if self.dense:
            return kp
        tq = self.query[:, :, None]
        return torch.where(kp < self.sinks, kp, self.query_position[:, :, None] - (tq - kp))

    def is_sink(self, cols) -> torch.Tensor:
        """(B, len(cols)) bool: the column holds one of the stream's sinks."""
        key = self.key[:, cols]
        return (key >= 0) & (key < self.sinks)


def key_positions(tokens_seen: torch.Tensor, n: int, sinks: int, window: int | None,
                  slots: bool = True, positions: str = "cache") -> KeyPositions:
    """Key sets and positions for n new tokens after tokens_seen (B,) int64 per row, in the
    convention `positions` ("cache": cache-relative, the paper's; "absolute": text positions).

    Key columns: the S = sinks + window slots in the cache's layout, then the n new tokens, Nk = S + n;
    `slots=False` leaves out the slot columns (when every row's cache is empty they hold nothing).
    window=None is the dense forward: no cache, nothing evicted, Nk = n, and positions are absolute
    (c_t = t). Everything is computed on tokens_seen's device."""
    t0 = tokens_seen.to(torch.int64)[:, None]  # (B, 1)
    t = t0 + torch.arange(n, device=t0.device)  # (B, n)
    tq = t[:, :, None]  # (B, n, 1)
    if window is None:
        return KeyPositions(key=t, query=t, allowed=t[:, None, :] <= tq, query_position=t, sinks=0, dense=True,
                            positions="absolute")
    check_positions(positions)
    key = torch.cat([slot_positions(t0[:, 0], sinks, window), t], dim=1) if slots else t  # (B, Nk)
    kp = key[:, None, :]  # (B, 1, Nk)
    allowed = (kp >= 0) & (kp <= tq) & ((kp < sinks) | (kp > tq - window))
    return KeyPositions(key=key, query=t, allowed=allowed, query_position=query_position(t, sinks + window, positions),
                        sinks=sinks, dense=False, positions=positions)
