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


@pytest.fixture(autouse=True)
def _fresh_verdicts(monkeypatch):
    monkeypatch.delenv(matvec.ENV, raising=False)
    monkeypatch.setattr(matvec, "_verdicts", {})


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=8, deadline=None)
@given(out=st.integers(1, 40), inn=st.integers(1, 40), rows=st.integers(1, 3), seed=st.integers(0, 99))
def test_every_kernel_equals_the_core_product(dtype, out, inn, rows, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(rows, inn, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(out, generator=g, dtype=torch.float64).to(dtype)
    want = F.linear(x, w, b)
    for kernel in matvec.KERNELS:
        stored = matvec.relaid(w, kernel)
        assert matvec.is_stored_for(stored, kernel) and torch.equal(stored, w)
        assert rel_err(F.linear(x, stored, b), want) < PRODUCT_TOL[dtype], kernel


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
            assert stored == {"rowmajor" if choice == "core" else choice}, stored
        assert any(w is model.embed.weight for w in layout._weights(model)) == tie


def test_a_pinned_choice_is_applied_to_a_loaded_model_on_its_next_call(monkeypatch):
    model = random_model(tiny_config("llama_mha", vocab=61, tie_word_embeddings=True), dtype=torch.float32)
    ids = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        want = model(ids)
        for choice in ("colmajor", "core", "rowmajor"):
            monkeypatch.setenv(matvec.ENV, choice)
            got = model(ids)
            kernel = "rowmajor" if choice == "core" else choice
            assert {matvec.stored_as(w) for w in layout._weights(model)} == {kernel}
            assert rel_err(got, want) < MODEL_TOL[torch.float32]
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

    def fake_probe(out, inn, dtype, threads=None):  # fixed times: nothing is timed here
        calls.append((out, inn, dtype))
        return {"rowmajor": 2.0, "colmajor": 1.0} if out > inn else {"rowmajor": 1.0, "colmajor": 3.0}

    monkeypatch.setattr(matvec, "probe", fake_probe)
    big = 1 << 9  # 512 x 256 float32: 512 KiB, over PROBE_MIN_BYTES
    wide, narrow = torch.zeros(big, big // 2), torch.zeros(big // 2, big)
    assert matvec.choose(wide) == "colmajor" and matvec.choose(narrow) == "rowmajor"
    # Against the rule (wide: column-major) only when the other kernel is at least 10% faster
    monkeypatch.setattr(matvec, "probe", lambda out, inn, dtype, threads=None: (
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


def test_the_probe_runs_and_names_a_kernel_and_leaves_other_devices_alone():
    times = matvec.probe(64, 32, torch.float32)
    assert set(times) == set(matvec.KERNELS) and all(t > 0 for t in times.values())
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
