"""One attention function for every family: dense, streaming chunks of any length, and decode.

The streaming contract (DESIGN.md §1), for capacity S = sinks + window and stream position t:
- token t attends to K_t = {0..t} while t < S, else the sinks {0..sinks-1} plus {t-window+1..t};
- positions are cache-relative: the query sits at c_t = |K_t| - 1 = min(t, S-1), sink i at i,
  and window key j at c_t - (t - j). So a window key is exactly as far from the query as in the
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

A `Plan` holds what one forward needs and every layer shares: positions, rotations, the mask and
bias, and where the chunk's keys go in the cache. It is built once per forward.

Paths:
- decode (one new token, a cache; `decode_attend`): write K/V into its slot, attend to the valid
  prefix of the buffer (a view) with SDPA. With RoPE nothing it allocates depends on S (ALiBi
  builds its (heads, S) bias), and everything that changes from step to step is a tensor, so a
  compiled step (`Model.compile_decode`) is one graph;
- chunk (any length, with or without a cache): attend to [cache slots, chunk keys] under the
  per-query key-set mask; this is also the dense forward (no cache, window = infinity) and the
  exact parallel perplexity evaluation (a whole text streamed in long chunks). Explicit scores
  (`_manual`) only where they are the output (attention maps) or SDPA cannot express the softmax
  (zero_sink).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cache import SinkCache
from .config import ModelConfig
from .positions import alibi_bias, rope_rotate, rope_tables


@dataclass
class Plan:
    n: int  # queries in this forward
    decode: bool  # the one-token fast path
    # Rotations are (cos, signed sin) pairs from positions.rope_tables.
    q_rot: tuple | None = None  # for queries and new keys at their stream positions
    qrel_rot: tuple | None = None  # for queries at cache positions c_t (sink correction)
    sink_rot: tuple | None = None  # for the raw sinks: at i (chunk) or i + delta (decode)
    mask: torch.Tensor | None = None  # additive float (1, 1|H, n, Nk) or None
    is_causal: bool = False  # plain causal mask, handled inside SDPA
    sink_cols: torch.Tensor | None = None  # key columns that hold sinks (sink correction)
    n_cache_sinks: int = 0  # how many of those columns come from the cache's sink region
    use_cache_cols: bool = False  # the chunk path attends to the cache's S slots too
    n_valid: int = 0  # decode: the number of valid slots, a prefix of the buffer
    write_src: torch.Tensor | None = None  # chunk indices whose K/V are written ...
    write_dst: torch.Tensor | None = None  # ... to these slots
    write_raw_sink: bool = False  # decode: the new token is a sink, keep its un-rotated key too
    raw_sink_src: torch.Tensor | None = None  # chunk indices that are sinks (RoPE raw keys)
    want_probs: bool = False


def make_plan(config: ModelConfig, n: int, cache: SinkCache | None, device, dtype,
              inv_freq: torch.Tensor | None, slopes: torch.Tensor | None,
              want_probs: bool = False) -> Plan:
    rope = config.positions == "rope"
    t0 = cache.tokens_seen if cache is not None else 0
    manual = want_probs or config.zero_sink

    if cache is not None and n == 1 and not manual:  # decode fast path: slot arithmetic in Python ints
        sinks, S = cache.sinks, cache.capacity
        plan = Plan(n=1, decode=True, n_valid=min(t0 + 1, S))
        slot = cache.slot_of(t0)
        # Tensors, so a compiled step is the same graph every step; made by arange, which on CUDA
        # is a kernel launch, where torch.tensor([x]) would be a synchronising host-to-device copy.
        t = torch.arange(t0, t0 + 1, device=device)
        plan.write_dst = torch.arange(slot, slot + 1, device=device)
        if rope:
            plan.q_rot = rope_tables(t, inv_freq, dtype)
            plan.write_raw_sink = cache.raw_sink_k is not None and t0 < sinks
            if sinks and t0 >= S:  # sinks move into this query's frame: i + (t - c_t)
                plan.sink_rot = rope_tables(torch.arange(t0 - (S - 1), t0 - (S - 1) + sinks, device=device),
                                             inv_freq, dtype)
        else:
            pos = cache.slot_positions(t0 + 1, device=device)[: plan.n_valid]
            k_cache_pos = torch.where(pos < sinks, pos, min(t0, S - 1) - (t - pos))
            plan.mask = alibi_bias(config.alibi, slopes, t.clamp(max=S - 1), k_cache_pos, config.scale, dtype)
        return plan

    t = torch.arange(t0, t0 + n, device=device)  # stream positions of the queries
    if cache is None:  # dense: every earlier token, absolute positions
        plan = Plan(n=n, decode=False, want_probs=want_probs)
        if rope:
            plan.q_rot = rope_tables(t, inv_freq, dtype)
        if rope and not manual:
            plan.is_causal = True
            return plan
        causal = t[None, :] <= t[:, None]
        mask = torch.zeros(n, n, dtype=dtype, device=device).masked_fill(~causal, float("-inf"))
        if not rope:
            mask = mask + alibi_bias(config.alibi, slopes, t, t, config.scale, dtype)
        plan.mask = mask.view(1, -1, n, n)  # 4-D: CPU SDPA falls back to its slow kernel for a 3-D mask
        return plan

    sinks, window, S = cache.sinks, cache.window, cache.capacity
    c = torch.clamp(t, max=S - 1)  # cache position of each query
    last = t0 + n - 1

    # Chunk path: keys are [the cache's S slots as they were before this chunk] + [the chunk's own].
    plan = Plan(n=n, decode=False, want_probs=want_probs, use_cache_cols=t0 > 0)
    chunk_pos = t
    if rope:
        plan.q_rot = rope_tables(t, inv_freq, dtype)
    if rope and not manual and t0 == 0 and last < S:
        plan.is_causal = True  # nothing evicted yet: every key set is {0..t}, SDPA skips the masked blocks
    else:
        key_pos = torch.cat([cache.slot_positions(t0, device=device), chunk_pos]) if t0 > 0 else chunk_pos
        kp = key_pos[None, :]
        tq = t[:, None]
        allowed = (kp >= 0) & (kp <= tq) & ((kp < sinks) | (kp > tq - window))
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
        if rope and sinks and last >= S:  # some query sees the sinks at a position other than the text's
            plan.qrel_rot = rope_tables(c, inv_freq, dtype)
            plan.sink_cols = torch.nonzero((key_pos >= 0) & (key_pos < sinks)).flatten()
            plan.n_cache_sinks = min(t0, sinks)
            plan.sink_rot = rope_tables(torch.arange(plan.n_cache_sinks, device=device), inv_freq, dtype)
        if not rope:
            k_cache_pos = torch.where(kp < sinks, kp, c[:, None] - (tq - kp))
            mask = mask + alibi_bias(config.alibi, slopes, c, k_cache_pos, config.scale, dtype)
        plan.mask = mask.view(1, -1, *mask.shape[-2:])  # 4-D: CPU SDPA's fast kernel wants a 4-D mask

    # Cache writes: sinks to their slots, then only the last `window` ring tokens (earlier ones
    # would be overwritten within this same chunk).
    idx = torch.arange(n, device=device)
    keep = (chunk_pos < sinks) | (chunk_pos > last - window)
    plan.write_src = idx[keep]
    plan.write_dst = cache.slot_of(chunk_pos[keep])
    if rope and cache.raw_sink_k is not None:
        plan.raw_sink_src = idx[chunk_pos < sinks]
    return plan


def attend(config: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan,
           cache: SinkCache | None, layer: int, probs_out: list | None = None) -> torch.Tensor:
    """q (B, H, n, hd), k/v (B, KV, n, hd), not yet rotated -> attention output (B, H, n, hd)."""
    raw_q, raw_k = q, k
    if plan.q_rot is not None:
        cos, sin = plan.q_rot
        q, k = rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)

    if cache is not None and plan.use_cache_cols:
        keys = torch.cat([cache.k[layer], k], dim=2)  # working memory: S + n keys
        values = torch.cat([cache.v[layer], v], dim=2)
    else:
        keys, values = k, v

    if plan.want_probs or config.zero_sink:
        out = _manual(config, q, keys, values, raw_q, plan, cache, layer, probs_out)
    elif plan.sink_cols is not None:
        out = _sdpa_sink_corrected(config, q, keys, values, raw_q, plan, cache, layer)
    else:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.mask, is_causal=plan.is_causal,
                                             scale=config.scale, enable_gqa=True)

    if cache is not None:  # persist this chunk's keys: index_copy_ into the fixed buffers
        cache.k[layer].index_copy_(2, plan.write_dst, k[:, :, plan.write_src])
        cache.v[layer].index_copy_(2, plan.write_dst, v[:, :, plan.write_src])
        if plan.raw_sink_src is not None and len(plan.raw_sink_src):
            dst = cache.tokens_seen + plan.raw_sink_src  # sink i lives at raw slot i
            cache.raw_sink_k[layer].index_copy_(2, dst, raw_k[:, :, plan.raw_sink_src])
    return out


def rotate_sinks(plan: Plan, cache: SinkCache) -> None:
    """Decode with a full cache: rotate every layer's sinks into this query's frame, i + (t - c_t).

    Once per step for all layers (sinks x KV heads keys each); the window keys never move."""
    cos, sin = plan.sink_rot
    cache.put_sinks(rope_rotate(cache.raw_sink_k, cos, sin))


def decode_attend(config: ModelConfig, qkv: torch.Tensor, plan: Plan, cache: SinkCache, layer: int) -> torch.Tensor:
    """One new token. qkv (B, H + 2 KV, 1, hd): its q, k, v heads, not yet rotated -> (B, H, 1, hd).

    Writes K/V into the token's slot and attends to the valid prefix of the buffer (a view), so
    nothing here grows with the stream. Call rotate_sinks(plan, cache) first when plan.sink_rot."""
    H, KV = config.num_heads, config.num_kv_heads
    qk, v = qkv[:, : H + KV], qkv[:, H + KV :]
    if plan.write_raw_sink:
        cache.put_token(cache.raw_sink_k, layer, plan.write_dst, qk[:, H:])
    if plan.q_rot is not None:  # q and k in one rotation
        cos, sin = plan.q_rot
        qk = rope_rotate(qk, cos, sin)
    cache.put_token(cache.k, layer, plan.write_dst, qk[:, H:])
    cache.put_token(cache.v, layer, plan.write_dst, v)
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


def _sink_keys(plan: Plan, keys, cache, layer) -> torch.Tensor:
    """The sink columns' keys rotated at their cache positions i (B, KV, len(sink_cols), hd)."""
    sink_keys = keys[:, :, plan.sink_cols]
    if plan.n_cache_sinks:  # the cache's sink slots may hold another frame: rotate the raw keys
        scos, ssin = plan.sink_rot
        from_cache = rope_rotate(cache.raw_sink_k[layer][:, :, : plan.n_cache_sinks], scos, ssin)
        sink_keys = torch.cat([from_cache, sink_keys[:, :, plan.n_cache_sinks:]], dim=2)
    return sink_keys


