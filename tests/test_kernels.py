"""The per-machine weight layouts (minillm/fast/matvec.py, layout.py) compute what the core computes.

The probe only decides which stored layout a weight gets; whichever it picks, every product must
equal the core's row-major `F.linear` (float64 within 1e-12, float32 within 1e-5, relative: the
layouts differ only in the order of the additions), and a model's logits the core's (float64 1e-9,
float32 1e-4, as tests/test_fast.py). Nothing here times anything: the probe's verdict is tested
with a stand-in probe that reports fixed times, and which kernel the real probe picks on this
machine does not change any assertion.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm
from minillm.errors import MiniLLMError
from minillm.fast import layout, matvec
from util import random_model, rel_err, tiny_config

PRODUCT_TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
MODEL_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def _operands(dtype, out: int, inn: int, rows: int, seed: int):
    """A weight (out, in) and rows x (rows, in), drawn in float64 and rounded to `dtype`."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inn, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(rows, inn, generator=g, dtype=torch.float64).to(dtype), g)


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch):
    monkeypatch.delenv(matvec.ENV, raising=False)
    monkeypatch.setattr(matvec, "_verdicts", {})
    monkeypatch.setattr(matvec, "_times", {})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=8, deadline=None)
@given(out=st.integers(1, 40), inn=st.integers(1, 40), rows=st.integers(1, 3), seed=st.integers(0, 99))
def test_every_kernel_equals_the_core_product(dtype, out, inn, rows, seed):
    w, x, g = _operands(dtype, out, inn, rows, seed)
    b = torch.randn(out, generator=g, dtype=torch.float64).to(dtype)
    want = F.linear(x, w, b)
    for kernel in matvec.KERNELS:
        stored = matvec.relaid(w, kernel)
        assert matvec.is_stored_for(stored, kernel) and torch.equal(stored, w)
        assert rel_err(F.linear(x, stored, b), want) < PRODUCT_TOL[dtype], kernel
        if kernel in matvec._kernels(dtype):
            arg = stored.t() if kernel == "colmajor" else stored  # the probe's (in, out) buffer
            assert rel_err(matvec._product(kernel, x, arg) + b, want) < PRODUCT_TOL[dtype], kernel
    if dtype == torch.float32:  # OneDNNLinear: oneDNN for a few rows, F.linear for more, or for autograd
        lin = torch.nn.Linear(inn, out)
        with torch.no_grad():
            lin.weight.copy_(w), lin.bias.copy_(b)
        lin.__class__ = matvec.OneDNNLinear
        for xs in (x, x.repeat(matvec.ONEDNN_ROWS, 1)):  # rows, and more than ONEDNN_ROWS
            with torch.no_grad():
                assert rel_err(lin(xs), F.linear(xs, w, b)) < PRODUCT_TOL[dtype]
        y = lin(x)  # with autograd: F.linear's, so the gradient is right
        y.sum().backward()
        assert rel_err(lin.weight.grad, torch.ones(out, 1) @ x.sum(0, keepdim=True)) < PRODUCT_TOL[dtype]


def _side_by_side(variant: str, dtype, tie: bool):
    """A fast model (layouts as MINILLM_KERNELS says) and the core on the same weights: prefill past
    S, then decode steps; the worst relative error of the logits."""
    config = tiny_config(variant, vocab=61, tie_word_embeddings=tie)
    fast = random_model(config, dtype=dtype)
    core = random_model(config, dtype=dtype, fast=False)
    ids = torch.randint(0, 61, (2, 14), generator=torch.Generator().manual_seed(1))
    worst = 0.0
    with torch.no_grad():
        caches = [m.new_cache(2, sinks=2, window=6) for m in (fast, core)]
        outs = [m(ids, cache=c) for m, c in zip((fast, core), caches)]
        worst = rel_err(*outs)
        tok = ids[:, -1:]
        for _ in range(5):
            outs = [m(tok, cache=c) for m, c in zip((fast, core), caches)]
            worst = max(worst, rel_err(*outs))
            tok = outs[1][:, -1].argmax(-1, keepdim=True)
        worst = max(worst, rel_err(fast(ids), core(ids)))
    return fast, worst


