"""One attention for every call: dense, a streamed chunk of any length, and a decode step (n = 1).

`plan` turns the contract (contract.key_positions) into what every layer of one forward shares: the
queries' RoPE tables, an additive mask that is -inf outside each query's key set K_t (plus the
ALiBi bias at the cache-relative positions), and where the chunk's keys go in the cache. `attend`
then scores the query against [the cache's S slots as they were, the chunk's own n keys].

RoPE and cache-relative positions. A score under RoPE depends only on the difference of the two
positions. Keys are stored rotated at their stream position j and queries are rotated at t, so a
window key's distance t - j is already the contract's c_t - (c_t - (t - j)). Only a sink sits
elsewhere (at i, with the query at c_t), so its columns are scored again with those two rotations:
the query rotated at c_t against the sink's un-rotated key rotated at i ("the sink correction").
Under the "absolute" convention (cache.positions) c_t = t: every stored key is already at its text
position, the sinks too, so there is no correction; ALiBi takes the contract's positions either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig
from .cache import CacheWrite, SinkCache
from .contract import KeyPositions, key_positions, slot_of
from .positions import alibi_bias, rope_rotate, rope_tables


@dataclass(frozen=True)
class Spec:
    """What every forward of one model on one device shares."""
    config: ModelConfig
    inv_freq: torch.Tensor | None  # RoPE inverse frequencies (float64), or None
    slopes: torch.Tensor | None  # ALiBi slopes, or None
    dtype: torch.dtype
    device: torch.device


@dataclass
class Plan:
    """One forward's attention, shared by every layer."""
    spec: Spec
    rot: tuple | None  # RoPE (cos, signed sin) of the queries and new keys at their stream positions t
    mask: torch.Tensor  # additive (B|1, 1|H, n, Nk): 0 inside K_t, -inf outside, plus ALiBi
    slots: bool  # the key columns begin with the cache's S slots
    write: CacheWrite | None  # None: no cache
    sink_cols: torch.Tensor | None = None  # RoPE with a cache: the columns that can hold a sink ...
    sink_is: torch.Tensor | None = None  # ... (B, C) which of them hold one in each row
    sink_rot: tuple | None = None  # (cos, sin) of those columns at position i
    query_rot: tuple | None = None  # (cos, sin) of the queries at c_t
    n_cached: int = 0  # the first n_cached sink columns are slots (raw keys from the cache)

    def prepare(self, cache: SinkCache | None) -> None:
        """Called once before the layers (a fast plan may move keys here); nothing to do."""

    def attend(self, layer: int, qkv: torch.Tensor, cache: SinkCache | None, probs_out=None) -> torch.Tensor:
        """qkv (B, n, (H + 2 KV) hd) as projected -> attention output (B, n, H hd)."""
        out = attention(self, *heads(self.spec.config, qkv), cache, layer, probs_out)
        return out.transpose(1, 2).flatten(2)


def heads(c: ModelConfig, qkv: torch.Tensor):
    """qkv (B, n, (H + 2 KV) hd) -> q (B, H, n, hd), k and v (B, KV, n, hd)."""
    B, n, _ = qkv.shape
    H, KV, hd = c.num_heads, c.num_kv_heads, c.head_dim
    return (x.view(B, n, -1, hd).transpose(1, 2) for x in qkv.split([H * hd, KV * hd, KV * hd], dim=-1))


def additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A bool mask as an additive one: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def plan(spec: Spec, n: int, cache: SinkCache | None, lengths: torch.Tensor | None = None) -> Plan:
    """The plan of one forward of n tokens; with a cache, row b feeds its first lengths[b] (None: n)."""
    c = spec.config
    rope = c.positions == "rope"
    if cache is None:
        kp = key_positions(torch.zeros(1, dtype=torch.int64, device=spec.device), n, 0, None)
    else:
        kp = key_positions(cache.tokens_seen.to(spec.device), n, cache.sinks, cache.window,
                           positions=cache.positions)
    mask = additive(kp.allowed, spec.dtype)[:, None]  # (B, 1, n, Nk)
    if not rope:
        mask = mask + alibi_bias(c.alibi, spec.slopes, kp.query_position, kp.position, c.scale, spec.dtype)
    rot = rope_tables(kp.query, spec.inv_freq, spec.dtype) if rope else None
    p = Plan(spec, rot=None if rot is None else tuple(x[:, None] for x in rot), mask=mask,
             slots=cache is not None, write=None if cache is None else chunk_write(cache, n, lengths, rope, spec.device))
    if rope and cache is not None and cache.sinks and cache.positions == "cache":  # absolute: keys are right
        S, sinks = cache.capacity, cache.sinks
        cols = torch.cat([torch.arange(sinks), S + torch.arange(min(sinks, n))]).to(spec.device)
        p.sink_cols, p.sink_is, p.n_cached = cols, kp.is_sink(cols), sinks
        p.sink_rot = tuple(x[:, None] for x in rope_tables(kp.key[:, cols].clamp(min=0), spec.inv_freq, spec.dtype))
        p.query_rot = tuple(x[:, None] for x in rope_tables(kp.query_position, spec.inv_freq, spec.dtype))
    return p


