"""SinkCache: the fixed-shape sink + window KV cache of StreamingLLM.

Capacity S = sinks + window counts every key a token attends to, itself included (the contract
and a worked example of the slots are in docs/streaming.md).
Per layer the buffers are (B, n_kv_heads, S, head_dim), allocated once:

    slot:   0 .. sinks-1           sinks .. S-1
            [ sink region        | ring buffer of the most recent `window` tokens ]

Token j goes to slot j while j < sinks, and to ring slot sinks + (j - sinks) % window after that,
overwriting the token that leaves the window. Eviction is that one overwrite: O(1), and nothing is
ever reallocated, concatenated or grown. Which token sits in which slot is a pure function of
`tokens_seen` (`slot_positions`), so the only bookkeeping is that count; it advances in one
place, `advance`, after a forward has written its keys with `write`.

Every row b of the batch is its own stream (docs/streaming.md, "Many streams"): `tokens_seen` is a
(B,) int64 CPU tensor, one count per row, and a forward may feed each row a different number of
tokens. Rows are reset (`reset(rows)`) and moved out and back (`export_row` / `import_row`) one at
a time, in place.

Keys are stored RoPE-rotated at their stream position. For a window key j and query t the
distance t - j is then exactly the cache-relative one; only the sinks need another position, so
their un-rotated keys are also kept (`raw_sink_k`) and rotated into the query's frame on demand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_int
from .errors import MiniLLMError


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
    `raw_src` (None: the one token) to `raw_dst`; `raw_dst` None when there is nothing to keep.

    Per-row writes (rows at different positions, or fed different numbers of tokens):
    - a chunk names the row of every (src, dst) pair in `row` (and `raw_row` for the raw pairs);
    - a decode step writes row b's token to slot `dst[b]` (B,), only where `keep[b]` (None: every
      row; a row that is fed nothing keeps its old value, bit for bit), and its raw key to raw
      slot `raw_dst[b]` where `raw_keep[b]`."""
    dst: torch.Tensor
    src: torch.Tensor | None = None
    raw_dst: torch.Tensor | None = None
    raw_src: torch.Tensor | None = None
    row: torch.Tensor | None = None
    raw_row: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    raw_keep: torch.Tensor | None = None
    # Eager shortcuts of a per-row step (a compiled step ignores them: its graph stays fixed):
    every_row: bool = False  # keep is all True: no old values to keep
    raw_any: bool = True  # some raw_keep is True: there are raw sink keys to write


