"""SinkCache: the fixed-shape sink + window KV cache of StreamingLLM.

Capacity S = sinks + window counts every key a token attends to, itself included. Per layer the
buffers are (B, n_kv_heads, S, head_dim), allocated once:

    slot:   0 .. sinks-1           sinks .. S-1
            [ sink region        | ring buffer of the most recent `window` tokens ]

Token j goes to slot `contract.slot_of(j)`, overwriting the token that leaves the window: eviction
is that one overwrite; nothing is reallocated or grown. Which token holds which slot is a pure
function of a row's count, so the only bookkeeping is `tokens_seen`, one count per row (each row is
its own stream), which moves in one place, `advance`.

Keys are stored RoPE-rotated at their stream position: a window key's distance to any later query
is then already the cache-relative one. Only the sinks sit elsewhere, so their un-rotated keys are
kept too (`raw_sink_k`) and rotated to position i when scored (attention.py).

A cache records its position convention (`positions`, contract.POSITIONS), fixed when it is made:
"cache" (the paper's, above) or "absolute", where every key keeps its text position and the query
sits at t. Under "absolute" the stored keys are already right, sinks included, so no raw sink keys
are kept. A stream is only ever continued in the convention it began in: export/import and
save/load carry it and refuse a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int, parse_device, parse_dtype
from ..errors import MiniLLMError
from ..limits import check_fits
from .contract import check_positions


MAX_SEEN = 2**63 - 1  # a row's count is an int64: a stream ends there (a forward that would pass it is refused)


@dataclass
class CacheWrite:
    """Where one forward's new keys go: chunk column src[p] of row rows[p] to slot dst[p] of that
    row; the sinks' un-rotated keys likewise, to raw slot i (raw_* None: no sink in this call)."""
    rows: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    raw_rows: torch.Tensor | None = None
    raw_src: torch.Tensor | None = None
    raw_dst: torch.Tensor | None = None


@dataclass(frozen=True)
class RowState:
    """One row's stream, out of its cache (`SinkCache.export_row`): its keys, values and count."""
    k: torch.Tensor  # (layers, KV, S, hd)
    v: torch.Tensor
    raw_sink_k: torch.Tensor | None  # (layers, KV, sinks, hd)
    tokens_seen: int
    sinks: int
    window: int
    owner_id: int  # the uid of the model that made it (in this process)
    fingerprint: str | None = None  # that model's fingerprint (minillm/identity.py), once known
    world_size: int = 1  # the ranks its model is split over (tensor parallelism, minillm/parallel/)
    positions: str = "cache"  # the position convention the stream was computed in