def _sdpa_sink_corrected(config, q, keys, values, raw_q, plan: Plan, cache, layer) -> torch.Tensor:
    """The sink correction inside one SDPA call, on a doubled head dimension.

    Queries become [q at t, q at c_t], window keys [k, 0] and sink keys [0, sink at i]: every
    score is then exactly the one product it must be, the other half adding exact zeros. Values
    are zero-padded to the same width (CPU SDPA's fast kernel wants equal widths), and the padding
    is dropped from the output. ~1.7x faster than the explicit scores, and no (n, S + n) scores."""
    hd = q.shape[-1]
    cos, sin = plan.qrel_rot
    q2 = torch.cat([q, rope_rotate(raw_q, cos, sin)], dim=-1)
    k2 = torch.cat([keys, torch.zeros_like(keys)], dim=-1)
    sink_keys = _sink_keys(plan, keys, cache, layer)
    k2[:, :, plan.sink_cols] = torch.cat([torch.zeros_like(sink_keys), sink_keys], dim=-1)
    v2 = torch.cat([values, torch.zeros_like(values)], dim=-1)
    out = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=plan.mask, scale=config.scale, enable_gqa=True)
    return out[..., :hd]


def _manual(config, q, keys, values, raw_q, plan: Plan, cache, layer, probs_out) -> torch.Tensor:
    """Explicit scores: SoftMax-off-by-one and attention maps need them (with the sink correction)."""
    B, H, n, hd = q.shape
    KV = keys.shape[1]
    g = H // KV
    qg = q.view(B, KV, g, n, hd)
    scores = (qg @ keys[:, :, None].transpose(-1, -2)) * config.scale  # (B, KV, g, n, Nk)
    if plan.sink_cols is not None:
        # Sinks rotated at their cache positions i, against queries rotated at c_t.
        cos, sin = plan.qrel_rot
        qrel = rope_rotate(raw_q, cos, sin).view(B, KV, g, n, hd)
        sink_keys = _sink_keys(plan, keys, cache, layer)
        scores[..., plan.sink_cols] = (qrel @ sink_keys[:, :, None].transpose(-1, -2)) * config.scale
    acc = torch.promote_types(scores.dtype, torch.float32)  # softmax in float32 at least
    scores = scores.view(B, H, n, -1).to(acc) + plan.mask.to(acc)
    if config.zero_sink:  # softmax over [scores, 0]: an implicit key with zero score and zero value
        scores = torch.cat([scores, scores.new_zeros(B, H, n, 1)], dim=-1)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    if probs_out is not None:
        probs_out.append(probs.detach())
    probs = probs.to(values.dtype).view(B, KV, g, n, -1)
    return (probs @ values[:, :, None]).view(B, H, n, hd)
