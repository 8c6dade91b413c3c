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
from .model_config import ModelConfig
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
    """The sink correction of a chunk: sink columns scored with the query at c_t, the sinks at i.

    `cols` are the key columns that can hold a sink: the cache's sink slots (the first `n_cached`,
    whose raw keys are rotated at i by `cached_rot`), then chunk columns. When the rows differ,
    `is_sink` (B, len(cols)) says which of them hold a sink in each row; None: all of them, in
    every row."""
    q_rot: tuple  # RoPE for the queries at their cache positions c_t
    cols: torch.Tensor
    n_cached: int
    cached_rot: tuple
    is_sink: torch.Tensor | None = None
    # The split form (`_sdpa_sink_split`): masks of the two parts, shared by every layer.
    window_mask: torch.Tensor | None = None  # (B|1, 1, n, Nk): the plan's mask without the sink columns
    sink_mask: torch.Tensor | None = None  # (B|1, 1, n, len(cols)): the sink columns' part of it
    has_window: torch.Tensor | None = None  # (B|1, 1, n, 1) bool: the query sees a key that is not a sink


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
    write: CacheWrite  # per-row steps: only rows where write.keep (the sinks of those rows too)


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
              inv_freq: torch.Tensor | None, slopes: torch.Tensor | None, want_probs: bool = False,
              lengths: torch.Tensor | None = None) -> Plan:
    """The plan of one forward of n tokens (row b: the first lengths[b] of them; None: all n)."""
    if cache is None:
        return plan_dense(config, n, device, dtype, inv_freq, slopes, want_probs)
    if n == 1 and not (want_probs or config.zero_sink):
        return plan_decode(config, cache, device, dtype, inv_freq, slopes, lengths)
    return plan_chunk(config, n, cache, device, dtype, inv_freq, slopes, want_probs, lengths)


def _per_row(rot: tuple) -> tuple:
    """RoPE tables made for (B, n) positions, shaped (B, 1, n, rot) to broadcast over the heads."""
    return tuple(x[:, None] for x in rot)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A bool (B, n, Nk) key-set mask as an additive float mask: 0 where allowed, -inf elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


def _alibi(config: ModelConfig, slopes, kp: KeyPositions, dtype) -> torch.Tensor:
    """(B, H, n, Nk) ALiBi bias from each row's cache-relative positions."""
    return alibi_bias(config.alibi, slopes, kp.query_position, kp.position, config.scale, dtype)


def plan_dense(config: ModelConfig, n: int, device, dtype, inv_freq, slopes, want_probs=False) -> DensePlan:
    """No cache: K_t = {0..t} at absolute positions."""
    rope = config.positions == "rope"
    rot = rope_tables(torch.arange(n, device=device), inv_freq, dtype) if rope else None
    if rope and not (want_probs or config.zero_sink):
        return DensePlan(rot=rot, mask=None, want_probs=want_probs)  # SDPA skips the masked blocks
    kp = key_positions(torch.zeros(1, dtype=torch.int64, device=device), n, 0, None)
    mask = _additive(kp.allowed, dtype)[:, None]  # (1, 1, n, n), 4-D: CPU SDPA's fast kernel wants 4-D
    if not rope:
        mask = mask + _alibi(config, slopes, kp, dtype)
    return DensePlan(rot=rot, mask=mask, want_probs=want_probs)