class SinkCache:
    world_size = 1  # a tensor-parallel shard's cache holds its rank's KV heads (minillm/parallel/)

    def __init__(self, *, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int,
                 sinks: int, window: int, dtype: torch.dtype, device: torch.device | str,
                 owner_id: int, keep_raw_sinks: bool, positions: str = "cache"):
        self.positions = check_positions(positions)
        self.sinks = check_int("sinks", sinks, 0)
        self.window = check_int("window", window, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            check_int(name, value, 1)
        dtype, device = parse_dtype(dtype), parse_device(device)
        self.owner_id = owner_id  # the model that made this cache
        shape = (num_layers, batch_size, num_kv_heads, self.capacity, head_dim)
        check_fits(dtype.itemsize * num_layers * batch_size * num_kv_heads * head_dim * (2 * self.capacity + self.sinks),
                   device, f"a SinkCache of {batch_size} x {self.capacity} keys")
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.raw_sink_k = (torch.zeros(shape[:3] + (self.sinks, head_dim), dtype=dtype, device=device)
                           if keep_raw_sinks and self.sinks and self.positions == "cache" else None)
        self._seen = torch.zeros(batch_size, dtype=torch.int64)  # per row, on the CPU: plans read it

    @property
    def tokens_seen(self) -> torch.Tensor:
        """(B,) int64 CPU tensor: the tokens each row's stream has consumed (a copy: changing it
        changes nothing until it is assigned back, which checks it)."""
        return self._seen.clone()

    @tokens_seen.setter
    def tokens_seen(self, value) -> None:
        """Set every row's count (an int), or each row's ((B,) integers); the buffers are not changed."""
        if isinstance(value, torch.Tensor):
            if (value.shape != self._seen.shape or value.dtype.is_floating_point or value.dtype.is_complex
                    or value.dtype == torch.bool):
                raise MiniLLMError(f"tokens_seen must be an int or a ({self.batch_size},) integer tensor, got a "
                                   f"{tuple(value.shape)} {value.dtype} tensor")
            if any(not 0 <= n <= MAX_SEEN for n in value.tolist()):
                raise MiniLLMError(f"tokens_seen must be in [0, 2^63-1] in every row, got {value.tolist()}")
            self._seen.copy_(value)
        else:
            self._seen.fill_(check_int("tokens_seen", value, 0, MAX_SEEN))

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

    def __bool__(self) -> bool:  # a cache is a cache, empty or not: `cache or model.new_cache()` keeps it
        return True

    def __repr__(self) -> str:
        seen = self._seen.tolist()
        return (f"SinkCache(sinks={self.sinks}, window={self.window}, batch_size={self.batch_size}, "
                f"tokens_seen={seen[0] if len(seen) == 1 else seen}, positions={self.positions!r}, "
                f"dtype={self.dtype}, device={self.device})")

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

    def _buffers(self):
        return [b for b in (self.k, self.v, self.raw_sink_k) if b is not None]

    def reset(self, rows=None) -> None:
        """Start new streams in `rows` (an int or a list; None: every row). The buffers are kept
        (the rows zeroed), never reallocated; other rows are not touched."""
        for b in (slice(None),) if rows is None else self.rows(rows):
            self._seen[b] = 0
            for buf in self._buffers():
                buf[:, b].zero_()

    def export_row(self, row: int) -> RowState:
        """A copy of row `row`'s stream: import it into a row of any cache of the same shape from
        the same model, and the stream continues there exactly as if it had never left."""
        (b,) = self.rows(row, "export_row")
        raw = None if self.raw_sink_k is None else self.raw_sink_k[:, b].clone()
        return RowState(k=self.k[:, b].clone(), v=self.v[:, b].clone(), raw_sink_k=raw,
                        tokens_seen=int(self._seen[b]), sinks=self.sinks, window=self.window,
                        owner_id=self.owner_id, world_size=self.world_size, positions=self.positions)

    def import_row(self, row: int, state: RowState) -> None:
        """Put an exported stream into row `row` (in place: the buffers are not reallocated)."""
        (b,) = self.rows(row, "import_row")
        if not isinstance(state, RowState):
            raise MiniLLMError(f"import_row: state must be a RowState from cache.export_row(), got "
                               f"{type(state).__name__}")
        if state.world_size != self.world_size:
            raise MiniLLMError(f"import_row: the state comes from a model split over {state.world_size} rank(s), "
                               f"this cache's model over {self.world_size}")
        if state.owner_id != self.owner_id and not self._same_owner(state):
            raise MiniLLMError("import_row: the state comes from a cache of a different model (other weights "
                               "or config)")
        check_int("import_row: the state's tokens_seen", state.tokens_seen, 0, MAX_SEEN)  # not 2.7, -1 or 2^64
        if (state.sinks, state.window) != (self.sinks, self.window):
            raise MiniLLMError(f"import_row: the state is from a cache of sinks {state.sinks} + window "
                               f"{state.window}, this one is {self.sinks} + {self.window}")
        if state.positions != self.positions:
            raise MiniLLMError(f"import_row: the state was computed with {state.positions!r} positions, this cache "
                               f"uses {self.positions!r}")
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

    def _same_owner(self, state: RowState) -> bool:
        """Whether `state` comes from a model with the fingerprint of this cache's (a twin)."""
        from ..identity import of_owner

        mine = of_owner(self.owner_id)
        return mine is not None and mine == (state.fingerprint or of_owner(state.owner_id))

    def save(self, path, rows=None) -> None:
        """Write the streams of `rows` (None: every row) to `path`: one safetensors file, with
        their counts, shape and the model's fingerprint as JSON in its header; written atomically,
        read back with no pickle by `SinkCache.load` (minillm/apps/state.py)."""
        from ..apps.state import save_cache

        save_cache(self, path, rows)

    @staticmethod
    def load(path, model) -> SinkCache:
        """A new cache of `model` holding the streams `SinkCache.save` wrote, refused unless they
        were saved from a model with the same config and weights."""
        from ..apps.state import load_cache

        return load_cache(path, model)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, raw_k: torch.Tensor, w: CacheWrite) -> None:
        """Persist one forward's keys at `layer`: k (rotated), v and raw_k (un-rotated), each
        (B, KV, n, hd), as `w` says. The only place a forward writes the cache; `advance` follows."""
        self.k[layer][w.rows, :, w.dst] = k[w.rows, :, w.src]  # (pairs, KV, hd), in place
        self.v[layer][w.rows, :, w.dst] = v[w.rows, :, w.src]
        if w.raw_dst is not None and self.raw_sink_k is not None:
            self.raw_sink_k[layer][w.raw_rows, :, w.raw_dst] = raw_k[w.raw_rows, :, w.raw_src]

    def advance(self, n: int | torch.Tensor) -> None:
        """n more tokens (an int for every row, or (B,) per row) have been written at every layer."""
        self._seen += n
