"""Positions: RoPE (full or partial, rotate-half form) and ALiBi (MPT's and Falcon/Bloom's forms).

Everything here is a pure function of integer positions. The contract (contract.py) decides *which*
positions; these functions only turn them into angles and biases.

RoPE angles are computed in float64 from integer positions, then rounded once to the compute
dtype. The rotation of a token at position 3,000,000 is therefore as exact as at position 3: no
angle accumulates error as the stream grows.
"""

from __future__ import annotations

import math

import torch


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """(rotary_dim/2,) float64 inverse frequencies theta^(-2i/d)."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (*positions.shape, rotary_dim) for integer positions (float64 angles)."""
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """(cos, signed sin) for integer positions: rope_cos_sin with the first half of sin negated,
    the form `rope_rotate` takes."""
    cos, sin = rope_cos_sin(positions, inv_freq, dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x (..., T, head_dim) in rotate-half form; the rest pass.

    Rotate-half is x * cos + [-x2, x1] * [s, s]; [-x2, x1] * [s, s] = roll(x) * [-s, s], so the
    sign lives in the table (exactly: -(a*b) = (-a)*b in IEEE arithmetic)."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + x.roll(rot // 2, -1) * signed_sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + x_rot.roll(rot // 2, -1) * signed_sin, x_pass), dim=-1)


def alibi_slopes(kind: str, num_heads: int, alibi_bias_max: float = 8.0) -> torch.Tensor:
    """(num_heads,) float32 slopes, as each family's checkpoint was trained with."""
    if kind == "mpt":  # MosaicML gen_slopes
        n = 2 ** math.ceil(math.log2(num_heads))
        m = torch.arange(1, n + 1, dtype=torch.float32) * (alibi_bias_max / n)
        slopes = 1.0 / torch.pow(2, m)
        if n != num_heads:
            slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
        return slopes
    if kind == "bloom":  # Bloom / Falcon-rw build_alibi_tensor
        closest = 2 ** math.floor(math.log2(num_heads))
        base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
        slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
        if closest != num_heads:
            extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
            remaining = min(closest, num_heads - closest)
            extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
            slopes = torch.cat([slopes, extra])
        return slopes
    raise ValueError(f"unknown ALiBi kind {kind!r}")


def alibi_bias(kind: str, slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
               scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias (B, heads, Tq, Tk) for cache positions q_pos (B, Tq) and k_pos (B, Tq|1, Tk), or
    one set for every row (q_pos (Tq,), k_pos (Tq, Tk) or (Tk,)); added to the scaled scores.
    - "mpt": -slope * (q_pos - k_pos) (MosaicML).
    - "bloom": slope * k_pos before the 1/sqrt(head_dim) scale, slope x position rounded to bfloat16
      as transformers' Falcon does: the rounding depends on k_pos, so it must be the true position."""
    slopes = slopes.to(q_pos.device)[:, None, None]  # (H, 1, 1)
    if q_pos.dim() == 1:  # one set of positions for every row
        q_pos, k_pos = q_pos[None], (k_pos[None, None] if k_pos.dim() == 1 else k_pos[None])
    B, Tq = q_pos.shape
    k_pos = k_pos.expand(B, Tq, k_pos.shape[-1])  # (B, Tq, Tk)
    if kind == "mpt":
        dist = (q_pos[:, :, None] - k_pos).to(torch.float32)
        return (-slopes * dist[:, None]).to(dtype)
    # bfloat16 slope times an integer position, rounded to bfloat16, then the model's dtype.
    bias = (slopes.bfloat16() * k_pos[:, None]).to(dtype)
    return bias * scale