def plan_chunk(config: ModelConfig, n: int, cache: SinkCache, device, dtype, inv_freq, slopes,
               want_probs=False, lengths: torch.Tensor | None = None) -> ChunkPlan:
    """n tokens through the cache: keys are [the cache's S slots as they were, the chunk's own].

    Row b feeds the first lengths[b] tokens (None: all n) after its own tokens_seen[b]. When every
    row is at the same position, the positions, mask and sink frame are made once and broadcast."""
    rope = config.positions == "rope"
    sinks, window, S = cache.sinks, cache.window, cache.capacity
    seen = cache.tokens_seen  # (B,), on the CPU
    t0 = cache.common_position()  # every row's position when they are all at one, else None
    uniform = t0 is not None
    t0max = t0 if uniform else int(seen.max())
    fed = torch.full_like(seen, n) if lengths is None else lengths
    lastmax = t0 + n - 1 if uniform and lengths is None else int((seen + fed).max()) - 1  # the furthest position fed
    if uniform:
        t = torch.arange(t0, t0 + n, device=device)  # (n,) stream positions of the queries
        rot = rope_tables(t, inv_freq, dtype) if rope else None
    else:
        t = (seen[:, None] + torch.arange(n)).to(device)  # (B, n)
        rot = _per_row(rope_tables(t, inv_freq, dtype)) if rope else None
    write = _chunk_write(cache, seen, fed, n, uniform and lengths is None, rope, device)

    plan = ChunkPlan(rot=rot, mask=None, use_cache_cols=t0max > 0, sink=None, write=write, want_probs=want_probs)
    if rope and not (want_probs or config.zero_sink) and t0max == 0 and lastmax < S:
        return plan  # nothing evicted yet: every key set is {0..t}, plain causal (tests/test_keys.py)

    kp = key_positions((seen[:1] if uniform else seen).to(device), n, sinks, window, slots=t0max > 0)
    mask = _additive(kp.allowed, dtype)[:, None]  # (B|1, 1, n, Nk): 4-D, CPU SDPA's fast kernel wants 4-D
    if rope and sinks and lastmax >= S:  # some query sees the sinks at a position other than the text's
        plan.sink = _sink_frame(kp, t0, n, S, plan.use_cache_cols, inv_freq, dtype)
        if _SPLIT_SDPA is not None and device.type == "cpu" and not (want_probs or config.zero_sink):
            _split_masks(plan.sink, mask)
    if not rope:
        mask = mask + _alibi(config, slopes, kp, dtype)  # (B|1, H, n, Nk)
    plan.mask = mask
    return plan


def _chunk_write(cache: SinkCache, seen: torch.Tensor, fed: torch.Tensor, n: int, same: bool, rope: bool,
                 device) -> CacheWrite:
    """Row b's tokens seen[b] .. seen[b] + fed[b] - 1 go to their slots: the sinks, then only the
    last `window` ring tokens (earlier ones would be overwritten within the same chunk). Sinks also
    keep their un-rotated key, at raw slot i. `same`: one list of columns serves every row."""
    sinks, window = cache.sinks, cache.window
    idx = torch.arange(n)
    t = seen[:, None] + idx  # (B, n) stream positions
    last = (seen + fed - 1)[:, None]
    is_sink = (t < sinks) & (idx < fed[:, None])
    keep = is_sink | ((t > last - window) & (idx < fed[:, None]))
    raw = rope and cache.raw_sink_k is not None and bool(is_sink.any())
    if same:
        write = CacheWrite(dst=slot_of(t[0][keep[0]], sinks, window).to(device), src=idx[keep[0]].to(device))
        if raw:
            write.raw_src, write.raw_dst = idx[is_sink[0]].to(device), t[0][is_sink[0]].to(device)
        return write
    row, src = keep.nonzero(as_tuple=True)
    write = CacheWrite(dst=slot_of(t[row, src], sinks, window).to(device), src=src.to(device), row=row.to(device))
    if raw:
        row, src = is_sink.nonzero(as_tuple=True)
        write.raw_row, write.raw_src, write.raw_dst = row.to(device), src.to(device), t[row, src].to(device)
    return write


def _sink_frame(kp: KeyPositions, t0: int | None, n: int, S: int, use_cache_cols: bool, inv_freq, dtype) -> SinkFrame:
    """Which key columns hold sinks, and the rotations that score them at the sinks' positions i.

    t0: every row's tokens_seen when they are all equal (then the columns are exact and shared),
    None when the rows differ (then every column that can hold a sink is a candidate, and
    `is_sink` says which do, per row)."""
    sinks = kp.sinks
    q_rot = _per_row(rope_tables(kp.query_position, inv_freq, dtype))
    device = kp.key.device
    if t0 is not None:
        key = kp.key[0]
        n_cached = min(t0, sinks)  # the cache's sink slots 0..n_cached-1 hold sinks 0..n_cached-1
        cols = torch.nonzero((key >= 0) & (key < sinks)).flatten()
        is_sink = None
    else:
        n_cached = sinks if use_cache_cols else 0  # every sink slot, then the chunk's first columns
        first = S if use_cache_cols else 0
        cols = torch.cat([torch.arange(n_cached), first + torch.arange(min(sinks, n))]).to(device)
        key = kp.key[:, cols]
        is_sink = (key >= 0) & (key < sinks)
    return SinkFrame(q_rot=q_rot, cols=cols, n_cached=n_cached, is_sink=is_sink,
                     cached_rot=rope_tables(torch.arange(n_cached, device=device), inv_freq, dtype))


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


