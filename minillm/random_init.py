"""Seeded random weights, for tests, benchmarks and soaks (trained weights come from checkpoints).

`init_random(model, seed=0, std=0.02)` fills every parameter in `named_parameters()` order: those
of norms (scale and bias) with 1 (plus `norm_jitter` x N(0, 1), so a test can see a norm that is
not the identity), everything else with `std` x N(0, 1). One generator on the parameters' device draws them, so the
same (seed, std, norm_jitter) always gives the same model, and a model built on the meta device
and materialised with `to_empty` never holds a float32 copy on the CPU.
"""

from __future__ import annotations

import torch

from .checks import check_int


def is_norm(name: str) -> bool:
    """A norm's parameter: `norm.weight`, `layers.{i}.attn_norm.bias`, `layers.{i}.mlp_norm.weight`, ..."""
    return name.rsplit(".", 1)[0].endswith("norm")


def init_random(model, seed: int = 0, std: float = 0.02, *, norm_jitter: float = 0.0):
    """Fill `model`'s parameters in place (see the module docstring); returns the model in eval mode,
    its parameters without gradients (as `minillm.load` gives a model; `requires_grad_(True)` to train)."""
    check_int("seed", seed, 0)
    first = next(model.parameters())
    g = torch.Generator(device=first.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_norm(name):
                if norm_jitter:
                    p.copy_(1 + norm_jitter * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))
                else:
                    p.fill_(1.0)
            else:
                p.copy_(std * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype))
    return model.requires_grad_(False).eval()  # for inference, as `minillm.load` gives it
