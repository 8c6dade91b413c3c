"""One attention function for every family: dense, streaming chunks of any length, and decode.

What token t attends to, and at which cache-relative positions, is `keys.key_positions`; the
contract and a worked example are in docs/streaming.md. In short, for S = sinks + window: K_t is
{0..t} while t < S, else the sinks plus {t-window+1..t}; the query sits at c_t = min(t, S-1), sink
i at i, window key j at c_t - (t - j). So a window key is exactly as far from the query as in the
text, and only the sinks sit somewhere else.

How that is computed:
- RoPE: queries and keys are rotated at their stream position (float64 angles), which gets every
  window distance right. Sink scores are recomputed with the query rotated at c_t against the
  sinks rotated at i ("the sink correction"). In a chunk, that runs inside the one SDPA call on a
  doubled head dimension (`_sdpa_sink_corrected`). In a decode step the sinks are instead rotated
  into the query's frame, at i + (t - c_t), once per step for all layers (`rotate_sinks`: sinks x
  KV heads keys per layer, against the paper's re-rotation of all S), so one plain SDPA call per
  layer covers every key.
- ALiBi: the bias is a function of the cache positions above, in each family's own form.

A plan holds what one forward needs and every layer shares; it is built once per forward, by the
path's own function, in a type holding only what that path uses:
- `plan_dense` -> DensePlan (no cache): causal attention at absolute positions (`attend`);
- `plan_chunk` -> ChunkPlan (any length, a cache): attend to [cache slots, chunk keys] under the
  per-query key-set mask, then write the chunk's keys (`attend`). This is also the exact parallel
  perplexity evaluation (a whole text streamed in long chunks);
- `plan_decode` -> DecodePlan (one token, a cache): write K/V into its slot, attend to the valid
  prefix of the buffer (a view) with one SDPA call (`decode_attend`). With RoPE nothing it
  allocates depends on S (ALiBi builds its (heads, S) bias), and everything that changes from step
  to step is a tensor, so a compiled step (`Model.compile_decode`) is one graph.
Each path writes the cache in one call, `SinkCache.write(layer, k, v, raw_k, plan.write)`; the model
then advances `tokens_seen` once (`SinkCache.advance`). Explicit scores (`_manual`) only where they
are the output (attention maps) or SDPA cannot express the softmax (zero_sink).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import CacheWrite, SinkCache, slot_of, slot_positions
from .config import ModelConfig
from .keys import KeyPositions, key_positions
from .positions import alibi_bias, rope_rotate, rope_tables

# Rotations are (cos, signed sin) pairs from positions.rope_tables.


@dataclass
class DensePlan:
    rot: tuple | None  # RoPE for queries and keys at positions 0..n-1
    mask: torch.Tensor | None  # additive (1, 1|H, n, n); None: plain causal, inside SDPA
    want_probs: bool = False


@dataclass
class SinkFrame:
    """The sink correction of a chunk: sink columns scored with the query at c_t, the sinks at i."""
    q_rot: tuple  # RoPE for the queries at their cache positions c_t
    cols: torch.Tensor  # key columns that hold sinks
    n_cached: int  # how many of them are the cache's sink slots (the first ones)
    cached_rot: tuple  # RoPE for those cached sinks' raw keys at their positions i


@dataclass
class ChunkPlan:
    rot: tuple | None  # RoPE for queries and new keys at their stream positions
    mask: torch.Tensor | None  # additive (1, 1|H, n, Nk); None: plain causal (empty cache, nothing evicted)
    use_cache_cols: bool  # keys are [the cache's S slots, the chunk's n]; else the chunk's own
    sink: SinkFrame | None  # RoPE, when some query sees the sinks at a position other than the text's
    write: CacheWrite
    want_probs: bool = False


@dataclass
class DecodePlan:
    rot: tuple | None  # RoPE for the query and its key at stream position t
    mask: torch.Tensor | None  # ALiBi bias (1, H, 1, n_valid); None with RoPE
    n_valid: int  # slots that hold a key after this token's write: a prefix of the buffer
    sink_rot: tuple | None  # RoPE for every layer's raw sinks at i + (t - c_t) (`rotate_sinks`)
    write: CacheWrite


Plan = DensePlan | ChunkPlan | DecodePlan


@dataclass
class DecodeFrame:
    """A decode step's arithmetic in Python ints, for token t through a cache of S slots."""
    slot: int  # where token t is written
    n_valid: int  # min(t + 1, S): the buffer prefix it attends to, itself included
    sink_shift: int  # t - c_t: the raw sinks are rotated at i + sink_shift (0: not needed)


