"""Dense forwards and streamed chunks through SDPA kernels: the core's attention, faster.

The core scores every key column explicitly. Here:
- with nothing evicted and an empty cache (RoPE), every key set is {0..t}: plain causal SDPA,
  which skips the masked blocks;
- otherwise one SDPA call under the core's mask, over [the cache's S slots, the chunk's n keys];
- when some query sees the sinks at a position other than the text's (RoPE, a stream past S), the
  sink correction, by one of two kernels:
  * "split" (CPU): flash attention over every column but the sinks, with its log-sum-exp, and the
    few sink columns scored explicitly (queries at c_t, sinks at i), merged by log-sum-exp;
  * "doubled": one SDPA call on a doubled head dimension: queries [q at t, q at c_t], window keys
    [k, 0], sink keys [0, sink at i], so every score is the one product it must be.
Both are held equal to the core by tests/test_fast.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.attention import Spec, additive, chunk_write, heads
from ..core.cache import CacheWrite, SinkCache
from ..core.contract import KeyPositions, key_positions, slot_of
from ..core.positions import alibi_bias, rope_rotate, rope_tables
from .writes import FastWrite, write

# CPU flash attention that also returns each query's log-sum-exp of scores (torch's own SDPA
# kernel on CPU, which takes grouped K/V heads as they are); None where this torch lacks it.
SPLIT_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
KERNELS = ("auto", "split", "doubled")


@dataclass
class SinkFrame:
    """The sink correction of a chunk: sink columns scored with the query at c_t, the sinks at i.

    `cols` are the key columns that can hold a sink: the cache's sink slots (the first `n_cached`,
    whose raw keys are rotated at i by `cached_rot`), then chunk columns. When the rows differ,
    `is_sink` (B, len(cols)) says which of them hold a sink in each row; None: all, in every row."""
    q_rot: tuple  # RoPE for the queries at their cache positions c_t
    cols: torch.Tensor
    n_cached: int
    cached_rot: tuple
    is_sink: torch.Tensor | None = None
    # The split kernel's masks, shared by every layer (None: the doubled kernel).
    window_mask: torch.Tensor | None = None  # (B|1, 1, n, Nk): the plan's mask without the sink columns
    sink_mask: torch.Tensor | None = None  # (B|1, 1, n, len(cols)): the sink columns' part of it
    has_window: torch.Tensor | None = None  # (B|1, 1, n, 1) bool: the query sees a key that is not a sink


@dataclass
class ChunkPlan:
    spec: Spec
    rot: tuple | None  # RoPE for queries and new keys at their stream positions
    mask: torch.Tensor | None  # additive (B|1, 1|H, n, Nk); None: plain causal
    use_cache_cols: bool  # keys are [the cache's S slots, the chunk's n]; else the chunk's own
    sink: SinkFrame | None = None
    write: FastWrite | CacheWrite | None = None  # None: no cache (dense)

    def prepare(self, cache) -> None:
        pass

    def attend(self, layer: int, qkv: torch.Tensor, cache: SinkCache | None, probs_out=None) -> torch.Tensor:
        c = self.spec.config
        q, k, v = heads(c, qkv)
        raw_q, raw_k = q, k
        if self.rot is not None:
            q, k = rope_rotate(q, *self.rot), rope_rotate(k, *self.rot)
        keys, values = k, v
        if self.use_cache_cols:
            keys, values = torch.cat([cache.k[layer], k], dim=2), torch.cat([cache.v[layer], v], dim=2)
        s = self.sink
        if s is not None and s.window_mask is not None:
            out = _split(c, q, keys, values, raw_q, s, cache, layer)
        elif s is not None:
            out = _doubled(c, q, keys, values, raw_q, self.mask, s, cache, layer)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, is_causal=self.mask is None,
                                                 scale=c.scale, enable_gqa=True)
        if self.write is not None:
            write(cache, layer, k, v, raw_k, self.write)
        return out.transpose(1, 2).flatten(2)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A bool (B, n, Nk) key-set mask as an additive (B, 1, n, Nk) float mask (4-D: CPU SDPA's
    fast kernel wants 4-D)."""
    return additive(allowed, dtype)[:, None]


def _alibi(spec: Spec, kp: KeyPositions) -> torch.Tensor:
    c = spec.config
    return alibi_bias(c.alibi, spec.slopes, kp.query_position, kp.position, c.scale, spec.dtype)