def plan_decode(config: ModelConfig, cache: SinkCache, device, dtype, inv_freq, slopes,
                lengths: torch.Tensor | None = None) -> DecodePlan:
    """One token per row (lengths[b] in {0, 1}; None: every row). Rows at one position take the
    lockstep form, in Python ints; rows at different positions the per-row form."""
    t0 = cache.common_position() if lengths is None else None
    if t0 is not None:
        return _plan_decode_lockstep(config, cache, t0, device, dtype, inv_freq, slopes)
    return _plan_decode_rows(config, cache, lengths, device, dtype, inv_freq, slopes)


def _plan_decode_lockstep(config, cache, t0: int, device, dtype, inv_freq, slopes) -> DecodePlan:
    """Every row at token t0: slot arithmetic in Python ints (`decode_frame`), every changing value
    a tensor, and attention over the valid prefix of the buffer."""
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


def _plan_decode_rows(config, cache, lengths, device, dtype, inv_freq, slopes) -> DecodePlan:
    """Row b's token t_b = tokens_seen[b], where lengths[b] == 1: each row its own slot, RoPE
    position, sink frame and ALiBi bias, over all S slots with the empty ones masked.

    The plan has the same structure whatever the rows do (every field a tensor of a fixed shape),
    so a compiled step never recompiles as the rows move, start or idle. An idle row
    (lengths[b] == 0) is computed too, but writes nothing: its buffers stay bit-identical."""
    sinks, window, S = cache.sinks, cache.window, cache.capacity
    t = cache.tokens_seen  # (B,), on the CPU
    active = torch.ones_like(t, dtype=torch.bool) if lengths is None else lengths > 0
    shift = (t - (S - 1)).clamp(min=0)  # t - c_t: where the sinks sit in this query's frame
    write = CacheWrite(dst=slot_of(t, sinks, window).to(device), keep=active.to(device),
                       every_row=bool(active.all()))
    held = slot_positions(t + 1, sinks, window)  # (B, S) after this token's write; -1: empty
    plan = DecodePlan(rot=None, mask=_additive(held >= 0, dtype).to(device)[:, None, None],  # (B, 1, 1, S)
                      n_valid=S, sink_rot=None, write=write)
    if config.positions == "rope":
        plan.rot = _per_row(_per_row(rope_tables(t.to(device), inv_freq, dtype)))  # (B, 1, 1, rot)
        if cache.raw_sink_k is not None:  # rows at a sink keep its un-rotated key too
            raw_keep = active & (t < sinks)
            write.raw_dst, write.raw_keep = t.clamp(max=sinks - 1).to(device), raw_keep.to(device)
            write.raw_any = bool(raw_keep.any())
        if sinks:
            at = (torch.arange(sinks)[None, :] + shift[:, None]).to(device)  # (B, sinks)
            plan.sink_rot = _per_row(rope_tables(at, inv_freq, dtype))  # (B, 1, sinks, rot)
    else:
        k_pos = torch.where(held < sinks, held, held - shift[:, None]).to(device)  # cache-relative
        q_pos = t.clamp(max=S - 1).to(device)[:, None]  # (B, 1)
        plan.mask = plan.mask + alibi_bias(config.alibi, slopes, q_pos, k_pos[:, None], config.scale, dtype)
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
    elif sink is not None and sink.window_mask is not None:
        out = _sdpa_sink_split(config, q, keys, values, raw_q, sink, cache, layer)
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
    w = plan.write
    cache.put_sinks(rope_rotate(cache.raw_sink_k, cos, sin),
                    None if not torch.compiler.is_compiling() and w.every_row else w.keep)


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
    mask = plan.mask  # None, (B|1, H, 1, n) per head (ALiBi), or (B, 1, 1, S) (RoPE, per row)
    if mask is not None and mask.shape[1] == H:
        mask = mask.view(mask.shape[0], KV, g, -1)
    out = F.scaled_dot_product_attention(qk[:, :H].view(B, KV, g, hd), keys, values, attn_mask=mask,
                                         scale=config.scale)
    return out.view(B, H, 1, hd)