def decode_frame(t: int, sinks: int, window: int) -> DecodeFrame:
    """The fast form of key_positions for one token: tests/test_keys.py checks the two agree."""
    S = sinks + window
    return DecodeFrame(slot=slot_of(t, sinks, window), n_valid=min(t + 1, S), sink_shift=max(0, t - (S - 1)))


def decode_key_positions(t: int, sinks: int, window: int, device=None) -> torch.Tensor:
    """(n_valid,) cache-relative positions of the buffer prefix after token t's write (ALiBi decode)."""
    f = decode_frame(t, sinks, window)
    pos = slot_positions(t + 1, sinks, window, device)[0, : f.n_valid]  # after the write
    return torch.where(pos < sinks, pos, pos - f.sink_shift)


def make_plan(config: ModelConfig, n: int, cache: SinkCache | None, device, dtype,
              inv_freq: torch.Tensor | None, slopes: torch.Tensor | None, want_probs: bool = False) -> Plan:
    """The plan of one forward of n tokens: picks the path."""
    if cache is None:
        return plan_dense(config, n, device, dtype, inv_freq, slopes, want_probs)
    if n == 1 and not (want_probs or config.zero_sink):
        return plan_decode(config, cache, device, dtype, inv_freq, slopes)
    return plan_chunk(config, n, cache, device, dtype, inv_freq, slopes, want_probs)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A bool (B, n, Nk) key-set mask as an additive float mask: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def _alibi(config: ModelConfig, slopes, kp: KeyPositions, dtype) -> torch.Tensor:
    """(1, H, n, Nk) ALiBi bias of row 0 from its cache-relative positions."""
    return alibi_bias(config.alibi, slopes, kp.query_position[0], kp.position[0], config.scale, dtype)


def plan_dense(config: ModelConfig, n: int, device, dtype, inv_freq, slopes, want_probs=False) -> DensePlan:
    """No cache: K_t = {0..t} at absolute positions."""
    rope = config.positions == "rope"
    rot = rope_tables(torch.arange(n, device=device), inv_freq, dtype) if rope else None
    if rope and not (want_probs or config.zero_sink):
        return DensePlan(rot=rot, mask=None, want_probs=want_probs)  # SDPA skips the masked blocks
    kp = key_positions(torch.zeros(1, dtype=torch.int64, device=device), n, 0, None)
    mask = _additive(kp.allowed, dtype)  # (1, n, n)
    if not rope:
        mask = mask + _alibi(config, slopes, kp, dtype)
    return DensePlan(rot=rot, mask=mask.view(1, -1, n, n), want_probs=want_probs)  # 4-D: CPU SDPA's fast kernel


def plan_chunk(config: ModelConfig, n: int, cache: SinkCache, device, dtype, inv_freq, slopes,
               want_probs=False) -> ChunkPlan:
    """n tokens through the cache: keys are [the cache's S slots as they were, the chunk's own]."""
    rope = config.positions == "rope"
    sinks, window, S = cache.sinks, cache.window, cache.capacity
    t0 = cache.tokens_seen  # one count for every row (per-row counts: the batched-streams issue)
    last = t0 + n - 1
    t = torch.arange(t0, t0 + n, device=device)  # stream positions of the queries
    rot = rope_tables(t, inv_freq, dtype) if rope else None

    # Sinks go to their slots, then only the last `window` ring tokens (earlier ones would be
    # overwritten within this same chunk). Sinks also keep their un-rotated key, at raw slot i.
    idx = torch.arange(n, device=device)
    keep = (t < sinks) | (t > last - window)
    write = CacheWrite(dst=cache.slot_of(t[keep]), src=idx[keep])
    if rope and cache.raw_sink_k is not None and t0 < sinks:
        write.raw_src, write.raw_dst = idx[t < sinks], t[t < sinks]

    plan = ChunkPlan(rot=rot, mask=None, use_cache_cols=t0 > 0, sink=None, write=write, want_probs=want_probs)
    if rope and not (want_probs or config.zero_sink) and t0 == 0 and last < S:
        return plan  # nothing evicted yet: every key set is {0..t}, plain causal (tests/test_keys.py)

    seen = torch.full((1,), t0, device=device)  # a fill, not a host-to-device copy
    kp = key_positions(seen, n, sinks, window, slots=t0 > 0)  # no slot columns if the cache is empty
    mask = _additive(kp.allowed, dtype)  # (1, n, Nk)
    if rope and sinks and last >= S:  # some query sees the sinks at a position other than the text's
        key = kp.key[0]
        n_cached = min(t0, sinks)  # the cache's sink slots 0..n_cached-1 hold sinks 0..n_cached-1
        plan.sink = SinkFrame(q_rot=rope_tables(kp.query_position[0], inv_freq, dtype),
                              cols=torch.nonzero((key >= 0) & (key < sinks)).flatten(), n_cached=n_cached,
                              cached_rot=rope_tables(kp.positions_of(slice(n_cached))[0, -1], inv_freq, dtype))
    if not rope:
        mask = mask + _alibi(config, slopes, kp, dtype)
    plan.mask = mask.view(1, -1, *mask.shape[-2:])  # 4-D: CPU SDPA's fast kernel wants a 4-D mask
    return plan


