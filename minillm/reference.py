"""The slow reference: StreamingLLM exactly as the paper describes it. Read this first.

One token at a time, per layer:
  1. compute the new token's query, key and value (keys stay un-rotated);
  2. append the key and value to a plain Python list;
  3. evict: while the list is longer than S = sinks + window, drop the oldest non-sink entry;
  4. rotate the L cached keys to positions 0..L-1 and the query to L-1 (RoPE), or bias the scores
     by those positions (ALiBi), and attend.

That is the paper's convention, positions="cache". The other, positions="absolute" (mlx-lm,
transformers with 4-D masks, ...), differs only in step 4: every entry of the list remembers the
text position t of its token, and the keys are rotated (or biased) at those positions, the query
at its own t. Eviction is the same.

Nothing here is fast, and nothing is shared with the engine's attention or position code: this
file computes its own RoPE angles and ALiBi slopes, transcribed from each family's published code,
and shares only the weights, norms and MLPs. It is the oracle the property tests compare the
engine against (docs/streaming.md states the contract both follow).
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def reference_stream(model, input_ids: torch.Tensor, sinks: int, window: int,
                     positions: str = "cache") -> torch.Tensor:
    """(B, T) ids -> (B, T, vocab) logits, streamed token by token through a list cache.

    positions="cache": the cached keys at 0..L-1, the query at L-1 (the paper);
    positions="absolute": every key at its token's text position, the query at t."""
    assert positions in ("cache", "absolute"), positions
    c = model.config
    S = sinks + window
    B, T = input_ids.shape
    keys = [[] for _ in model.layers]  # per layer: a list of (B, KV, 1, hd) un-rotated keys
    values = [[] for _ in model.layers]
    texts = [[] for _ in model.layers]  # per layer: the text position of each entry
    logits = []
    for t in range(T):
        x = model.embed(input_ids[:, t : t + 1])
        for layer, block in enumerate(model.layers):
            h = block.attn_norm(x)
            q, k, v = _project(block.attn, h)
            keys[layer].append(k)
            values[layer].append(v)
            texts[layer].append(t)
            if len(keys[layer]) > S:  # evict the oldest token that is not a sink
                del keys[layer][sinks], values[layer][sinks], texts[layer][sinks]
            L = len(keys[layer])
            if positions == "cache":
                key_pos, query_pos = list(range(L)), L - 1  # ranks in the cache
            else:
                key_pos, query_pos = texts[layer], t  # text positions
            out = _attend(c, q, keys[layer], values[layer], key_pos, query_pos)
            a = block.attn.wo(out.transpose(1, 2).reshape(B, 1, -1))
            if block.parallel:
                x = x + a + block.mlp(h if block.mlp_norm is None else block.mlp_norm(x))
            else:
                x = x + a
                x = x + block.mlp(block.mlp_norm(x))
        x = model.norm(x)
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        out = x @ head.T
        logits.append(out * c.logit_scale if c.logit_scale is not None else out)
    return torch.cat(logits, dim=1)


def _project(attn, h):
    c = attn.c
    B = h.shape[0]
    qkv = attn.wqkv(h)
    if c.clip_qkv is not None:
        qkv = qkv.clamp(-c.clip_qkv, c.clip_qkv)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    return (q.view(B, 1, c.num_heads, c.head_dim).transpose(1, 2),
            k.view(B, 1, c.num_kv_heads, c.head_dim).transpose(1, 2),
            v.view(B, 1, c.num_kv_heads, c.head_dim).transpose(1, 2))


def _rope(x, positions, rotary_dim: int, theta: float):
    """Rotate the first rotary_dim dims of x (..., L, hd) by RoPE at `positions` (L,), rotate-half
    form (GPT-NeoX / Llama in transformers): angles p * theta^(-2i/d) in float64, then x's dtype."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (L, rotary_dim/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    half = rotary_dim // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _alibi_slopes(kind: str, heads: int, alibi_bias_max: float) -> torch.Tensor:
    """(heads,) float32 slopes, as each family's checkpoint was trained with."""
    if kind == "mpt":  # MosaicML's gen_slopes: 1 / 2^(k * max / n), k = 1..n, n the next power of two
        n = 2 ** math.ceil(math.log2(heads))
        slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1, dtype=torch.float32) * (alibi_bias_max / n))
        return slopes if n == heads else torch.cat([slopes[1::2], slopes[::2]])[:heads]
    # Bloom's build_alibi_tensor (Falcon-rw): base^k for the closest power of two n <= heads, with
    # base = 2^(-8/n); then odd powers of 2^(-4/n) for the remaining heads.
    n = 2 ** math.floor(math.log2(heads))
    slopes = torch.pow(torch.tensor(2 ** (-8 / n), dtype=torch.float32), torch.arange(1, n + 1, dtype=torch.int32))
    if n < heads:
        extra = torch.pow(torch.tensor(2 ** (-4 / n), dtype=torch.float32),
                          torch.arange(1, 2 * (heads - n), 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


def _attend(c, q, key_list, value_list, key_pos: list[int], query_pos: int):
    """The query at query_pos against the listed keys at key_pos (one position per entry)."""
    K = torch.cat(key_list, dim=2)  # (B, KV, L, hd), in stream order
    V = torch.cat(value_list, dim=2)
    positions = torch.tensor(key_pos, dtype=torch.int64, device=q.device)
    groups = c.num_heads // c.num_kv_heads
    K, V = K.repeat_interleave(groups, dim=1), V.repeat_interleave(groups, dim=1)
    if c.positions == "rope":
        K = _rope(K, positions, c.rotary_dim, c.rope_theta)
        q = _rope(q, torch.tensor([query_pos], dtype=torch.int64, device=q.device), c.rotary_dim, c.rope_theta)
    scores = q @ K.transpose(-1, -2)  # (B, H, 1, L)
    if c.positions == "alibi":
        slopes = _alibi_slopes(c.alibi, c.num_heads, c.alibi_bias_max)[:, None, None].to(q.device)  # (H, 1, 1)
        if c.alibi == "mpt":  # -slope x distance to the query, added to the scaled scores
            scores = scores * c.scale + (slopes * (positions - query_pos)).to(q.dtype)
        else:  # Falcon: bfloat16 slope x key position, rounded to bfloat16, added before the scale
            scores = (scores + (slopes.bfloat16() * positions).to(q.dtype)) * c.scale
    else:
        scores = scores * c.scale
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # float32 at least
    if c.zero_sink:  # SoftMax-off-by-one: exp(s_i) / (1 + sum_j exp(s_j))
        probs = torch.exp(scores - scores.amax(-1, keepdim=True).clamp(min=0))
        probs = probs / (probs.sum(-1, keepdim=True) + torch.exp(-scores.amax(-1, keepdim=True).clamp(min=0)))
    else:
        probs = torch.softmax(scores, dim=-1)
    return probs.to(V.dtype) @ V  # (B, H, 1, hd)
