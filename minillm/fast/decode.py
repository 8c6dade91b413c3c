"""The decode step (one token per row) without a mask over S + 1 keys: the fast form of the
core's n = 1 chunk.

Lockstep (every row at token t): the contract in Python ints (`decode_frame`), the token written
into its slot first, then one SDPA call over the valid prefix of the buffer. With RoPE the sinks
are rotated once per step, for all layers, into this query's frame, at i + (t - c_t): their
distance to a query rotated at t is then c_t - i, as the contract says; the window keys never move.

Per row (rows at different positions, or some idle): each row its own slot, RoPE position, sink
frame and ALiBi bias, over all S slots with the empty ones masked. The plan has the same structure
whatever the rows do (every field a tensor of a fixed shape), so a compiled step never recompiles as
rows move, start or idle; an idle row is computed too, but writes nothing.

Under the "absolute" convention the query's position is t (contract.query_position), so the
sink shift t - c_t is 0: the stored keys are already in the query's frame and nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..core.attention import Spec, additive
from ..core.cache import SinkCache
from ..core.contract import query_position, slot_of, slot_positions
from ..core.positions import alibi_bias, rope_rotate, rope_tables
from .writes import FastWrite, put_sinks, write


@dataclass
class DecodeFrame:
    """A lockstep decode step's arithmetic in Python ints, for token t through a cache of S slots."""
    slot: int  # where token t is written
    n_valid: int  # min(t + 1, S): the buffer prefix it attends to, itself included
    sink_shift: int  # t - c_t: the raw sinks are rotated at i + sink_shift (0: not needed)


def decode_frame(t: int, sinks: int, window: int, positions: str = "cache") -> DecodeFrame:
    """contract.key_positions for one token, in ints: tests/test_keys.py checks the two agree."""
    S = sinks + window
    return DecodeFrame(slot=slot_of(t, sinks, window), n_valid=min(t + 1, S),
                       sink_shift=t - query_position(t, S, positions))


def decode_key_positions(t: int, sinks: int, window: int, device=None, positions: str = "cache") -> torch.Tensor:
    """(n_valid,) positions of the buffer prefix after token t's write (ALiBi), in the convention."""
    f = decode_frame(t, sinks, window, positions)
    pos = slot_positions(t + 1, sinks, window, device)[0, : f.n_valid]  # after the write
    return torch.where(pos < sinks, pos, pos - f.sink_shift)


@dataclass
class DecodePlan:
    spec: Spec
    rot: tuple | None  # RoPE for the query and its key at stream position t
    mask: torch.Tensor | None  # ALiBi bias (1, H, 1, n_valid), or (B, 1|H, 1, S) per row; None: none
    n_valid: int  # slots that hold a key after this token's write: a prefix of the buffer
    sink_rot: tuple | None  # RoPE for every layer's raw sinks at i + (t - c_t)
    write: FastWrite  # per-row steps: only rows where write.keep (the sinks of those rows too)
    step: Callable | None = None  # a compiled step (minillm.fast.compile_decode), or the model's own

    def prepare(self, cache: SinkCache) -> None:
        """With a full cache, rotate every layer's sinks into this query's frame, once per step."""
        if self.sink_rot is not None:
            w = self.write
            put_sinks(cache, rope_rotate(cache.raw_sink_k, *self.sink_rot),
                      None if not torch.compiler.is_compiling() and w.every_row else w.keep)

    def attend(self, layer: int, qkv: torch.Tensor, cache: SinkCache, probs_out=None) -> torch.Tensor:
        """qkv (B, 1, (H + 2 KV) hd) -> (B, 1, H hd): write K/V into the slot, attend to the buffer."""
        c = self.spec.config
        H, KV, hd = c.num_heads, c.num_kv_heads, c.head_dim
        B = qkv.shape[0]
        raw_qk = qkv.view(B, -1, 1, hd)  # (B, H + 2 KV, 1, hd): already laid out per head
        v = raw_qk[:, H + KV:]
        raw_qk = raw_qk[:, : H + KV]
        qk = raw_qk if self.rot is None else rope_rotate(raw_qk, *self.rot)  # q and k in one rotation
        write(cache, layer, qk[:, H:], v, raw_qk[:, H:], self.write)
        keys, values = cache.k[layer], cache.v[layer]
        if self.n_valid < keys.shape[2]:
            keys, values = keys[:, :, : self.n_valid], values[:, :, : self.n_valid]
        # The g = H / KV heads sharing a K/V head are g query rows of that head: plain SDPA, each
        # K/V head read once.
        g = H // KV
        mask = self.mask
        if mask is not None and mask.shape[1] == H:
            mask = mask.view(mask.shape[0], KV, g, -1)
        out = F.scaled_dot_product_attention(qk[:, :H].view(B, KV, g, hd), keys, values, attn_mask=mask,
                                             scale=c.scale)
        return out.reshape(B, 1, H * hd)