def _sink_keys(sink: SinkFrame, keys, cache, layer) -> torch.Tensor:
    """The sink columns' keys rotated at their cache positions i (B, KV, len(sink.cols), hd)
    (where is_sink is False: whatever the column holds, rotated, never used)."""
    sink_keys = keys[:, :, sink.cols]
    if sink.n_cached:  # the cache's sink slots may hold another frame: rotate the raw keys
        scos, ssin = sink.cached_rot
        from_cache = rope_rotate(cache.raw_sink_k[layer][:, :, : sink.n_cached], scos, ssin)
        sink_keys = torch.cat([from_cache, sink_keys[:, :, sink.n_cached:]], dim=2)
    return sink_keys


# CPU flash attention that also returns each query's log-sum-exp of scores (torch's own SDPA
# kernel on CPU, which takes grouped K/V heads as they are); None where this torch lacks it.
_SPLIT_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _sdpa_sink_split(config, q, keys, values, raw_q, sink: SinkFrame, cache, layer) -> torch.Tensor:
    """The sink correction as two attentions merged by their log-sum-exps (CPU).

    The window part is one flash-attention call over every key column but the sinks, with the
    queries at t. The sink part is the few sink columns scored explicitly, with the queries at c_t
    and the sinks at i. A softmax over the union is the two softmaxes weighted by exp(lse_part -
    lse_all). Half the arithmetic of `_sdpa_sink_corrected`'s doubled head dimension, the same
    result to rounding (tests/test_streaming.py holds both paths to the same tolerances)."""
    B, H, n, hd = q.shape
    KV = keys.shape[1]
    g = H // KV
    out_w, lse_w = _SPLIT_SDPA(q, keys, values, attn_mask=sink.window_mask, scale=config.scale)[:2]
    acc = lse_w.dtype  # float32 at least
    lse_w = lse_w[..., None].masked_fill(~sink.has_window, float("-inf"))  # a query with only sinks
    cos, sin = sink.q_rot
    qrel = rope_rotate(raw_q, cos, sin).view(B, KV, g, n, hd)
    sink_keys = _sink_keys(sink, keys, cache, layer)[:, :, None]  # (B, KV, 1, C, hd)
    scores = (qrel @ sink_keys.transpose(-1, -2)).view(B, H, n, -1).to(acc) * config.scale + sink.sink_mask.to(acc)
    lse_s = torch.logsumexp(scores, dim=-1, keepdim=True)  # -inf for a query that sees no sink
    probs = torch.exp(scores - lse_s.clamp(min=torch.finfo(acc).min)).to(values.dtype).view(B, KV, g, n, -1)
    out_s = (probs @ values[:, :, None, sink.cols]).view(B, H, n, hd)
    lse = torch.logaddexp(lse_w, lse_s)
    out = out_w.to(acc) * torch.exp(lse_w - lse) + out_s.to(acc) * torch.exp(lse_s - lse)
    return out.to(q.dtype)


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
    corrected = torch.cat([torch.zeros_like(sink_keys), sink_keys], dim=-1)
    if sink.is_sink is not None:  # rows differ: only the columns that hold a sink in that row
        corrected = torch.where(sink.is_sink[:, None, :, None], corrected, k2[:, :, sink.cols])
    k2[:, :, sink.cols] = corrected
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
        corrected = (qrel @ sink_keys[:, :, None].transpose(-1, -2)) * config.scale
        if sink.is_sink is not None:  # rows differ: only the columns that hold a sink in that row
            corrected = torch.where(sink.is_sink[:, None, None, None, :], corrected, scores[..., sink.cols])
        scores[..., sink.cols] = corrected
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
