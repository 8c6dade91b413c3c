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

import torch

from .cache import slot_positions


@dataclass
class KeyPositions:
    """Per row b, query i (stream position t = tokens_seen[b] + i) and key column k."""
    key: torch.Tensor  # (B, Nk) stream position of each key column, -1 for an empty slot
    query: torch.Tensor  # (B, n) stream position t of each query
    allowed: torch.Tensor  # (B, n, Nk) bool: column k is in K_t
    position: torch.Tensor  # (B, n, Nk) int64 cache-relative position of key k for query t (where allowed)
    query_position: torch.Tensor  # (B, n) int64 c_t, the query's own cache-relative position


def key_positions(tokens_seen: torch.Tensor, n: int, sinks: int, window: int | None,
                  device=None) -> KeyPositions:
    """Key sets and cache-relative positions for n new tokens after tokens_seen (B,) int64 per row.

    Key columns: the S = sinks + window slots in the cache's layout (cache.py), then the n chunk
    tokens, Nk = S + n. window=None is the dense forward: no cache, nothing evicted, Nk = n, and
    positions are absolute (c_t = t)."""
    t0 = tokens_seen.to(device=device, dtype=torch.int64)[:, None]  # (B, 1)
    t = t0 + torch.arange(n, device=t0.device)  # (B, n)
    tq = t[:, :, None]  # (B, n, 1)
    if window is None:
        key, c = t, t
        kp = key[:, None, :]  # (B, 1, Nk)
        allowed = (kp >= 0) & (kp <= tq)
    else:
        key = torch.cat([slot_positions(t0[:, 0], sinks, window), t], dim=1)  # (B, S + n)
        c = t.clamp(max=sinks + window - 1)
        kp = key[:, None, :]
        allowed = (kp >= 0) & (kp <= tq) & ((kp < sinks) | (kp > tq - window))
    position = torch.where(kp < sinks, kp, c[:, :, None] - (tq - kp))
    return KeyPositions(key=key, query=t, allowed=allowed, position=position, query_position=c)
