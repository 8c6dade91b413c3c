"""What token t attends to, and at which positions: the streaming contract in one function.

For a cache of capacity S = sinks + window (docs/streaming.md has the contract and a worked example):
- token t attends to K_t = {0..t} while t < S, else the sinks {0..sinks-1} plus {t-window+1..t};
- positions are cache-relative: a key's position is its rank in K_t, so the query sits at
  c_t = |K_t| - 1 = min(t, S-1), sink i at i, and window key j at c_t - (t - j).

`key_positions` states both for one forward over the keys it can see: the cache's S slots as they
were before the call, then the call's own n tokens. The dense and chunk plans (attention.py) take
their masks, ALiBi positions and sink frames from it; the decode step keeps a faster closed form
that tests/test_keys.py checks against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from .cache import slot_positions


@dataclass
class KeyPositions:
    """Per row b, query i (stream position t = tokens_seen[b] + i) and key column k."""
    key: torch.Tensor  # (B, Nk) stream position of each key column, -1 for an empty slot
    query: torch.Tensor  # (B, n) stream position t of each query
    allowed: torch.Tensor  # (B, n, Nk) bool: column k is in K_t
    query_position: torch.Tensor  # (B, n) int64 c_t, the query's own cache-relative position
    sinks: int
    dense: bool  # no cache: absolute positions, a key's position is the same for every query

    @cached_property
    def position(self) -> torch.Tensor:
        """(B, n, Nk) int64 cache-relative position of key k for query t (meaningful where allowed);
        (B, 1, Nk) when dense. Computed on first use: only ALiBi needs all of it."""
        return self.positions_of(slice(None))

    def positions_of(self, cols) -> torch.Tensor:
        """`position` for the key columns `cols` only: (B, n, len(cols)), or (B, 1, len(cols)) when dense."""
        kp = self.key[:, None, cols]  # (B, 1, k)
        if self.dense:
            return kp
        tq = self.query[:, :, None]
        return torch.where(kp < self.sinks, kp, self.query_position[:, :, None] - (tq - kp))


def key_positions(tokens_seen: torch.Tensor, n: int, sinks: int, window: int | None,
                  slots: bool = True) -> KeyPositions:
    """Key sets and cache-relative positions for n new tokens after tokens_seen (B,) int64 per row.

    Key columns: the S = sinks + window slots in the cache's layout (cache.py), then the n chunk
    tokens, Nk = S + n; `slots=False` leaves out the slot columns (when every row's cache is empty
    they hold nothing). window=None is the dense forward: no cache, nothing evicted, Nk = n, and
    positions are absolute (c_t = t). Everything is computed on tokens_seen's device."""
    t0 = tokens_seen.to(torch.int64)[:, None]  # (B, 1)
    t = t0 + torch.arange(n, device=t0.device)  # (B, n)
    tq = t[:, :, None]  # (B, n, 1)
    if window is None:
        return KeyPositions(key=t, query=t, allowed=t[:, None, :] <= tq, query_position=t, sinks=0, dense=True)
    key = torch.cat([slot_positions(t0[:, 0], sinks, window), t], dim=1) if slots else t  # (B, Nk)
    kp = key[:, None, :]  # (B, 1, Nk)
    allowed = (kp >= 0) & (kp <= tq) & ((kp < sinks) | (kp > tq - window))
    return KeyPositions(key=key, query=t, allowed=allowed, query_position=t.clamp(max=sinks + window - 1),
                        sinks=sinks, dense=False)
