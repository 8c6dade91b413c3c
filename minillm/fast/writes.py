"""Cache writes for the fast paths: the same slots the core writes, by the cheapest call, also
inside a compiled step (where a write must stay in place and keep one graph).

Rows fed different tokens write the core's own form (a CacheWrite, through `SinkCache.write`).
A `FastWrite` is one of two forms the core does not need: every row writing the same columns to the
same slots (index_copy_), and one token per row (`src` None), where a row left out (`keep` False)
gets its old value back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.cache import CacheWrite, SinkCache


@dataclass
class FastWrite:
    dst: torch.Tensor  # slots: (columns,) for every row alike, or (B,) / (1,) for one token per row
    src: torch.Tensor | None = None  # chunk columns; None: one token per row
    raw_dst: torch.Tensor | None = None  # the sinks' un-rotated keys: raw slots ...
    raw_src: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # one token per row: (B,) bool, None: every row
    raw_keep: torch.Tensor | None = None
    every_row: bool = False  # eager shortcuts (a compiled step keeps its fixed graph):
    raw_any: bool = True  # keep is all True / some raw_keep is True


def write(cache: SinkCache, layer: int, k, v, raw_k, w: FastWrite | CacheWrite) -> None:
    """k (rotated), v and raw_k (B, KV, n, hd) into the cache's buffers at `layer`, as `w` says."""
    if isinstance(w, CacheWrite):  # rows fed differently: the core's (row, column, slot) triples
        cache.write(layer, k, v, raw_k, w)
    elif w.src is None:  # one token per row: in place, also under torch.compile
        put = put_token if w.dst.shape[0] == 1 and w.keep is None else put_rows
        eager = not torch.compiler.is_compiling()
        keep = None if eager and w.every_row else w.keep
        if w.raw_dst is not None and not (eager and not w.raw_any):
            put(cache.raw_sink_k, layer, w.raw_dst, raw_k, w.raw_keep)
        put(cache.k, layer, w.dst, k, keep)
        put(cache.v, layer, w.dst, v, keep)
    else:  # every row writes the same columns to the same slots
        cache.k[layer].index_copy_(2, w.dst, k[:, :, w.src])
        cache.v[layer].index_copy_(2, w.dst, v[:, :, w.src])
        if w.raw_dst is not None:
            cache.raw_sink_k[layer].index_copy_(2, w.raw_dst, raw_k[:, :, w.raw_src])


def _ids(n: int, device, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)


def put_token(buf: torch.Tensor, layer: int, slot: torch.Tensor, x: torch.Tensor, keep=None) -> None:
    """buf[layer][:, :, slot] = x, for one token's x (B, KV, 1, hd)."""
    if torch.compiler.is_compiling():
        # A write through the view buf[layer] is functionalised into a copy of the whole buffer
        # every step; an index_put_ on the buffer itself is kept in place by inductor.
        buf[_ids(1, buf.device, layer), :, :, slot] = x.movedim(2, 0)
    else:
        buf[layer].index_copy_(2, slot, x)


def put_rows(buf: torch.Tensor, layer: int, slot: torch.Tensor, x: torch.Tensor, keep) -> None:
    """buf[layer][b, :, slot[b]] = x[b] for every row b where keep[b] (None: all), x (B, KV, 1, hd).

    Fixed shapes whatever the rows do: a row not kept gets its old value back, bit for bit."""
    if torch.compiler.is_compiling():
        x, rows = x[:, :, 0], _ids(x.shape[0], buf.device)
        if keep is not None:
            x = torch.where(keep[:, None, None], x, buf[layer][rows, :, slot])
        buf[_ids(1, buf.device, layer), rows, :, slot] = x  # on the buffer itself: in place
        return
    idx = slot.view(-1, 1, 1, 1).expand(x.shape)  # eager: gather / scatter_ along the slots
    if keep is not None:
        x = torch.where(keep.view(-1, 1, 1, 1), x, buf[layer].gather(2, idx))
    buf[layer].scatter_(2, idx, x)


def put_sinks(cache: SinkCache, keys: torch.Tensor, keep: torch.Tensor | None = None) -> None:
    """k[:, :, :, :sinks] = keys (layers, B, KV, sinks, hd), in place when compiled too; only rows
    where keep (B,) bool (None: all; the others keep their keys bit for bit)."""
    if not torch.compiler.is_compiling():  # eager: through a view of the sink slots
        view = cache.k[:, :, :, : cache.sinks]
        view.copy_(keys if keep is None else torch.where(keep[None, :, None, None, None], keys, view))
        return
    ids = _ids(cache.sinks, cache.k.device)
    if keep is not None:
        keys = torch.where(keep[None, :, None, None, None], keys, cache.k[:, :, :, ids])
    cache.k[:, :, :, ids] = keys