def plan_decode(config: ModelConfig, cache: SinkCache, device, dtype, inv_freq, slopes) -> DecodePlan:
    """One token t: slot arithmetic in Python ints (`decode_frame`), every changing value a tensor."""
    t0 = cache.tokens_seen
    f = decode_frame(t0, cache.sinks, cache.window)
    # Tensors, so a compiled step is the same graph every step; made by arange, which on CUDA is a
    # kernel launch, where torch.tensor([x]) would be a synchronising host-to-device copy.
    t = torch.arange(t0, t0 + 1, device=device)
    write = CacheWrite(dst=torch.arange(f.slot, f.slot + 1, device=device))
    plan = DecodePlan(rot=None, mask=None, n_valid=f.n_valid, sink_rot=None, write=write)
    if config.positions == "rope":
        plan.rot = rope_tables(t, inv_freq, dtype)
        if cache.raw_sink_k is not None and t0 < cache.sinks:  # a sink: keep its un-rotated key too
            write.raw_dst = write.dst
        if cache.sinks and f.sink_shift:  # the sinks move into this query's frame
            sinks = torch.arange(f.sink_shift, f.sink_shift + cache.sinks, device=device)
            plan.sink_rot = rope_tables(sinks, inv_freq, dtype)
    else:
        k_pos = decode_key_positions(t0, cache.sinks, cache.window, device)
        plan.mask = alibi_bias(config.alibi, slopes, t.clamp(max=cache.capacity - 1), k_pos, config.scale, dtype)
    return plan


def attend(config: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: DensePlan | ChunkPlan,
           cache: SinkCache | None, layer: int, probs_out: list | None = None) -> torch.Tensor:
    """q (B, H, n, hd), k/v (B, KV, n, hd), not yet rotated -> attention output (B, H, n, hd).

    A ChunkPlan's keys are persisted after attending: its queries need the slots as they were."""
    raw_q, raw_k = q, k
    if plan.rot is not None:
        cos, sin = plan.rot
        q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)

    chunk = isinstance(plan, ChunkPlan)
    if chunk and plan.use_cache_cols:
        keys = torch.cat([cache.k[layer], k], dim=2)  # working memory: S + n keys
        values = torch.cat([cache.v[layer], v], dim=2)
    else:
        keys, values = k, v
    sink = plan.sink if chunk else None

    if plan.want_probs or config.zero_sink:
        out = _manual(config, q, keys, values, raw_q, plan.mask, sink, cache, layer, probs_out)
    elif sink is not None:
        out = _sdpa_sink_corrected(config, q, keys, values, raw_q, plan.mask, sink, cache, layer)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask, is_causal=plan.mask is None,
                                             scale=config.scale, enable_gqa=True)
    if chunk:
        cache.write(layer, k, v, raw_k, plan.write)
    return out


def rotate_sinks(plan: DecodePlan, cache: SinkCache) -> None:
    """Decode with a full cache: rotate every layer's sinks into this query's frame, i + (t - c_t).

    Once per step for all layers (sinks x KV heads keys each); the window keys never move."""
    cos, sin = plan.sink_rot
    cache.put_sinks(rope_rotate(cache.raw_sink_k, cos, sin))


