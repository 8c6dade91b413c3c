"""Every fast path (minillm/fast/) computes what the core (minillm/core/) computes.

The core is the engine as written in the paper's terms (explicit scores under the contract's key
sets); the fast layer only makes it faster. Each fast path is forced on the CPU and run side by side
with the core, on one model (the fast layer switched on and off between calls, so the weights are
the same objects) and two caches, over Hypothesis-drawn ragged schedules of every variant in
`util.VARIANTS` (RoPE, partial rotary, both ALiBi forms, MHA/GQA/MQA, parallel residual):

  1. the split sink kernel (`FastPath(chunk_kernel="split")`), on chunks past S;
  2. the doubled-head sink kernel (`chunk_kernel="doubled"`), the chunk path of every non-CPU
     device, on chunks past S;
  3. the lockstep decode step (rows at one position, through and past S);
  4. the per-row decode step (`decode="rows"`: rows at different positions, idle rows, resets);
  5. the compiled per-row decode step (`compile_decode`), which also compiles once while rows
     move, start and idle.

Every call's logits at the consumed positions agree within float64 1e-9 / float32 1e-4 (relative,
`util.rel_err`), and so do the caches (values, raw sinks and every window slot: the layout is
shared, so a stream can move between the layers mid-way, which (6) does). A planted bug in each
kernel is caught by the same check (7). With `fast=False`, no code of minillm/fast/ runs (8).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm.fast
from minillm.fast import FastPath, kernels
from util import VARIANTS, random_model, rel_err, tiny_config

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
VOCAB = 61
EXAMPLES = settings().max_examples  # ci: 40, default: 10
variants = pytest.mark.parametrize("variant", list(VARIANTS))
WORST: dict[tuple[str, str], float] = {}  # (path, dtype) -> worst relative error, printed at the end


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if WORST and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\nfast paths against the core, worst relative error:")
            for (path, dtype), err in sorted(WORST.items()):
                reporter.write_line(f"  {path:<10} {dtype:<8} {err:.3g}")


def record(path: str, dtype, err: float) -> None:
    key = (path, str(dtype).removeprefix("torch."))
    WORST[key] = max(WORST.get(key, 0.0), err)


@dataclass
class Setup:
    size: dict
    seed: int
    B: int
    sinks: int
    window: int


@st.composite
def setups(draw, min_sinks: int = 0) -> Setup:
    size = dict(heads=draw(st.sampled_from([2, 4])), head_dim=draw(st.sampled_from([4, 8])),
                layers=draw(st.integers(1, 2)))
    return Setup(size=size, seed=draw(st.integers(0, 2**16)), B=draw(st.integers(1, 3)),
                 sinks=draw(st.integers(min_sinks, 3)), window=draw(st.integers(1, 6)))


# A schedule is a list of calls; a call is (lengths per row, or None for every row alike; rows to reset first).
@st.composite
def chunk_schedules(draw, B: int, S: int):
    """First every row past S in one chunk (the sink correction, rows alike), then ragged chunks."""
    calls = [(None, (), draw(st.integers(S + 1, 3 * S)))]
    for _ in range(draw(st.integers(1, 3))):
        lengths = draw(st.lists(st.integers(0, 3 * S), min_size=B, max_size=B))
        calls.append((lengths, tuple(draw(st.sets(st.integers(0, B - 1), max_size=1))), max(1, max(lengths))))
    return calls


@st.composite
def lockstep_schedules(draw, B: int, S: int):
    """A prefill (uniform), then decode steps with every row at one position, through and past S."""
    return [(None, (), draw(st.integers(1, 2 * S)))] + [(None, (), 1)] * draw(st.integers(1, 2 * S + 2))


@st.composite
def row_schedules(draw, B: int, S: int):
    """A ragged prefill, then decode steps with some rows idle and now and then a row reset."""
    calls = [(draw(st.lists(st.integers(0, 2 * S), min_size=B, max_size=B)), (), 2 * S)]
    for _ in range(draw(st.integers(1, 2 * S + 2))):
        lengths = draw(st.lists(st.integers(0, 1), min_size=B, max_size=B))
        reset = tuple(draw(st.sets(st.integers(0, B - 1), max_size=1))) if draw(st.integers(0, 5)) == 0 else ()
        calls.append((lengths, reset, 1))
    return calls


def side_by_side(model, fast: FastPath, s: Setup, calls, dtype, seed: int = 0, switch_at: int | None = None):
    """Run `calls` through the core (cache a) and the fast path (cache b), comparing every call.

    switch_at: from that call on, the two caches trade layers (the fast one continues on the
    core, and the other way round), so a stream moves between them mid-way. Returns the worst error."""
    caches = [model.new_cache(s.B, s.sinks, s.window) for _ in range(2)]
    paths = [None, fast]
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for i, (lengths, reset, n) in enumerate(calls):
        if i == switch_at:
            paths = paths[::-1]
        ids = torch.randint(0, VOCAB, (s.B, n), generator=g)
        outs = []
        for cache, path in zip(caches, paths):
            if reset:
                cache.reset(list(reset))
            model.fast = path
            outs.append(model(ids, cache=cache, lengths=lengths))
        model.fast = fast
        for b in range(s.B):
            used = n if lengths is None else lengths[b]
            if used:
                err = rel_err(outs[1][b, :used], outs[0][b, :used])
                worst = max(worst, err)
                assert err < TOL[dtype], f"call {i} ({lengths or n}), row {b}: logits differ by {err:.3g}"
        a, c = caches
        assert torch.equal(a.tokens_seen, c.tokens_seen)
        # The sink slots of k are the fast decode's working copy (rotated into the last query's
        # frame); the raw sinks are the stream's state, and every other slot must agree.
        for name, x, y in (("k", a.k[:, :, :, s.sinks:], c.k[:, :, :, s.sinks:]), ("v", a.v, c.v),
                           ("raw_sink_k", a.raw_sink_k, c.raw_sink_k)):
            if x is not None and x.abs().max() > 0:
                err = rel_err(y, x)
                assert err < TOL[dtype], f"call {i}: cache.{name} differs by {err:.3g}"
    return worst


def model_for(variant: str, s: Setup, dtype, **fast_options):
    model = random_model(tiny_config(variant, vocab=VOCAB, **s.size), dtype=dtype, seed=s.seed, **fast_options)
    return model, model.fast


def check(path, variant, data, schedule, dtype, *, min_sinks=0, **fast_options):
    s = data.draw(setups(min_sinks=min_sinks))
    model, fast = model_for(variant, s, dtype, **fast_options)
    calls = data.draw(schedule(s.B, s.sinks + s.window))
    with torch.no_grad():
        record(path, dtype, side_by_side(model, fast, s, calls, dtype, seed=s.seed))


# ---------------------------------------------------------------------------------------------
# 1-4: each path against the core, every variant, float64 and float32.

@pytest.mark.skipif(kernels.SPLIT_SDPA is None, reason="this torch has no CPU flash attention with log-sum-exp")
@variants
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_1_split_kernel_equals_the_core(variant, dtype, data):
    check("split", variant, data, chunk_schedules, dtype, min_sinks=1, chunk_kernel="split")


@variants
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_2_doubled_head_kernel_equals_the_core(variant, dtype, data):
    check("doubled", variant, data, chunk_schedules, dtype, min_sinks=1, chunk_kernel="doubled")


@variants
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_3_lockstep_decode_equals_the_core(variant, dtype, data):
    check("lockstep", variant, data, lockstep_schedules, dtype)


@variants
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_4_per_row_decode_equals_the_core(variant, dtype, data):
    check("per-row", variant, data, row_schedules, dtype, decode="rows")


def test_the_forced_paths_are_the_ones_taken(monkeypatch):
    """The properties above test what they name: each forced kernel is called, the other is not."""
    s = Setup(size=dict(heads=4, head_dim=8, layers=1), seed=1, B=2, sinks=2, window=4)
    calls = [(None, (), 9), ([7, 3], (), 7)]
    for kernel, used, unused in (("split", "_split", "_doubled"), ("doubled", "_doubled", "_split")):
        seen = {"_split": 0, "_doubled": 0}
        for name in seen:
            real = getattr(kernels, name)
            monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name, **k: (seen.__setitem__(_n, seen[_n] + 1),
                                                                                _r(*a, **k))[1])
        model, fast = model_for("llama_gqa", s, torch.float64, chunk_kernel=kernel)
        with torch.no_grad():
            side_by_side(model, fast, s, calls, torch.float64)
        assert seen[used] > 0 and seen[unused] == 0, (kernel, seen)
        monkeypatch.undo()
    model, fast = model_for("llama_gqa", s, torch.float64, decode="rows")
    plan = fast.plan(model, 1, model.new_cache(2, 2, 4), None)
    assert plan.n_valid == 6 and plan.mask.shape == (2, 1, 1, 6)  # the per-row form, though the rows are alike


# ---------------------------------------------------------------------------------------------
# 5: the compiled per-row step: equal to the core, one graph whatever the rows do.

@pytest.mark.parametrize("variant", ["llama_gqa", "mpt"])
def test_5_compiled_per_row_decode_equals_the_core_and_compiles_once(variant):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    s = Setup(size=dict(heads=4, head_dim=8, layers=1), seed=3, B=3, sinks=2, window=5)
    model, fast = model_for(variant, s, torch.float32, decode="rows")
    minillm.fast.compile_decode(model)
    worst = []

    @settings(max_examples=max(4, EXAMPLES // 4))
    @given(calls=row_schedules(s.B, s.sinks + s.window), seed=st.integers(0, 1000))
    def prop(calls, seed):
        with torch.inference_mode():
            worst.append(side_by_side(model, fast, s, calls, torch.float32, seed=seed))

    try:
        prop()
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # rows moved, started, idled
    finally:
        torch._dynamo.reset()
        counters.clear()
    record("compiled", torch.float32, max(worst))


# ---------------------------------------------------------------------------------------------
# 6: a stream moves between the layers mid-way.

@variants
@settings(max_examples=max(4, EXAMPLES // 2))
@given(data=st.data())
def test_6_a_stream_moves_between_core_and_fast_mid_way(variant, data):
    s = data.draw(setups())
    model, fast = model_for(variant, s, torch.float64)
    calls = data.draw(chunk_schedules(s.B, s.sinks + s.window)) + data.draw(row_schedules(s.B, s.sinks + s.window))
    with torch.no_grad():
        record("moved", torch.float64, side_by_side(model, fast, s, calls, torch.float64, seed=s.seed,
                                                    switch_at=data.draw(st.integers(1, len(calls)))))


# ---------------------------------------------------------------------------------------------
# 7: a planted bug in each path fails the check above.

def _without_correction(c, q, keys, values, raw_q, mask, sink, cache, layer):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=c.scale, enable_gqa=True)


PLANTS = {
    # The doubled-head kernel that forgets the sinks' own frame (the keys as stored, at t - i).
    "doubled": ("_doubled", _without_correction, dict(chunk_kernel="doubled"), chunk_schedules),
    # The split kernel that drops its sink part (window attention where the sinks are due).
    "split": ("_split", lambda c, q, keys, values, raw_q, sink, cache, layer: kernels.SPLIT_SDPA(
        q, keys, values, attn_mask=sink.window_mask, scale=c.scale)[0], dict(chunk_kernel="split"), chunk_schedules),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_7_a_planted_bug_is_caught(plant, monkeypatch):
    name, bad, options, schedule = PLANTS[plant]
    monkeypatch.setattr(kernels, name, bad)
    s = Setup(size=dict(heads=4, head_dim=8, layers=1), seed=5, B=2, sinks=2, window=4)
    model, fast = model_for("llama_gqa", s, torch.float64, **options)
    with torch.no_grad(), pytest.raises(AssertionError, match="logits differ"):
        side_by_side(model, fast, s, [(None, (), 13), ([9, 4], (), 9)], torch.float64)


def test_7_a_planted_decode_bug_is_caught(monkeypatch):
    # The per-row step that rotates the sinks one position too far.
    from minillm.fast import decode

    real = decode.rope_tables
    monkeypatch.setattr(decode, "rope_tables", lambda pos, *a: real(pos + (pos.dim() == 2), *a))
    s = Setup(size=dict(heads=4, head_dim=8, layers=1), seed=5, B=2, sinks=2, window=4)
    model, fast = model_for("llama_gqa", s, torch.float64, decode="rows")
    with torch.no_grad(), pytest.raises(AssertionError, match="logits differ"):
        side_by_side(model, fast, s, [([8, 3], (), 8)] + [([1, 1], (), 1)] * 4, torch.float64)


# ---------------------------------------------------------------------------------------------
# 8: fast=False runs the core alone; the fast layer declines what only explicit scores serve.

def test_8_without_the_fast_layer_no_fast_code_runs():
    code = textwrap.dedent(f"""
        import sys, torch
        calls = set()
        def profile(frame, event, arg):
            if event == "call":
                calls.add(frame.f_code.co_filename)
        sys.setprofile(profile)
        import minillm
        model = minillm.load({str(REPO / "weights" / "llama-tiny")!r}, fast=False)
        tok = minillm.load_tokenizer({str(REPO / "weights" / "llama-tiny")!r})
        cache = model.new_cache(2, 4, 12)
        ids = torch.tensor([tok.encode("It was a dark and stormy night")] * 2)
        with torch.no_grad():
            model(ids, cache=cache)                                   # prefill past S
            model(ids[:, :1], cache=cache)                            # lockstep decode
            model(ids[:, :1], cache=cache, lengths=[1, 0])            # per-row decode
        list(minillm.generate(model, ids[0].tolist(), max_new_tokens=5, sinks=4, window=8, temperature=0))
        list(minillm.generate_batch(model, [ids[0].tolist(), [1, 2]], batch_size=2, max_new_tokens=3, sinks=4,
                                    window=8))
        sys.setprofile(None)
        fast = sorted(f for f in calls if "minillm/fast" in f.replace("\\\\", "/"))
        assert model.fast is None and not fast, fast
        assert not any(m.startswith("minillm.fast") for m in sys.modules), [m for m in sys.modules if "fast" in m]
        print("core only:", len([f for f in calls if "minillm/core" in f.replace("\\\\", "/")]), "core files")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and "core only:" in r.stdout and "core only: 0 " not in r.stdout, r.stdout + r.stderr


def test_8_the_fast_layer_is_on_by_default_and_declines_what_needs_explicit_scores():
    model = minillm.load(REPO / "weights" / "llama-tiny")
    assert isinstance(model.fast, FastPath)
    cache = model.new_cache(1, 2, 6)
    assert model.fast.plan(model, 3, cache, None) is not None
    zero = random_model(tiny_config("llama_gqa", zero_sink=True))
    assert zero.fast.plan(zero, 3, zero.new_cache(1, 2, 6), None) is None  # SoftMax-off-by-one: the core
    probs = []
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), attn_probs=probs)  # attention maps: the core's explicit scores
    assert len(probs) == model.config.num_layers and probs[0].shape[-2:] == (3, 3)
    with pytest.raises(ValueError, match="chunk_kernel"):
        FastPath(chunk_kernel="fastest")
