"""The opt-in weight-only int8 path (minillm/quant.py): close to float32, the same streaming engine.

int8 is not exact, so these tests bound its error instead of asking for equality: per-row absmax
scales put every weight within half a step (absmax / 254) of its float value. On the shipped
(trained) models that keeps the logits within about 1.3% of float32's (relative to the largest
logit; measured 0.7-1.3%), bounded here at 3%. The streaming properties are the engine's, and
hold for the quantized model exactly as for float. Its perplexity cost on real text is measured
on SmolLM2 by tools/bench_real.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minillm
from minillm.errors import MiniLLMError
from minillm.fast.quant import Int8Linear, quantize_int8
from minillm.reference import reference_stream

from util import rel_err, random_model, tiny_config


WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("name", SHIPPED)
@torch.no_grad()
def test_int8_is_close_to_float32_and_reads_int8(name):
    model, tok = minillm.load(WEIGHTS / name), minillm.load_tokenizer(WEIGHTS / name)
    ids = torch.tensor([tok.encode("It was the best of times, it was the worst of times, it was the age of wisdom, "
                                   "it was the age of foolishness, it was the epoch of belief.")])
    want = model(ids)
    float_head = model.lm_head
    quantize_int8(model)  # the decoder's projections; the head stays float by default
    linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 4 * model.config.num_layers  # every projection
    assert all(m.weight_int8.dtype == torch.int8 for m in linears)
    assert model.lm_head is float_head and not isinstance(model.lm_head, Int8Linear)
    assert all(not isinstance(m, torch.nn.Linear) for layer in model.layers for m in layer.modules())
    assert rel_err(model(ids), want) < 3e-2
    model, _ = minillm.load(WEIGHTS / name), None
    quantize_int8(model, head=True)  # and the head (a tied one as its own int8 copy)
    assert isinstance(model.lm_head, Int8Linear) and not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert rel_err(model(ids), want) < 3e-2


@pytest.mark.parametrize("width", [40, 48])
def test_int8_weights_are_within_half_a_step(width):
    """Width 40: the product in float32, as x; width 48 (a multiple of 16): in bfloat16 (x rounded to
    bfloat16, float32 sums, the output rounded to bfloat16), so within a few bfloat16 steps."""
    w = torch.randn(24, width) * torch.logspace(-3, 1, 24)[:, None]  # rows of very different scales
    lin = Int8Linear(w, None)
    assert lin.scale.dtype == (torch.bfloat16 if width % 16 == 0 else torch.float32)
    back = lin.weight_int8.float() * lin.scale.float()[:, None]
    assert ((back - w).abs() <= lin.scale.float()[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, width)
    got = lin(x)
    assert got.dtype == torch.float32
    if width % 16:
        assert torch.allclose(got, x @ back.T, rtol=1e-5, atol=1e-5)
    else:  # against the float64 product of the bfloat16-rounded input: the output's own rounding and the sums'
        want = (x.bfloat16().double() @ back.double().T)
        assert ((got.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-3 * want.abs().max()).all()


@torch.no_grad()
def test_int8_streaming_equals_its_own_reference():
    """The quantized model is still the same engine: streaming with eviction equals the paper's
    list algorithm run on the same (quantized) layers, to float32 rounding."""
    model = quantize_int8(random_model(tiny_config("llama_gqa", head_dim=16), dtype=torch.float32), head=False)
    ids = torch.randint(0, 61, (1, 30), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(1, sinks=2, window=7)
    got = torch.cat([model(ids[:, a:b], cache=cache) for a, b in ((0, 11), (11, 12), (12, 30))], dim=1)
    assert rel_err(got, reference_stream(model, ids, 2, 7)) < 1e-5


def test_int8_refusals(tmp_path):
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32)
    with pytest.raises(MiniLLMError, match="minillm Model"):
        quantize_int8("weights/llama-tiny")
    with pytest.raises(MiniLLMError, match="float32, bfloat16 or float16"):
        quantize_int8(random_model(tiny_config("llama_gqa")))  # float64
    quantize_int8(model)
    with pytest.raises(MiniLLMError, match="quantized"):
        minillm.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_int8_bfloat16_needs_widths_of_16():
    # torch's bfloat16 int8 kernel crashes the process on other input widths: refused up front.
    with pytest.raises(MiniLLMError, match="multiple of 16"):
        quantize_int8(random_model(tiny_config("llama_gqa"), dtype=torch.bfloat16))  # intermediate 68
    model = quantize_int8(random_model(tiny_config("llama_gqa", heads=4, head_dim=16, intermediate_size=64),
                                       dtype=torch.bfloat16))
    assert model(torch.randint(0, 61, (1, 5))).shape == (1, 5, 61)


@pytest.mark.parametrize("width", [40, 48])
def test_int8_products_keep_their_dtype_when_the_model_is_cast(width):
    """.to()/.half() cast the scale buffer; the product keeps the dtype it was built for (bfloat16
    for widths of 16k, else the model's), so a cast neither loses the bfloat16 kernel nor takes a
    width the bfloat16 kernel cannot (NaN or a crash)."""
    w = torch.randn(24, width)
    lin = Int8Linear(w, None)
    x = torch.randn(2, width)
    want = lin(x)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lin.to(dtype)
        got = lin(x.to(dtype))
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert rel_err(got, want) < 2e-2, dtype
