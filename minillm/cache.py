"""SinkCache: the fixed-shape sink + window KV cache of StreamingLLM.

Capacity S = sinks + window counts every key a token attends to, itself included (DESIGN.md §1).
Per layer the buffers are (B, n_kv_heads, S, head_dim), allocated once:

    slot:   0 .. sinks-1           sinks .. S-1
            [ sink region        | ring buffer of the most recent `window` tokens ]

Token j goes to slot j while j < sinks, and to ring slot sinks + (j - sinks) % window after that,
overwriting the token that leaves the window. Eviction is that one overwrite: O(1), and nothing is
ever reallocated, concatenated or grown. Which token sits in which slot is a pure function of
`tokens_seen`, so the only bookkeeping is that one integer.

Keys are stored RoPE-rotated at their stream position. For a window key j and query t the
distance t - j is then exactly the cache-relative one; only the sinks need another position, so
their un-rotated keys are also kept (`raw_sink_k`) and rotated into the query's frame on demand.
"""

from __future__ import annotations

import torch

from .errors import MiniLLMError


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MiniLLMError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class SinkCache:
    def __init__(self, *, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 sinks: int, window: int, dtype: torch.dtype, device: torch.device | str,
                 owner_id: int, keep_raw_sinks: bool):
        self.sinks = _check_int("sinks", sinks, 0)
        self.window = _check_int("window", window, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
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
        ring = self.sinks + (positions - self.sinks) % self.window  # floor mod, ints and tensors alike
        if isinstance(positions, int):
            return positions if positions < self.sinks else ring
        return torch.where(positions < self.sinks, positions, ring)

    def slot_positions(self, tokens_seen: int | None = None, device=None) -> torch.Tensor:
        """(S,) int64: the stream position held by each slot after `tokens_seen` tokens, -1 if empty."""
        t = self.tokens_seen if tokens_seen is None else tokens_seen
        slots = torch.arange(self.capacity, device=device or self.device)
        sink_pos = torch.where(slots < t, slots, -1)
        # Ring slot r = sinks + k holds the latest j = sinks + k + m*window with j < t.
        k = slots - self.sinks
        filled = t - self.sinks  # tokens that ever went to the ring
        latest = self.sinks + k + self.window * torch.div(filled - 1 - k, self.window, rounding_mode="floor")
        ring_pos = torch.where(k < filled, latest, -1)
        return torch.where(slots < self.sinks, sink_pos, ring_pos)