def decode_attend(config: ModelConfig, qkv: torch.Tensor, plan: DecodePlan, cache: SinkCache, layer: int) -> torch.Tensor:
    """One new token. qkv (B, H + 2 KV, 1, hd): its q, k, v heads, not yet rotated -> (B, H, 1, hd).

    Writes K/V into the token's slot and attends to the valid prefix of the buffer (a view), so
    nothing here grows with the stream. Call rotate_sinks(plan, cache) first when plan.sink_rot."""
    H, KV = config.num_heads, config.num_kv_heads
    raw_qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
    qk = raw_qk
    if plan.rot is not None:  # q and k in one rotation
        cos, sin = plan.rot
        qk = rope_rotate(qk, cos, sin)
    cache.write(layer, qk[:, H:], v, raw_qk[:, H:], plan.write)
    keys, values = cache.k[layer], cache.v[layer]
    if plan.n_valid < keys.shape[2]:
        keys, values = keys[:, :, : plan.n_valid], values[:, :, : plan.n_valid]
    # One query per head: the g = H / KV heads sharing a K/V head are g query rows of that head
    # (plain SDPA, each K/V head read once; ~17% faster on CPU than enable_gqa's broadcast).
    B, g, hd = qkv.shape[0], H // KV, qkv.shape[-1]
    mask = None if plan.mask is None else plan.mask.view(1, KV, g, -1)
    out = F.scaled_dot_product_attention(qk[:, :H].view(B, KV, g, hd), keys, values, attn_mask=mask,
                                         scale=config.scale)
    return out.view(B, H, 1, hd)


def _sink_keys(sink: SinkFrame, keys, cache, layer) -> torch.Tensor:
    """The sink columns' keys rotated at their cache positions i (B, KV, len(sink.cols), hd)."""
    sink_keys = keys[:, :, sink.cols]
    if sink.n_cached:  # the cache's sink slots may hold another frame: rotate the raw keys
        scos, ssin = sink.cached_rot
        from_cache = rope_rotate(cache.raw_sink_k[layer][:, :, : sink.n_cached], scos, ssin)
        sink_keys = torch.cat([from_cache, sink_keys[:, :, sink.n_cached:]], dim=2)
    return sink_keys


def _sdpa_sink_corrected(config, q, keys, values, raw_q, mask, sink: SinkFrame, cache, layer) -> torch.Tensor:
    """The sink correction inside one SDPA call, on a doubled head dimension.

    Queries become [q at t, q at c_t], window keys [k, 0] and sink keys [0, sink at i]: every
    score is then exactly the one product it must be, the other half adding exact zeros. Values
    are zero-padded to the same width (CPU SDPA's fast kernel wants equal widths), and the padding
    is dropped from the output. ~1.7x faster than the explicit scores, and no (n, S + n) scores."""
    hd = q.shape[-1]
    cos, sin = sink.q_rot
    q2 = torch.cat([q, rope_rotate(raw_q, cos, sin)], dim=-1)
    k2 = torch.cat([keys, torch.zeros_like(keys)], dim=-1)
    sink_keys = _sink_keys(sink, keys, cache, layer)
    k2[:, :, sink.cols] = torch.cat([torch.zeros_like(sink_keys), sink_keys], dim=-1)
    v2 = torch.cat([values, torch.zeros_like(values)], dim=-1)
    out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, scale=config.scale, enable_gqa=True)
    return out[..., :hd]


def _manual(config, q, keys, values, raw_q, mask, sink: SinkFrame | None, cache, layer, probs_out) -> torch.Tensor:
    """Explicit scores: SoftMax-off-by-one and attention maps need them (with the sink correction)."""
    B, H, n, hd = q.shape
    KV = keys.shape[1]
    g = H // KV
    qg = q.view(B, KV, g, n, hd)
    scores = (qg @ keys[:, :, None].transpose(-1, -2)) * config.scale  # (B, KV, g, n, Nk)
    if sink is not None:
        # Sinks rotated at their cache positions i, against queries rotated at c_t.
        cos, sin = sink.q_rot
        qrel = rope_rotate(raw_q, cos, sin).view(B, KV, g, n, hd)
        sink_keys = _sink_keys(sink, keys, cache, layer)
        scores[..., sink.cols] = (qrel @ sink_keys[:, :, None].transpose(-1, -2)) * config.scale
    acc = torch.promote_types(scores.dtype, torch.float32)  # softmax in float32 at least
    scores = scores.view(B, H, n, -1).to(acc) + mask.to(acc)
    if config.zero_sink:  # softmax over [scores, 0]: an implicit key with zero score and zero value
        scores = torch.cat([scores, scores.new_zeros(B, H, n, 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if probs_out is not None:
        probs_out.append(probs.detach())
    probs = probs.to(values.dtype).view(B, KV, g, n, -1)
    return (probs @ values[:, :, None]).view(B, H, n, hd)