def plan_decode(spec: Spec, cache: SinkCache, lengths: torch.Tensor | None, per_row: bool = False,
                step: Callable | None = None) -> DecodePlan:
    """One token per row (lengths[b] in {0, 1}; None: every row). Rows at one position take the
    lockstep form, unless `per_row`; rows at different positions the per-row form."""
    t0 = cache.common_position() if lengths is None and not per_row else None
    p = _lockstep(spec, cache, t0) if t0 is not None else _rows(spec, cache, lengths)
    p.step = step
    return p


def _lockstep(spec: Spec, cache: SinkCache, t0: int) -> DecodePlan:
    c, device = spec.config, spec.device
    f = decode_frame(t0, cache.sinks, cache.window, cache.positions)
    # Tensors, so a compiled step is the same graph every step; made by arange, which on CUDA is a
    # kernel launch, where torch.tensor([x]) would be a synchronising host-to-device copy.
    t = torch.arange(t0, t0 + 1, device=device)
    w = FastWrite(dst=torch.arange(f.slot, f.slot + 1, device=device))
    p = DecodePlan(spec, rot=None, mask=None, n_valid=f.n_valid, sink_rot=None, write=w)
    if c.positions == "rope":
        p.rot = rope_tables(t, spec.inv_freq, spec.dtype)
        if cache.raw_sink_k is not None and t0 < cache.sinks:  # a sink: keep its un-rotated key too
            w.raw_dst = w.dst
        if cache.sinks and f.sink_shift:  # the sinks move into this query's frame
            at = torch.arange(f.sink_shift, f.sink_shift + cache.sinks, device=device)
            p.sink_rot = rope_tables(at, spec.inv_freq, spec.dtype)
    else:
        k_pos = decode_key_positions(t0, cache.sinks, cache.window, device, cache.positions)
        p.mask = alibi_bias(c.alibi, spec.slopes, query_position(t, cache.capacity, cache.positions), k_pos,
                            c.scale, spec.dtype)
    return p


def _rows(spec: Spec, cache: SinkCache, lengths: torch.Tensor | None) -> DecodePlan:
    c, device, dtype = spec.config, spec.device, spec.dtype
    sinks, window, S = cache.sinks, cache.window, cache.capacity
    t = cache.tokens_seen  # (B,), on the CPU
    active = torch.ones_like(t, dtype=torch.bool) if lengths is None else lengths > 0
    shift = t - query_position(t, S, cache.positions)  # t - c_t: where the sinks sit in this query's frame
    w = FastWrite(dst=slot_of(t, sinks, window).to(device), keep=active.to(device), every_row=bool(active.all()))
    held = slot_positions(t + 1, sinks, window)  # (B, S) after this token's write; -1: empty
    mask = additive(held >= 0, dtype).to(device)[:, None, None]
    p = DecodePlan(spec, rot=None, mask=mask, n_valid=S, sink_rot=None, write=w)  # mask (B, 1, 1, S)
    if c.positions == "rope":
        p.rot = tuple(x[:, None, None] for x in rope_tables(t.to(device), spec.inv_freq, dtype))  # (B, 1, 1, rot)
        if cache.raw_sink_k is not None:  # rows at a sink keep its un-rotated key too
            raw_keep = active & (t < sinks)
            w.raw_dst, w.raw_keep = t.clamp(max=sinks - 1).to(device), raw_keep.to(device)
            w.raw_any = bool(raw_keep.any())
        if sinks and cache.raw_sink_k is not None:  # "absolute": the stored sinks are already right
            at = (torch.arange(sinks)[None, :] + shift[:, None]).to(device)  # (B, sinks)
            p.sink_rot = tuple(x[:, None] for x in rope_tables(at, spec.inv_freq, dtype))  # (B, 1, sinks, rot)
    else:
        k_pos = torch.where(held < sinks, held, held - shift[:, None]).to(device)  # cache-relative
        q_pos = query_position(t, S, cache.positions).to(device)[:, None]  # (B, 1)
        p.mask = p.mask + alibi_bias(c.alibi, spec.slopes, q_pos, k_pos[:, None], c.scale, dtype)
    return p