def plan_dense(spec: Spec, n: int) -> ChunkPlan:
    """No cache: K_t = {0..t} at absolute positions."""
    rope = spec.config.positions == "rope"
    rot = rope_tables(torch.arange(n, device=spec.device), spec.inv_freq, spec.dtype) if rope else None
    if rope:
        return ChunkPlan(spec, rot=rot, mask=None, use_cache_cols=False)  # SDPA skips the masked blocks
    kp = key_positions(torch.zeros(1, dtype=torch.int64, device=spec.device), n, 0, None)
    return ChunkPlan(spec, rot=None, mask=_additive(kp.allowed, spec.dtype) + _alibi(spec, kp), use_cache_cols=False)


def plan_chunk(spec: Spec, n: int, cache: SinkCache, lengths: torch.Tensor | None = None,
               kernel: str = "auto") -> ChunkPlan:
    """n tokens through the cache: keys are [the cache's S slots as they were, the chunk's own].

    Row b feeds the first lengths[b] tokens (None: all n) after its own tokens_seen[b]. When every
    row is at the same position, the positions, mask and sink frame are made once and broadcast."""
    rope = spec.config.positions == "rope"
    device, dtype = spec.device, spec.dtype
    sinks, window, S = cache.sinks, cache.window, cache.capacity
    seen = cache.tokens_seen  # (B,), on the CPU
    t0 = cache.common_position()  # every row's position when they are all at one, else None
    uniform = t0 is not None
    t0max = t0 if uniform else int(seen.max())
    fed = torch.full_like(seen, n) if lengths is None else lengths
    lastmax = t0 + n - 1 if uniform and lengths is None else int((seen + fed).max()) - 1  # the furthest position fed
    if uniform:
        t = torch.arange(t0, t0 + n, device=device)  # (n,) stream positions of the queries
        rot = rope_tables(t, spec.inv_freq, dtype) if rope else None
    else:
        t = (seen[:, None] + torch.arange(n)).to(device)  # (B, n)
        rot = tuple(x[:, None] for x in rope_tables(t, spec.inv_freq, dtype)) if rope else None
    w = _uniform_write(cache, t0, n, rope, device) if uniform and lengths is None else \
        chunk_write(cache, n, lengths, rope, device)
    p = ChunkPlan(spec, rot=rot, mask=None, use_cache_cols=t0max > 0, write=w)
    if rope and t0max == 0 and lastmax < S:
        return p  # nothing evicted yet: every key set is {0..t}, plain causal (tests/test_keys.py)

    kp = key_positions((seen[:1] if uniform else seen).to(device), n, sinks, window, slots=t0max > 0,
                       positions=cache.positions)
    mask = _additive(kp.allowed, dtype)  # (B|1, 1, n, Nk)
    if rope and sinks and lastmax >= S and cache.positions == "cache":  # some query sees the sinks elsewhere
        p.sink = _sink_frame(spec, kp, t0, n, S, p.use_cache_cols)
        split = kernel == "split" or (kernel == "auto" and device.type == "cpu")
        if split and SPLIT_SDPA is not None:
            _split_masks(p.sink, mask)
    p.mask = mask if rope else mask + _alibi(spec, kp)  # (B|1, 1|H, n, Nk)
    return p


def _uniform_write(cache: SinkCache, t0: int, n: int, rope: bool, device) -> FastWrite:
    """Every row's tokens t0 .. t0 + n - 1 go to the same slots: the sinks, then only the last
    `window` (as core.attention.chunk_write, once for all rows); sinks also keep their raw key."""
    sinks, window = cache.sinks, cache.window
    idx = torch.arange(n)
    t = t0 + idx
    is_sink = t < sinks
    keep = is_sink | (t > t0 + n - 1 - window)
    w = FastWrite(dst=slot_of(t[keep], sinks, window).to(device), src=idx[keep].to(device))
    if rope and cache.raw_sink_k is not None and bool(is_sink.any()):
        w.raw_src, w.raw_dst = idx[is_sink].to(device), t[is_sink].to(device)
    return w


def _sink_frame(spec: Spec, kp: KeyPositions, t0: int | None, n: int, S: int, use_cache_cols: bool) -> SinkFrame:
    """Which key columns hold sinks, and the rotations that score them at the sinks' positions i.

    t0: every row's tokens_seen when they are all equal (the columns are then exact and shared),
    None when the rows differ (every column that can hold a sink is a candidate; `is_sink` says
    which do, per row)."""
    sinks, device = kp.sinks, kp.key.device
    q_rot = tuple(x[:, None] for x in rope_tables(kp.query_position, spec.inv_freq, spec.dtype))
    if t0 is not None:
        key = kp.key[0]
        n_cached = min(t0, sinks)  # the cache's sink slots 0..n_cached-1 hold sinks 0..n_cached-1
        cols = torch.nonzero((key >= 0) & (key < sinks)).flatten()
        is_sink = None
    else:
        n_cached = sinks if use_cache_cols else 0  # every sink slot, then the chunk's first columns
        first = S if use_cache_cols else 0
        cols = torch.cat([torch.arange(n_cached), first + torch.arange(min(sinks, n))]).to(device)
        is_sink = kp.is_sink(cols)
    return SinkFrame(q_rot=q_rot, cols=cols, n_cached=n_cached, is_sink=is_sink,
                     cached_rot=rope_tables(torch.arange(n_cached, device=device), spec.inv_freq, spec.dtype))