@dataclass(frozen=True)
class RowState:
    """One row's stream, out of its cache (`SinkCache.export_row`): its keys, values and count."""
    k: torch.Tensor  # (layers, KV, S, hd)
    v: torch.Tensor
    raw_sink_k: torch.Tensor | None  # (layers, KV, sinks, hd)
    tokens_seen: int
    sinks: int
    window: int
    owner_id: int


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
        self._seen = torch.zeros(batch_size, dtype=torch.int64)  # per row; on the CPU, read by the plans
        # Index tensors for whole-buffer writes (see put_token), made once.
        self._layer_ids = torch.arange(num_layers, device=device).split(1)
        self._sink_ids = torch.arange(self.sinks, device=device)
        self._row_ids = torch.arange(batch_size, device=device)

    @property
    def tokens_seen(self) -> torch.Tensor:
        """(B,) int64 CPU tensor: how many tokens each row's stream has consumed (a copy: changing
        it changes nothing until it is assigned back, which checks it)."""
        return self._seen.clone()

    @tokens_seen.setter
    def tokens_seen(self, value) -> None:
        """Set every row's count (an int), or each row's ((B,) integers). Tests and benchmarks
        use it to start from a steady state; the keys in the buffers are not changed."""
        if isinstance(value, torch.Tensor):
            if (value.shape != self._seen.shape or value.dtype.is_floating_point or value.dtype.is_complex
                    or value.dtype == torch.bool):
                raise MiniLLMError(f"tokens_seen must be an int or a ({self.batch_size},) integer tensor, got a "
                                   f"{tuple(value.shape)} {value.dtype} tensor")
            if bool((value < 0).any()):
                raise MiniLLMError("tokens_seen must be >= 0 in every row")
            self._seen.copy_(value)
        else:
            self._seen.fill_(check_int("tokens_seen", value, 0))

    @property
    def capacity(self) -> int:
        return self.sinks + self.window

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def common_position(self) -> int | None:
        """Every row's tokens_seen when they are all equal (rows in lockstep), else None."""
        seen = self._seen.tolist()
        return seen[0] if seen.count(seen[0]) == len(seen) else None

    def keys_held(self) -> torch.Tensor:
        """(B,) int64: the number of keys each row holds (at most S)."""
        return self._seen.clamp(max=self.capacity)

    def __len__(self) -> int:
        """Number of keys held (at most S), when every row holds the same number."""
        held = self.keys_held()
        if bool((held != held[0]).any()):
            raise MiniLLMError(f"len(cache): the rows hold different numbers of keys ({held.tolist()}); "
                               f"use cache.keys_held()")
        return int(held[0])

    def __repr__(self) -> str:
        seen = self._seen.tolist()
        return (f"SinkCache(sinks={self.sinks}, window={self.window}, batch_size={self.batch_size}, "
                f"tokens_seen={seen[0] if len(seen) == 1 else seen}, dtype={self.dtype}, device={self.device})")

    def rows(self, rows, what: str = "reset") -> list[int]:
        """`rows` (an int, or a sequence or 1-D tensor of ints) as a checked list of row indices."""
        if isinstance(rows, torch.Tensor):
            if rows.dim() > 1 or rows.dtype.is_floating_point or rows.dtype == torch.bool:
                raise MiniLLMError(f"{what}: rows must be integer row indices, got a {tuple(rows.shape)} "
                                   f"{rows.dtype} tensor")
            rows = rows.tolist() if rows.dim() else [rows.item()]
        elif isinstance(rows, int) and not isinstance(rows, bool):
            rows = [rows]
        elif isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
            raise MiniLLMError(f"{what}: rows must be a row index or a list of them, got {rows!r}")
        return [check_int(f"{what}: row", r, 0, self.batch_size - 1,
                          hint=f" (the cache has {self.batch_size} rows)") for r in rows]

    def reset(self, rows=None) -> None:
        """Start new streams in `rows` (an int or a list; None: every row). The buffers are kept
        (the rows zeroed), never reallocated; other rows are not touched."""
        if rows is None:
            self._seen.zero_()
            self.k.zero_()
            self.v.zero_()
            if self.raw_sink_k is not None:
                self.raw_sink_k.zero_()
            return
        for b in self.rows(rows):
            self._seen[b] = 0
            self.k[:, b].zero_()
            self.v[:, b].zero_()
            if self.raw_sink_k is not None:
                self.raw_sink_k[:, b].zero_()

    def export_row(self, row: int) -> RowState:
        """A copy of row `row`'s stream: import it into a row of any cache of the same shape from
        the same model, and the stream continues there exactly as if it had never left."""
        (b,) = self.rows(row, "export_row")
        raw = None if self.raw_sink_k is None else self.raw_sink_k[:, b].clone()
        return RowState(k=self.k[:, b].clone(), v=self.v[:, b].clone(), raw_sink_k=raw,
                        tokens_seen=int(self._seen[b]), sinks=self.sinks, window=self.window,
                        owner_id=self.owner_id)

    def import_row(self, row: int, state: RowState) -> None:
        """Put an exported stream into row `row` (in place: the buffers are not reallocated)."""
        (b,) = self.rows(row, "import_row")
        if not isinstance(state, RowState):
            raise MiniLLMError(f"import_row: state must be a RowState from cache.export_row(), got "
                               f"{type(state).__name__}")
        if state.owner_id != self.owner_id:
            raise MiniLLMError("import_row: the state comes from a cache of a different model")
        if (state.sinks, state.window) != (self.sinks, self.window):
            raise MiniLLMError(f"import_row: the state is from a cache of sinks {state.sinks} + window "
                               f"{state.window}, this one is {self.sinks} + {self.window}")
        for name, got, buf in (("k", state.k, self.k), ("v", state.v, self.v),
                               ("raw_sink_k", state.raw_sink_k, self.raw_sink_k)):
            if (got is None) != (buf is None) or (buf is not None and (
                    got.shape != buf.shape[:1] + buf.shape[2:] or got.dtype != buf.dtype)):
                raise MiniLLMError(f"import_row: the state's {name} does not fit this cache (another dtype or "
                                   f"shape: {None if got is None else (tuple(got.shape), got.dtype)})")
        self.k[:, b].copy_(state.k)
        self.v[:, b].copy_(state.v)
        if self.raw_sink_k is not None:
            self.raw_sink_k[:, b].copy_(state.raw_sink_k)
        self._seen[b] = state.tokens_seen

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, raw_k: torch.Tensor, w: CacheWrite) -> None:
        """Persist one forward's keys at `layer`: k (rotated) and v, and raw_k (un-rotated) for sinks.

        k, v, raw_k (B, KV, n, hd). The only place a forward writes the cache; `advance` follows."""
        if w.src is None:  # one token per row: in place, also under torch.compile
            put = self.put_token if w.dst.shape[0] == 1 and w.keep is None else self.put_rows
            eager = not torch.compiler.is_compiling()
            keep = None if eager and w.every_row else w.keep
            if w.raw_dst is not None and not (eager and not w.raw_any):
                put(self.raw_sink_k, layer, w.raw_dst, raw_k, w.raw_keep)
            put(self.k, layer, w.dst, k, keep)
            put(self.v, layer, w.dst, v, keep)
            return
        if w.row is None:  # every row writes the same columns to the same slots
            self.k[layer].index_copy_(2, w.dst, k[:, :, w.src])  # into the fixed buffers
            self.v[layer].index_copy_(2, w.dst, v[:, :, w.src])
            if w.raw_dst is not None:
                self.raw_sink_k[layer].index_copy_(2, w.raw_dst, raw_k[:, :, w.raw_src])
            return
        self.k[layer][w.row, :, w.dst] = k[w.row, :, w.src]  # (pairs, KV, hd), in place
        self.v[layer][w.row, :, w.dst] = v[w.row, :, w.src]
        if w.raw_dst is not None:
            self.raw_sink_k[layer][w.raw_row, :, w.raw_dst] = raw_k[w.raw_row, :, w.raw_src]

    def advance(self, n: int | torch.Tensor) -> None:
        """n more tokens (an int for every row, or (B,) per row) have been written at every layer:
        the one place tokens_seen moves."""
        self._seen += n

    def put_token(self, buf: torch.Tensor, layer: int, slot: torch.Tensor, x: torch.Tensor, keep=None) -> None:
        """buf[layer][:, :, slot] = x, for one token's x (B, KV, 1, hd); buf is k, v or raw_sink_k."""
        if torch.compiler.is_compiling():
            # A write through the view buf[layer] is functionalised into a copy of the whole buffer
            # every step; an index_put_ on the buffer itself is kept in place by inductor.
            buf[self._layer_ids[layer], :, :, slot] = x.movedim(2, 0)
        else:
            buf[layer].index_copy_(2, slot, x)  # eager: the cheapest call

    def put_rows(self, buf: torch.Tensor, layer: int, slot: torch.Tensor, x: torch.Tensor,
                 keep: torch.Tensor | None) -> None:
        """buf[layer][b, :, slot[b]] = x[b] for every row b where keep[b] (None: all), x (B, KV, 1, hd).

        Fixed shapes whatever the rows do: a row not kept gets its old value back, bit for bit."""
        if torch.compiler.is_compiling():
            x, rows = x[:, :, 0], self._row_ids
            if keep is not None:
                x = torch.where(keep[:, None, None], x, buf[layer][rows, :, slot])
            buf[self._layer_ids[layer], rows, :, slot] = x  # on the buffer itself: in place (put_token)
            return
        idx = slot.view(-1, 1, 1, 1).expand(x.shape)  # eager: gather / scatter_ along the slots
        if keep is not None:
            x = torch.where(keep.view(-1, 1, 1, 1), x, buf[layer].gather(2, idx))
        buf[layer].scatter_(2, idx, x)

    def put_sinks(self, keys: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """k[:, :, :, :sinks] = keys (layers, B, KV, sinks, hd), in place when compiled too; only
        rows where keep (B,) bool (None: all; the others keep their keys bit for bit)."""
        if not torch.compiler.is_compiling():  # eager: through a view of the sink slots
            view = self.k[:, :, :, : self.sinks]
            view.copy_(keys if keep is None else torch.where(keep[None, :, None, None, None], keys, view))
            return
        if keep is not None:
            keys = torch.where(keep[None, :, None, None, None], keys, self.k[:, :, :, self._sink_ids])
        self.k[:, :, :, self._sink_ids] = keys

    def slot_of(self, positions: int | torch.Tensor) -> int | torch.Tensor:
        """The slot that stream position(s) j are written to (a Python int for an int: decode)."""
        return slot_of(positions, self.sinks, self.window)

    def slot_positions(self, tokens_seen: int | None = None, device=None, row: int = 0) -> torch.Tensor:
        """(S,) int64: the stream position held by each slot after `tokens_seen` tokens (default:
        row `row`'s count), -1 if empty."""
        t = int(self._seen[row]) if tokens_seen is None else tokens_seen
        return slot_positions(t, self.sinks, self.window, device=device or self.device)[0]