def chunk_write(cache: SinkCache, n: int, lengths: torch.Tensor | None, rope: bool, device) -> CacheWrite:
    """Row b's tokens t = seen[b] .. seen[b] + lengths[b] - 1 go to their slots: the sinks, then only
    the last `window` (earlier ones would be overwritten within the same call)."""
    seen = cache.tokens_seen
    fed = torch.full_like(seen, n) if lengths is None else lengths
    col = torch.arange(n)
    t = seen[:, None] + col  # (B, n)
    real = col < fed[:, None]
    is_sink = real & (t < cache.sinks)
    keep = is_sink | (real & (t >= (seen + fed)[:, None] - cache.window))
    rows, src = keep.nonzero(as_tuple=True)
    dst = slot_of(t[rows, src], cache.sinks, cache.window)
    w = CacheWrite(rows=rows.to(device), src=src.to(device), dst=dst.to(device))
    if rope and cache.raw_sink_k is not None and bool(is_sink.any()):
        rows, src = is_sink.nonzero(as_tuple=True)
        w.raw_rows, w.raw_src, w.raw_dst = rows.to(device), src.to(device), t[rows, src].to(device)
    return w


def attention(p: Plan, q, k, v, cache: SinkCache | None, layer: int, probs_out: list | None = None):
    """q (B, H, n, hd), k/v (B, KV, n, hd) as projected -> (B, H, n, hd); then the chunk is written.

    Explicit scores, one softmax over every key column (SoftMax-off-by-one adds a zero-score key)."""
    c = p.spec.config
    B, H, n, hd = q.shape
    KV = k.shape[1]
    raw_q, raw_k = q, k
    if p.rot is not None:
        q, k = rope_rotate(q, *p.rot), rope_rotate(k, *p.rot)  # at stream positions t
    keys, values = k, v
    if p.slots:
        keys, values = torch.cat([cache.k[layer], k], dim=2), torch.cat([cache.v[layer], v], dim=2)

    def scores_of(queries, ks):  # (B, H, n, hd) x (B, KV, N, hd) -> (B, H, n, N): H / KV queries per key head
        return (queries.view(B, KV, H // KV, n, hd) @ ks[:, :, None].transpose(-1, -2)).view(B, H, n, -1) * c.scale

    scores = scores_of(q, keys)
    if p.sink_cols is not None:  # the sinks at i, the query at c_t
        raw = torch.cat([cache.raw_sink_k[layer], raw_k[:, :, : len(p.sink_cols) - p.n_cached]], dim=2)
        corrected = scores_of(rope_rotate(raw_q, *p.query_rot), rope_rotate(raw, *p.sink_rot))
        scores[..., p.sink_cols] = torch.where(p.sink_is[:, None, None, :], corrected, scores[..., p.sink_cols])
    acc = torch.promote_types(scores.dtype, torch.float32)  # softmax in float32 at least
    scores = scores.to(acc) + p.mask.to(acc)
    if c.zero_sink:  # softmax over [scores, 0]: an implicit key with zero score and zero value
        probs = torch.softmax(torch.cat([scores, scores.new_zeros(B, H, n, 1)], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if probs_out is not None:
        probs_out.append(probs.detach())
    out = probs.to(v.dtype).view(B, KV, H // KV, n, -1) @ values[:, :, None]
    if cache is not None:
        cache.write(layer, k, v, raw_k, p.write)
    return out.view(B, H, n, hd)