def _split_masks(sink: SinkFrame, mask: torch.Tensor) -> None:
    """The plan's mask split into the window part (sink columns masked out) and the sink part."""
    cols = sink.cols
    at_cols = mask[..., cols]
    if sink.is_sink is None:  # every candidate column holds a sink, in every row
        sink.sink_mask = at_cols
        sink.window_mask = mask.index_fill(-1, cols, float("-inf"))
    else:
        is_sink = sink.is_sink[:, None, None, :]  # (B, 1, 1, C)
        sink.sink_mask = at_cols.masked_fill(~is_sink, float("-inf"))
        sink.window_mask = mask.index_copy(-1, cols, at_cols.masked_fill(is_sink, float("-inf")))
    sink.has_window = (sink.window_mask > float("-inf")).any(-1, keepdim=True)


def _sink_keys(sink: SinkFrame, keys, cache, layer) -> torch.Tensor:
    """The sink columns' keys rotated at their cache positions i (B, KV, len(sink.cols), hd)."""
    sink_keys = keys[:, :, sink.cols]
    if sink.n_cached:  # the cache's sink slots may hold another frame: rotate the raw keys
        from_cache = rope_rotate(cache.raw_sink_k[layer][:, :, : sink.n_cached], *sink.cached_rot)
        sink_keys = torch.cat([from_cache, sink_keys[:, :, sink.n_cached:]], dim=2)
    return sink_keys


def _split(c, q, keys, values, raw_q, sink: SinkFrame, cache, layer) -> torch.Tensor:
    """The sink correction as two attentions merged by their log-sum-exps: a softmax over the
    union is the two softmaxes weighted by exp(lse_part - lse_all)."""
    B, H, n, hd = q.shape
    KV = keys.shape[1]
    g = H // KV
    out_w, lse_w = SPLIT_SDPA(q, keys, values, attn_mask=sink.window_mask, scale=c.scale)[:2]
    acc = lse_w.dtype  # float32 at least
    lse_w = lse_w[..., None].masked_fill(~sink.has_window, float("-inf"))  # a query with only sinks
    qrel = rope_rotate(raw_q, *sink.q_rot).view(B, KV, g, n, hd)
    sink_keys = _sink_keys(sink, keys, cache, layer)[:, :, None]  # (B, KV, 1, C, hd)
    scores = (qrel @ sink_keys.transpose(-1, -2)).view(B, H, n, -1).to(acc) * c.scale + sink.sink_mask.to(acc)
    lse_s = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf for a query that sees no sink
    probs = torch.exp(scores - lse_s.clamp(min=torch.finfo(acc).min)).to(values.dtype).view(B, KV, g, n, -1)
    out_s = (probs @ values[:, :, None, sink.cols]).view(B, H, n, hd)
    lse = torch.logaddexp(lse_w, lse_s)
    out = out_w.to(acc) * torch.exp(lse_w - lse) + out_s.to(acc) * torch.exp(lse_s - lse)
    return out.to(q.dtype)


def _doubled(c, q, keys, values, raw_q, mask, sink: SinkFrame, cache, layer) -> torch.Tensor:
    """The sink correction inside one SDPA call, on a doubled head dimension (values zero-padded to
    the same width, which CPU SDPA's fast kernel wants; the padding is dropped from the output)."""
    hd = q.shape[-1]
    q2 = torch.cat([q, rope_rotate(raw_q, *sink.q_rot)], dim=-1)
    k2 = torch.cat([keys, torch.zeros_like(keys)], dim=-1)
    sink_keys = _sink_keys(sink, keys, cache, layer)
    corrected = torch.cat([torch.zeros_like(sink_keys), sink_keys], dim=-1)
    if sink.is_sink is not None:  # rows differ: only the columns that hold a sink in that row
        corrected = torch.where(sink.is_sink[:, None, :, None], corrected, k2[:, :, sink.cols])
    k2[:, :, sink.cols] = corrected
    v2 = torch.cat([values, torch.zeros_like(values)], dim=-1)
    out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, scale=c.scale, enable_gqa=True)
    return out[..., :hd]
