"""SinkCache: the fixed-shape sink + window KV cache of StreamingLLM.

Capacity S = sinks + window counts every key a token attends to, itself included (the contract
and a worked example of the slots are in docs/streaming.md).
Per layer the buffers are (B, n_kv_heads, S, head_dim), allocated once:

    slot:   0 .. sinks-1           sinks .. S-1
            [ sink region        | ring buffer of the most recent `window` tokens ]

Token j goes to slot j while j < sinks, and to ring slot sinks + (j - sinks) % window after that,
overwriting the token that leaves the window. Eviction is that one overwrite: O(1), and nothing is
ever reallocated, concatenated or grown. Which token sits in which slot is a pure function of
`tokens_seen` (`slot_positions`), so the only bookkeeping is that one integer; it advances in one
place, `advance`, after a forward has written its keys with `write`.

Keys are stored RoPE-rotated at their stream position. For a window key j and query t the
distance t - j is then exactly the cache-relative one; only the sinks need another position, so
their un-rotated keys are also kept (`raw_sink_k`) and rotated into the query's frame on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_int


def slot_of(positions: int | torch.Tensor, sinks: int, window: int) -> int | torch.Tensor:
    """The slot that stream position(s) j are written to (a Python int for an int: decode)."""
    ring = sinks + (positions - sinks) % window  # floor mod, ints and tensors alike
    if isinstance(positions, int):
        return positions if positions < sinks else ring
    return torch.where(positions < sinks, positions, ring)


def slot_positions(tokens_seen: torch.Tensor | int, sinks: int, window: int, device=None) -> torch.Tensor:
    """(B, S) int64: the stream position each slot holds after tokens_seen[b] tokens, -1 if empty.

    tokens_seen is (B,), or an int for all rows ((1, S) then, with no host-to-device copy)."""
    if isinstance(tokens_seen, torch.Tensor):
        device = tokens_seen.device
        t = tokens_seen.to(torch.int64)[:, None]  # (B, 1)
    else:
        t = tokens_seen
    slots = torch.arange(sinks + window, device=device)[None, :]  # (1, S)
    sink_pos = torch.where(slots < t, slots, -1)
    # Ring slot r = sinks + k holds the latest j = sinks + k + m*window with j < t.
    k = slots - sinks
    filled = t - sinks  # tokens that ever went to the ring
    latest = sinks + k + window * torch.div(filled - 1 - k, window, rounding_mode="floor")
    ring_pos = torch.where(k < filled, latest, -1)
    return torch.where(slots < sinks, sink_pos, ring_pos)


@dataclass
class CacheWrite:
    """Where one forward's new keys and values go; made by the plan, applied by SinkCache.write.

    A chunk writes its columns `src` to slots `dst` (sinks, then only the last `window` ring tokens:
    earlier ones would be overwritten within the same chunk). A decode step (`src` None) writes its
    one token to slot `dst` (1,). Sinks also keep their un-rotated key at raw slot i: columns
    `raw_src` (None: the one token) to `raw_dst`; `raw_dst` None when there is nothing to keep."""
    dst: torch.Tensor
    src: torch.Tensor | None = None
    raw_dst: torch.Tensor | None = None
    raw_src: torch.Tensor | None = None


class SinkCache:
    def __init__(self, *, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 sinks: int, window: int, dtype: torch.dtype, device: torch.device | str,
                 owner_id: int, keep_raw_sinks: bool):
        self.sinks = check_int("sinks", sinks, 0)
        self.window = check_int("window", window, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.owner_id = owner_id  # the model that made this cache
        shape = (num_layers, batch_size, num_kv_heads, self.capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        # Un-rotated sink keys, so the sinks can be placed at any cache position exactly.
        self.raw_sink_k = (torch.zeros(shape[:3] + (self.sinks, head_dim), dtype=dtype, device=device)
                           if keep_raw_sinks and self.sinks else None)
        self.tokens_seen = 0
        # Index tensors for whole-buffer writes (see put_token), made once.
        self._layer_ids = torch.arange(num_layers, device=device).split(1)
        self._sink_ids = torch.arange(self.sinks, device=device)

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def __len__(self) -> int:
        """Number of keys held (at most S)."""
        return min(self.tokens_seen, self.capacity)

    def __repr__(self) -> str:
        return (f"SinkCache(sinks={self.sinks}, window={self.window}, batch_size={self.batch_size}, "
                f"tokens_seen={self.tokens_seen}, dtype={self.dtype}, device={self.device})")

    def reset(self) -> None:
        """Start a new stream. The buffers are kept (and zeroed), never reallocated."""
        self.tokens_seen = 0
        self.k.zero_()
        self.v.zero_()
        if self.raw_sink_k is not None:
            self.raw_sink_k.zero_()

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, raw_k: torch.Tensor, w: CacheWrite) -> None:
        """Persist one forward's keys at `layer`: k (rotated) and v, and raw_k (un-rotated) for sinks.

        k, v, raw_k (B, KV, n, hd). The only place a forward writes the cache; `advance` follows."""
        if w.src is None:  # one token: in place, also under torch.compile
            if w.raw_dst is not None:
                self.put_token(self.raw_sink_k, layer, w.raw_dst, raw_k)
            self.put_token(self.k, layer, w.dst, k)
            self.put_token(self.v, layer, w.dst, v)
            return
        self.k[layer].index_copy_(2, w.dst, k[:, :, w.src])  # into the fixed buffers
        self.v[layer].index_copy_(2, w.dst, v[:, :, w.src])
        if w.raw_dst is not None:
            self.raw_sink_k[layer].index_copy_(2, w.raw_dst, raw_k[:, :, w.raw_src])

    def advance(self, n: int) -> None:
        """n more tokens have been written at every layer: the one place tokens_seen moves."""
        self.tokens_seen += n

    def put_token(self, buf: torch.Tensor, layer: int, slot: torch.Tensor, x: torch.Tensor) -> None:
        """buf[layer][:, :, slot] = x, for one token's x (B, KV, 1, hd); buf is k, v or raw_sink_k."""
        if torch.compiler.is_compiling():
            # A write through the view buf[layer] is functionalised into a copy of the whole buffer
            # every step; an index_put_ on the buffer itself is kept in place by inductor.
            buf[self._layer_ids[layer], :, :, slot] = x.movedim(2, 0)
        else:
            buf[layer].index_copy_(2, slot, x)  # eager: the cheapest call

    def put_sinks(self, keys: torch.Tensor) -> None:
        """k[:, :, :, :sinks] = keys (layers, B, KV, sinks, hd), in place when compiled too."""
        self.k[:, :, :, self._sink_ids] = keys

    def slot_of(self, positions: int | torch.Tensor) -> int | torch.Tensor:
        """The slot that stream position(s) j are written to (a Python int for an int: decode)."""
        return slot_of(positions, self.sinks, self.window)

    def slot_positions(self, tokens_seen: int | None = None, device=None) -> torch.Tensor:
        """(S,) int64: the stream position held by each slot after `tokens_seen` tokens, -1 if empty."""
        t = self.tokens_seen if tokens_seen is None else tokens_seen
        return slot_positions(t, self.sinks, self.window, device=device or self.device)[0]
