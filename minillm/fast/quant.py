"""Opt-in weight-only int8: every Linear weight as int8 with one float scale per output row.

    model = minillm.load(path)
    minillm.quantize_int8(model)        # in place; the float weights are freed

Decode is bound by reading the weights, and int8 reads a quarter of float32's bytes. Each product
is `torch._weight_int8pack_mm(x, w_int8, scales)`, which dequantizes inside the kernel, with the
activations rounded to bfloat16 for it and its bfloat16 output cast back to the model's dtype: with
float32 activations that kernel read SmolLM2's int8 weights at 2 GB/s on the AMD EPYC, with
bfloat16 ones at 10 GB/s, 2.5x float32's best product (docs/performance.md, session 7); the rest
of the model computes in its own dtype. Scales are symmetric, absmax / 127 per output row, so a
weight is off by at most half a step of its own row (llama.cpp's Q8_0 keeps one scale per 32 weights, and
rounds the activations to 8 bits).

This is not exact: the streaming properties hold for it (it is the same engine), but its logits
differ from float32's by the rounding of the weights and of the products' inputs and outputs.
tools/bench_real.py measures its perplexity cost on real text and its speed; `minillm ... --int8`
uses it in the CLI. A quantized model cannot be saved (save_pretrained writes float checkpoints
only).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_bool
from ..errors import MiniLLMError


PRODUCT_DTYPE = torch.bfloat16  # the activations' dtype inside the int8 product (input widths of 16k)


class Int8Linear(nn.Module):
    """y = x @ (w_int8 * scale[:, None]).T + bias, with the int8 weight read as int8 (x and the
    product in bfloat16 where the input width is a multiple of 16, else in x's dtype; y in x's)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.detach().float()
        # bfloat16 products need an input width of a multiple of 16 (the kernel crashes otherwise);
        # narrower layers (small test models) multiply in the model's dtype.
        dtype = PRODUCT_DTYPE if w.shape[1] % 16 == 0 else weight.dtype
        self.product_dtype = dtype  # kept through .to()/.half(), which cast the scale buffer
        # The weights are rounded against the scale as stored, so each stays within half its step.
        scale = (w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0).to(dtype)
        q = torch.round(w / scale.float()[:, None]).clamp(-127, 127)
        self.register_buffer("weight_int8", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype, scale = x.shape, self.product_dtype, self.scale
        if scale.dtype != dtype:  # the module was cast since: the product keeps its own dtype
            scale = scale.to(dtype)
        y = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(dtype), self.weight_int8, scale)
        y = y.view(*shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


def quantize_int8(model, *, head: bool = False):
    """Replace every Linear in the decoder with an Int8Linear, in place. CPU only.

    The output head stays in the model's dtype unless `head=True` (then a tied head gets its own
    int8 copy; the embedding table stays float). On SmolLM2 (tools/int8_ppl.py, 8 x 1,024 tokens)
    an int8 head cost +0.18% perplexity of the +0.65% that int8 with the head cost in all, and
    kept the cost over 0.5%; a float head is read once per step, at the float layout's speed."""
    from ..core.model import Model

    if not isinstance(model, Model):
        raise MiniLLMError(f"quantize_int8: model must be a minillm Model, got {type(model).__name__}")
    check_bool("quantize_int8: head", head)
    if model.is_quantized or any(isinstance(m, Int8Linear) for m in model.modules()):
        raise MiniLLMError(f"quantize_int8: the model is already quantized ({model.quantized or 'int8'}); "
                           f"quantize the float model once")
    if model.device.type != "cpu":
        raise MiniLLMError(f"quantize_int8: the int8 kernel is CPU-only here, the model is on {model.device}")
    if model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MiniLLMError(f"quantize_int8: needs a float32, bfloat16 or float16 model, got {model.dtype}")
    if model.dtype == torch.bfloat16:  # torch's bfloat16 int8 kernel crashes the process on other widths
        c = model.config
        odd = [w for w in (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size) if w % 16]
        if odd:
            raise MiniLLMError(f"quantize_int8: in bfloat16 every projection's input width must be a multiple of 16 "
                               f"(torch's int8 kernel fails otherwise); this model has {odd[0]}; use float32")
    for block in model.layers:
        for parent, name in ((block.attn, "wqkv"), (block.attn, "wo"), (block.mlp, "w_in"), (block.mlp, "w_out")):
            lin = getattr(parent, name)
            if isinstance(lin, nn.Linear):
                setattr(parent, name, Int8Linear(lin.weight, lin.bias))
    if head:
        w = model.embed.weight if model.lm_head is None else model.lm_head.weight
        if not isinstance(model.lm_head, Int8Linear):
            model.lm_head = Int8Linear(w, None)
    model.quantized = "int8"
    return model