@pytest.mark.parametrize("choice", ["probe", "core", *matvec.KERNELS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_choice_gives_the_core_logits(choice, dtype, monkeypatch):
    monkeypatch.setenv(matvec.ENV, choice)
    for variant, tie in (("llama_gqa", True), ("falcon_rw", False)):
        model, worst = _side_by_side(variant, dtype, tie)
        assert worst < MODEL_TOL[dtype], (variant, worst)
        stored = {matvec.stored_as(w) for w in layout._weights(model)}
        if choice != "probe":  # a pinned choice is every weight's, the tied embedding included
            assert stored == {"colmajor" if choice == "colmajor" else "rowmajor"}, stored
        assert not layout.decodes_natively(model)  # float64/float32: oneDNN computes none of these products
        onednn = {type(m) is matvec.OneDNNLinear for m in model.modules() if isinstance(m, torch.nn.Linear)}
        if choice != "probe":  # "onednn": every float32 Linear (a tied head stays row-major); float64: none
            assert onednn == {choice == "onednn" and dtype == torch.float32}, onednn
        assert any(w is model.embed.weight for w in layout._weights(model)) == tie


def test_a_pinned_choice_is_applied_to_a_loaded_model_on_its_next_call(monkeypatch):
    model = random_model(tiny_config("llama_mha", vocab=61, tie_word_embeddings=True), dtype=torch.float32)
    ids = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        want = model(ids)
        for choice in ("colmajor", "onednn", "core", "rowmajor"):
            monkeypatch.setenv(matvec.ENV, choice)
            got = model(ids)
            kernel = "colmajor" if choice == "colmajor" else "rowmajor"
            assert {matvec.stored_as(w) for w in layout._weights(model)} == {kernel}
            classes = {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
            assert classes == {matvec.OneDNNLinear if choice == "onednn" else torch.nn.Linear}, classes
            assert rel_err(got, want) < MODEL_TOL[torch.float32]
        monkeypatch.setenv(matvec.ENV, "onednn")
        model(ids)
        minillm.fast.disable(model)  # the core alone: plain Linears again
        assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
        assert rel_err(model(ids), want) < MODEL_TOL[torch.float32]
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in random_model(model.config, dtype=torch.float32,
                                                              fast=False).state_dict().items())


def test_an_unknown_kernel_name_is_one_line_naming_the_choices(monkeypatch):
    model = random_model(tiny_config("llama_mha", vocab=61), dtype=torch.float32)
    monkeypatch.setenv(matvec.ENV, "avx9000")
    for call in (lambda: minillm.fast.enable(model), lambda: model(torch.zeros(1, 2, dtype=torch.long))):
        with pytest.raises(MiniLLMError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "avx9000" in msg
        assert all(name in msg for name in (*matvec.MODES, *matvec.KERNELS)), msg


def test_the_probe_keeps_the_faster_kernel_once_per_shape_dtype_and_threads(monkeypatch):
    calls = []

    def fake_probe(out, inn, dtype, threads=None, rows=1):  # fixed times: nothing is timed here
        calls.append((out, inn, dtype))
        return {"rowmajor": 2.0, "colmajor": 1.0} if out > inn else {"rowmajor": 1.0, "colmajor": 3.0}

    monkeypatch.setattr(matvec, "probe", fake_probe)
    big = 1 << 9  # 512 x 256 float32: 512 KiB, over PROBE_MIN_BYTES
    wide, narrow = torch.zeros(big, big // 2), torch.zeros(big // 2, big)
    assert matvec.choose(wide) == "colmajor" and matvec.choose(narrow) == "rowmajor"
    # Against the rule (wide: column-major) only when the other kernel is at least 10% faster
    monkeypatch.setattr(matvec, "probe", lambda out, inn, dtype, threads=None, rows=1: (
        calls.append(0), {"rowmajor": 0.5, "colmajor": 1.0} if out == 3 * big else {"rowmajor": 0.95, "colmajor": 1.0})[1])
    assert matvec.choose(torch.zeros(3 * big, big // 2)) == "rowmajor"
    assert matvec.choose(torch.zeros(5 * big, big // 2)) == "colmajor"  # 5% is noise: the rule
    del calls[-2:]
    monkeypatch.setattr(matvec, "probe", fake_probe)
    assert matvec.choose(wide.clone()) == "colmajor" and len(calls) == 2  # cached per shape
    matvec.choose(wide.double())
    assert len(calls) == 3  # another dtype is another verdict
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        matvec.choose(wide)
        assert len(calls) == 4  # another thread count too
    finally:
        torch.set_num_threads(threads)
    assert matvec.choose(torch.zeros(3, 2)) == "colmajor" and len(calls) == 4  # small: the rule, no probe
    # A float32 Linear may take "onednn" when it is the fastest by the margin; a tied head may not
    monkeypatch.setattr(matvec, "probe", lambda out, inn, dtype, threads=None, rows=1: {
        "rowmajor": 1.0, "colmajor": 0.8, "onednn": 0.5})
    assert matvec.choose(torch.zeros(7 * big, big // 2)) == "onednn"
    assert matvec.choose(torch.zeros(7 * big, big // 2), linear=False) == "colmajor"


def test_the_probe_runs_and_names_a_kernel_and_leaves_other_devices_alone():
    for dtype, extra in ((torch.float64, ()), (torch.float32, ("onednn",)), (torch.bfloat16, ("native",))):
        times = matvec.probe(64, 32, dtype)  # only the kernels that differ for the dtype
        assert set(times) == set(matvec.LAYOUTS + extra) and all(t > 0 for t in times.values()), dtype
    assert torch._C._get_mkldnn_enabled()
    assert matvec.choose(torch.empty(4096, 64, device="meta")) == "rowmajor"  # not a CPU weight: as usual
    assert matvec.choose(torch.zeros(4096, 64, dtype=torch.int8)) is None  # int8: quant.py's kernel


def test_a_model_moved_off_the_cpu_gets_the_usual_layout_back(monkeypatch):
    monkeypatch.setenv(matvec.ENV, "colmajor")
    model = random_model(tiny_config("llama_gqa", vocab=61, tie_word_embeddings=True), dtype=torch.float32)
    assert {matvec.stored_as(w) for w in layout._weights(model)} == {"colmajor"}
    model.to("meta")  # .to keeps the strides; another device must not keep the CPU's layout
    layout.ensure(model)
    assert all(w.device.type == "meta" and w.is_contiguous() for w in layout._weights(model))


def test_the_cli_refuses_an_unknown_kernel_name_in_one_line(monkeypatch, capsys):
    from pathlib import Path

    from minillm import cli

    monkeypatch.setenv(matvec.ENV, "avx9000")
    llama = Path(__file__).resolve().parents[1] / "weights" / "llama-tiny"
    rc = cli.main(["generate", str(llama), "--prompt", "hi", "--max-new-tokens", "2", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("minillm: error: ") and "avx9000" in err[0], err


# --- "native": a one-row bfloat16/float16 decode step with oneDNN off (matvec.decode_kernel) ---

BF16_TOL = 6e-2  # bfloat16 keeps 8 bits; the core's own bfloat16 logits are 2-4% off float64's here


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@settings(max_examples=6, deadline=None)
@given(out=st.integers(1, 70), inn=st.integers(1, 70), rows=st.integers(1, 3), seed=st.integers(0, 99))
def test_the_native_product_is_the_product_in_reduced_precision(dtype, out, inn, rows, seed):
    w, x, _ = _operands(dtype, out, inn, rows, seed)
    exact = x.double() @ w.double().T  # the product of the rounded inputs
    native, core = matvec._product("native", x, w), F.linear(x, w)
    assert native.dtype == dtype and torch._C._get_mkldnn_enabled()
    scale = exact.abs().max().item() + 1e-30
    for got in (native, core):  # each within its sums' and its output's rounding
        assert (got.double() - exact).abs().max().item() <= 2 ** -7 * scale * (1 + inn / 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_native_model_decodes_one_row_natively_and_equals_the_core(dtype, monkeypatch):
    """MINILLM_KERNELS=native: every weight row-major; a one-row decode step runs with oneDNN off
    (and leaves it on), a two-row step and prefill with it on; the logits within bfloat16 rounding
    of the core's on the same weights, both within it of float64."""
    monkeypatch.setenv(matvec.ENV, "native")
    config = tiny_config("llama_gqa", vocab=61, tie_word_embeddings=True)
    fast = random_model(config, dtype=dtype)
    core = random_model(config, dtype=dtype, fast=False)
    exact = random_model(config, dtype=torch.float64, fast=False)
    exact.load_state_dict({k: v.double() for k, v in core.state_dict().items()})
    assert layout.decodes_natively(fast) and {matvec.stored_as(w) for w in layout._weights(fast)} == {"rowmajor"}
    seen = []
    real = fast._step

    def spy(*args, **kwargs):
        seen.append(torch._C._get_mkldnn_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(fast, "_step", spy)
    ids = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        caches = [m.new_cache(1, sinks=2, window=6) for m in (fast, core, exact)]
        outs = [m(ids, cache=c) for m, c in zip((fast, core, exact), caches)]
        tok = ids[:, -1:]
        for _ in range(4):
            outs = [m(tok, cache=c) for m, c in zip((fast, core, exact), caches)]
            native, core_err = rel_err(outs[0], outs[2]), rel_err(outs[1], outs[2])
            assert rel_err(outs[0], outs[1]) < BF16_TOL and native < 2 * core_err + 1e-2, (native, core_err)
            tok = outs[2][:, -1].argmax(-1, keepdim=True)
        two = fast.new_cache(2, sinks=2, window=6)
        fast(ids.expand(2, -1), cache=two)
        fast(tok.expand(2, -1), cache=two)
    assert seen == [True] + [False] * 4 + [True, True], seen  # prefill, 4 one-row steps, a 2-row prefill and step
    assert torch._C._get_mkldnn_enabled()


def test_native_is_chosen_per_model_from_the_probe_times(monkeypatch):
    times = {"rowmajor": 1.0, "colmajor": 1.2, "native": 0.5}
    monkeypatch.setattr(matvec, "probe", lambda out, inn, dtype, threads=None, rows=1: (
        dict(times) if dtype in matvec.REDUCED else {"rowmajor": 1.0, "colmajor": 1.2}))
    big = [torch.zeros(512, 256, dtype=torch.bfloat16), torch.zeros(256, 512, dtype=torch.bfloat16)]  # 256 KiB each
    assert matvec.decode_kernel(big) == "native"
    assert matvec.decode_kernel([w.float() for w in big]) is None  # float32: never
    assert matvec.decode_kernel([torch.zeros(8, 8, dtype=torch.bfloat16)]) is None  # small: read from the cache
    assert matvec.decode_kernel(big + [torch.zeros(8, 8)]) is None  # a float32 weight among them
    monkeypatch.setattr(matvec, "_times", {})
    times["native"] = 0.95  # within 10% of the layouts: noise, not a reason
    assert matvec.decode_kernel(big) is None
    monkeypatch.setenv(matvec.ENV, "rowmajor")
    times["native"] = 0.1
    assert matvec.decode_kernel(big) is None  # a pinned layout
    monkeypatch.setenv(matvec.ENV, "native")
    assert matvec.decode_kernel(big) == "native"


def test_onednn_off_restores_the_switch_once_across_overlapping_threads():
    import threading

    assert torch._C._get_mkldnn_enabled()
    inside, release = threading.Event(), threading.Event()

    def hold():
        with matvec.onednn_off():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    inside.wait(10)
    with matvec.onednn_off():
        assert not torch._C._get_mkldnn_enabled()
    assert not torch._C._get_mkldnn_enabled()  # the other thread is still inside
    release.set()
    t.join(10)
    assert torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)  # a user's own choice is what it restores to
    try:
        with matvec.onednn_off():
            pass
        assert not torch._C._get_mkldnn_enabled()
    finally:
        torch._C._set_mkldnn_enabled(True)


def test_batches_alone_may_take_onednn_and_one_row_keeps_its_layout(monkeypatch):
    """batch_onednn: a float32 Linear whose one-row verdict is a layout, but whose BATCH_ROWS-row
    product is faster by oneDNN, gets OneDNNLinear for 2 to ONEDNN_ROWS rows only."""
    def fake(out, inn, dtype, threads=None, rows=1):
        return {"rowmajor": 1.0, "colmajor": 1.0, "onednn": 1.0 if rows == 1 else 0.5}

    monkeypatch.setattr(matvec, "probe", fake)
    w = torch.randn(512, 256) * 0.1  # 512 KiB: probed
    assert matvec.choose(w) == "colmajor" and matvec.batch_onednn(w)
    assert not matvec.batch_onednn(w.double()) and not matvec.batch_onednn(torch.zeros(8, 8))
    monkeypatch.setattr(matvec, "PROBE_MIN_BYTES", 0)  # a tiny model's weights probed too (by `fake`)
    model = random_model(tiny_config("llama_gqa", vocab=61), dtype=torch.float32)
    lin = model.layers[0].mlp.w_in
    w = lin.weight.detach().clone()
    assert type(lin) is matvec.OneDNNLinear and lin.onednn_from == 2
    assert matvec.stored_as(lin.weight) == matvec._rule(w)
    calls = []
    real = matvec._onednn
    monkeypatch.setattr(matvec, "_onednn", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    with torch.no_grad():
        for rows in (1, 2, matvec.ONEDNN_ROWS, matvec.ONEDNN_ROWS + 1):
            x = torch.randn(rows, w.shape[1])
            assert rel_err(lin(x), F.linear(x, w, lin.bias)) < PRODUCT_TOL[torch.float32]
    assert [s[0] for s in calls] == [2, matvec.ONEDNN_ROWS], calls
    monkeypatch.setenv(matvec.ENV, "colmajor")  # a pinned layout: no oneDNN at all
    layout.ensure(model)
    assert type(lin) is torch.nn.Linear


def test_onednn_linears_fall_back_where_onednn_cannot_serve(monkeypatch):
    """A model cast to float16 after its float32 layout was fitted, on paths that do not refit
    (explicit attention probabilities, zero-sink configs); and inside torch.compile, whose inductor
    lowers oneDNN's op only for frozen weights: F.linear, and the same logits."""
    monkeypatch.setenv(matvec.ENV, "onednn")
    calls = []
    real = matvec._onednn
    monkeypatch.setattr(matvec, "_onednn", lambda *a: (calls.append(a[0].dtype), real(*a))[1])
    ids = torch.randint(0, 61, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for zero_sink in (False, True):
            model = random_model(tiny_config("llama_gqa", vocab=61, zero_sink=zero_sink), dtype=torch.float32)
            assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {matvec.OneDNNLinear}
            model.half()
            probs = []
            assert torch.isfinite(model(ids, attn_probs=probs).float()).all() and probs
            assert torch.isfinite(model(ids).float()).all()
        assert torch.float16 not in calls
        model = random_model(tiny_config("llama_gqa", vocab=61), dtype=torch.float32)
        want = model(ids[:, :1])
        calls.clear()
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert rel_err(model(ids[:, :1]), want) < MODEL_TOL[torch.float32] and calls == []


def test_a_column_major_weight_takes_batched_onednn_by_its_own_layouts_time(monkeypatch):
    """batch_onednn times oneDNN on the layout the weight keeps: column-major here."""
    def fake(out, inn, dtype, threads=None, rows=1):
        if rows == 1:
            return {"rowmajor": 2.0, "colmajor": 1.0, "onednn": 1.5}
        return {"rowmajor": 1.0, "colmajor": 1.0, "onednn": 0.5, "onednn@colmajor": slow}

    monkeypatch.setattr(matvec, "probe", fake)
    w = torch.zeros(512, 256)
    slow = 0.95
    assert matvec.choose(w) == "colmajor" and not matvec.batch_onednn(w)
    monkeypatch.setattr(matvec, "_times", {})
    slow = 0.5
    assert matvec.batch_onednn(w)
    times = matvec.probe(64, 32, torch.float32, rows=4)  # the real probe times it for batches
    assert "onednn@colmajor" in times and "onednn@colmajor" not in matvec.probe(64, 32, torch.float32)
