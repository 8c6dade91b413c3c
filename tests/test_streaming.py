"""Property tests of the streaming contract (docs/streaming.md; issue 3), across every model variant.

Properties (Hypothesis draws the model size, sinks 0..8, window 1..64, batch 1..3, the tokens, the
chunk partition and the dtype):
  (a) T <= S: streaming logits, under any chunking, equal the dense forward `model(ids)`;
  (b) any T and any chunk partition: streaming equals token-by-token streaming;
  (c) token-by-token streaming equals `reference_stream`, the paper's slow list-cache loop;
  (d) after 10*S tokens (decode steps and long chunks) the cache buffers keep shape and storage;
  (f) batch rows are independent: row i of a batched stream equals that row streamed alone;
  plus `reset()`, `len(cache)` / `tokens_seen`, and RoPE exactness at stream position ~3e6.
(e), the edge cases, are explicit parametrized tests below the properties.

Every property runs once per variant (pytest parametrization), so each of the 9 variants in
`util.VARIANTS`, plus SoftMax-off-by-one (`zero_sink`) on a RoPE and an ALiBi variant, is covered
whatever Hypothesis draws. Examples per variant: a quarter of the profile's `max_examples`
(ci: 10, default: 2, at least 2).

Tolerances on the relative error `util.rel_err` = max|got - want| / max|want|: 1e-9 in float64,
1e-4 in float32. The worst error per property is printed at the end of this module's tests (and
written as JSON to $MINILLM_STREAM_STATS if set).

float64 runs are float64 throughout (RMSNorm included: it normalizes in at least float32, never
below the input's precision), so the 1e-9 bound sees any error above float64 rounding.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.core.positions import rope_inv_freq, rope_rotate, rope_tables
from minillm.reference import reference_stream
from minillm.testing.strategies import chunkings  # the kit's: minillm is proved with what it ships
from util import VARIANTS, random_model, rel_err, tiny_config

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
CASES = list(VARIANTS) + ["llama_gqa+zero_sink", "mpt+zero_sink"]  # RoPE and ALiBi with zero_sink
PER_CASE = max(2, settings().max_examples // 4)
VOCAB = 61

# (property, dtype) -> [examples run, worst relative error]; reported by _report below.
STATS: dict[tuple[str, str], list] = {}


def record(prop: str, dtype: torch.dtype, err: float, new_example: bool = True) -> None:
    s = STATS.setdefault((prop, str(dtype).removeprefix("torch.")), [0, 0.0])
    s[0] += new_example
    s[1] = max(s[1], err)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_report(request):
    yield
    if not STATS:
        return
    lines = [f"streaming properties ({PER_CASE} examples per variant and property, {len(CASES)} variants):"]
    lines += [f"  {p:<17} {d:<8} examples={n:<5} worst rel err={e:.3g}" for (p, d), (n, e) in sorted(STATS.items())]
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # print past pytest's output capture
            reporter.write_line("")
            for line in lines:
                reporter.write_line(line)
    if os.environ.get("MINILLM_STREAM_STATS"):
        with open(os.environ["MINILLM_STREAM_STATS"], "w") as f:
            json.dump([dict(property=p, dtype=d, examples=n, worst_rel_err=e) for (p, d), (n, e) in
                       sorted(STATS.items())], f, indent=1)


# ---------------------------------------------------------------------------------------------
# Helpers


def make_model(case: str, dtype=torch.float64, seed: int = 0, **size):
    variant, _, extra = case.partition("+")
    config = tiny_config(variant, vocab=VOCAB, zero_sink=extra == "zero_sink", **size)
    return random_model(config, dtype=dtype, seed=seed)


def random_ids(batch: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def stream(model, ids, cache, bounds) -> torch.Tensor:
    """Stream ids[:, a:b] for each (a, b) in bounds; checks the counters after every chunk."""
    out = []
    for a, b in bounds:
        out.append(model(ids[:, a:b], cache=cache))
        assert cache.tokens_seen.tolist() == [b] * cache.batch_size and len(cache) == min(b, cache.capacity)
    return torch.cat(out, dim=1)


def one_by_one(T: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(T)]


def bounds_of(cuts, T: int) -> list[tuple[int, int]]:
    edges = [0, *sorted(set(cuts)), T]
    return list(zip(edges[:-1], edges[1:]))


def partitions(T: int):
    """A chunk partition of range(T) as (start, end) bounds, from the kit's `chunkings` (random cut
    points, a prefill followed by decode steps, or one chunk size repeated)."""
    def bounds(sizes):
        edges = [0]
        for n in sizes:
            edges.append(edges[-1] + n)
        return list(zip(edges[:-1], edges[1:]))
    return chunkings(T).map(bounds)


@st.composite
def setups(draw, max_T, min_T=lambda S: 1):
    """A model size, dtype, seed, batch, sinks/window, and T in [min_T(S), max_T(S)]."""
    size = dict(heads=draw(st.integers(1, 4)), head_dim=draw(st.sampled_from([2, 4, 8])),
                layers=draw(st.integers(1, 2)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 2**16))
    batch = draw(st.integers(1, 3))
    sinks = draw(st.integers(0, 8))
    window = draw(st.integers(1, 64))
    S = sinks + window
    hi = max_T(S)
    T = draw(st.integers(min(min_T(S), hi), hi))
    return size, dtype, seed, batch, sinks, window, T


def check(prop, got, want, dtype, new_example=True):
    err = rel_err(got, want)
    record(prop, dtype, err, new_example)
    assert err <= TOL[dtype], f"{prop}: relative error {err:.3g} > {TOL[dtype]:g}"


properties = pytest.mark.parametrize("case", CASES)
examples = settings(max_examples=PER_CASE)


# ---------------------------------------------------------------------------------------------
# Properties


@properties
@examples
@given(data=st.data())
@torch.no_grad()
def test_a_short_stream_equals_dense(case, data):
    size, dtype, seed, batch, sinks, window, T = data.draw(setups(max_T=lambda S: min(S, 96)))
    model = make_model(case, dtype, seed, **size)
    ids = random_ids(batch, T, seed)
    bounds = data.draw(partitions(T))
    got = stream(model, ids, model.new_cache(batch, sinks, window), bounds)
    check("a:dense", got, model(ids), dtype)


@properties
@examples
@given(data=st.data())
@torch.no_grad()
def test_b_any_chunking_equals_token_by_token(case, data):
    size, dtype, seed, batch, sinks, window, T = data.draw(setups(max_T=lambda S: min(3 * S, 150)))
    model = make_model(case, dtype, seed, **size)
    ids = random_ids(batch, T, seed)
    want = stream(model, ids, model.new_cache(batch, sinks, window), one_by_one(T))
    # The model also splits chunks longer than max_chunk itself; draw that too.
    model.max_chunk = data.draw(st.sampled_from([1024, 1024, 1, 3, 17]))
    got = stream(model, ids, model.new_cache(batch, sinks, window), data.draw(partitions(T)))
    check("b:token-by-token", got, want, dtype)


@properties
@examples
@given(data=st.data())
@torch.no_grad()
def test_c_token_by_token_equals_reference(case, data):
    # T beyond S (up to 4S, capped for speed): the regime where eviction and sink positions matter.
    size, dtype, seed, batch, sinks, window, T = data.draw(
        setups(max_T=lambda S: min(4 * S, 150), min_T=lambda S: S + 1))
    model = make_model(case, dtype, seed, **size)
    ids = random_ids(batch, T, seed)
    got = stream(model, ids, model.new_cache(batch, sinks, window), one_by_one(T))
    check("c:reference", got, reference_stream(model, ids, sinks, window), dtype)


@properties
@examples
@given(data=st.data())
@torch.no_grad()
def test_d_buffers_keep_shape_and_storage(case, data):
    size, dtype, seed, batch, sinks, window, _ = data.draw(setups(max_T=lambda S: 1))
    size["layers"] = 1  # storage is per cache, not per layer; one layer keeps 10*S tokens cheap
    model = make_model(case, dtype, seed, **size)
    cache = model.new_cache(batch, sinks, window)
    S = cache.capacity

    def snapshot():
        bufs = [cache.k, cache.v] + ([cache.raw_sink_k] if cache.raw_sink_k is not None else [])
        return [(tuple(b.shape), b.data_ptr()) for b in bufs]

    before = snapshot()
    assert before[0][0] == (1, batch, model.config.num_kv_heads, S, model.config.head_dim)
    # Decode steps and chunks longer than S, interleaved, until 10*S tokens have streamed.
    lengths = data.draw(st.lists(st.one_of(st.just(1), st.integers(S + 1, 3 * S)), min_size=1, max_size=25))
    t = 0
    while t < 10 * S:
        for n in lengths:
            model(random_ids(batch, n, seed + t), cache=cache)
            t += n
            assert snapshot() == before
            assert cache.tokens_seen.tolist() == [t] * batch and len(cache) == min(t, S)
    cache.reset()
    assert snapshot() == before and not cache.tokens_seen.any() and len(cache) == 0
    record("d:storage", dtype, 0.0)


@properties
@examples
@given(data=st.data())
@torch.no_grad()
def test_f_batch_rows_are_independent(case, data):
    size, dtype, seed, _, sinks, window, T = data.draw(setups(max_T=lambda S: min(3 * S, 120)))
    batch = data.draw(st.integers(2, 3))
    model = make_model(case, dtype, seed, **size)
    ids = random_ids(batch, T, seed)
    bounds = data.draw(partitions(T))
    got = stream(model, ids, model.new_cache(batch, sinks, window), bounds)
    for i in range(batch):
        alone = stream(model, ids[i : i + 1], model.new_cache(1, sinks, window), bounds)
        check("f:batch-rows", got[i : i + 1], alone, dtype, new_example=i == 0)


@properties
@settings(max_examples=max(1, PER_CASE // 2))
@given(data=st.data())
@torch.no_grad()
def test_reset_then_restream_is_identical(case, data):
    # A cache that streamed something else, then reset(), behaves exactly like a fresh one.
    size, dtype, seed, batch, sinks, window, T = data.draw(setups(max_T=lambda S: min(3 * S, 100)))
    model = make_model(case, dtype, seed, **size)
    ids = random_ids(batch, T, seed)
    bounds = data.draw(partitions(T))
    fresh = stream(model, ids, model.new_cache(batch, sinks, window), bounds)
    cache = model.new_cache(batch, sinks, window)
    stream(model, random_ids(batch, T + 7, seed + 1), cache, data.draw(partitions(T + 7)))
    cache.reset()
    assert not cache.tokens_seen.any() and len(cache) == 0
    again = stream(model, ids, cache, bounds)
    assert torch.equal(again, fresh)
    record("reset", dtype, 0.0)


@pytest.mark.parametrize("rotary_dim", [64, 128])
@pytest.mark.parametrize("theta", [1e4, 5e5])
def test_rope_is_exact_after_millions_of_tokens(rotary_dim, theta):
    # The engine rotates keys at their stream position with float64 angles. What streaming needs
    # is that the score depends only on the distance t - j, however large t is: the score at
    # (3e6 + 10, 3e6 + 3) must equal the one at (10, 3), in float32.
    inv_freq = rope_inv_freq(rotary_dim, theta)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(64, rotary_dim, generator=g)
    k = torch.randn(64, rotary_dim, generator=g)

    def scores(tq, tk):
        at_q = rope_tables(torch.tensor([tq]), inv_freq, torch.float32)
        at_k = rope_tables(torch.tensor([tk]), inv_freq, torch.float32)
        return (rope_rotate(q, *at_q) * rope_rotate(k, *at_k)).sum(-1)

    near = scores(10, 3)
    for offset in (3_000_000, 2**24 + 5, 10**8):
        far = scores(offset + 10, offset + 3)
        err = rel_err(far, near)
        record("rope@3e6+", torch.float32, err, new_example=offset == 3_000_000)
        assert err <= 1e-5, (offset, err)


# ---------------------------------------------------------------------------------------------
# (e) Edge cases, explicit, for every variant (float64, two layers).

EDGES = [  # (sinks, window, T, how the stream is chunked)
    (0, 5, 40, "mixed"),  # window attention: the paper's failing baseline
    (3, 1, 30, "mixed"),  # window=1: each token sees the sinks and itself
    (0, 1, 12, "mixed"),  # the smallest cache there is: a token sees only itself
    (4, 12, 16, "one"),  # T == S in one chunk
    (4, 12, 17, "one"),  # T == S + 1
    (4, 12, 32, "one"),  # T == 2S
    (4, 12, 32, "mixed"),
    (8, 8, 16, "decode"),  # sinks == window, T == S
]


def _chunking(how: str, T: int):
    if how == "one":
        return [(0, T)]
    if how == "decode":
        return one_by_one(T)
    return bounds_of([1, 2, 9, T // 2, T // 2 + 1, T - 1], T)


@properties
@pytest.mark.parametrize("sinks,window,T,how", EDGES)
@torch.no_grad()
def test_e_edge_cases(case, sinks, window, T, how):
    model = make_model(case, seed=3)
    ids = random_ids(2, T, 5)
    S = sinks + window
    got = stream(model, ids, model.new_cache(2, sinks, window), _chunking(how, T))
    want = reference_stream(model, ids, sinks, window)
    check("e:edges", got, want, torch.float64)
    if T <= S:
        check("e:edges", got, model(ids), torch.float64, new_example=False)


@properties
@torch.no_grad()
def test_e_long_prefill_is_windowed(case):
    # A 300-token chunk through S = 16 slots is windowed token by token: it equals token-by-token
    # streaming, and is far from the dense forward (which the anchors' long prefill computes).
    model = make_model(case, seed=4)
    ids = random_ids(1, 300, 6)
    got = stream(model, ids, model.new_cache(1, 4, 12), [(0, 300)])
    want = stream(model, ids, model.new_cache(1, 4, 12), one_by_one(300))
    check("e:long-prefill", got, want, torch.float64)
    check("e:long-prefill", got[:, :16], model(ids[:, :16]), torch.float64, new_example=False)
    assert rel_err(got[:, 16:], model(ids)[:, 16:]) > 1e-3  # past S it is not dense attention


@properties
@torch.no_grad()
def test_e_mixed_stream_equals_reference(case):
    # Decode steps, a long chunk once the cache is full, more decode steps, another long chunk
    # (internally split by max_chunk), then decode.
    model = make_model(case, seed=5)
    model.max_chunk = 37
    ids = random_ids(2, 260, 7)
    bounds = one_by_one(25) + [(25, 125)] + [(i, i + 1) for i in range(125, 140)] + [(140, 250)]
    bounds += [(i, i + 1) for i in range(250, 260)]
    got = stream(model, ids, model.new_cache(2, 3, 17), bounds)
    check("e:mixed", got, reference_stream(model, ids, 3, 17), torch.float64)


@torch.no_grad()
def test_float32_llama_matches_reference():
    # float32 end to end (the fused F.rms_norm path), through a mixed chunk partition.
    model = random_model(tiny_config("llama_gqa", vocab=VOCAB), dtype=torch.float32, seed=9)
    ids = random_ids(2, 90, 9)
    got = stream(model, ids, model.new_cache(2, 4, 20), bounds_of([1, 2, 30, 31, 70], 90))
    check("e:float32", got, reference_stream(model, ids, 4, 20), torch.float32)


@pytest.mark.parametrize("keep", [1, 2, 4, 5, 6, 13, 17, 20])
@torch.no_grad()
def test_long_chunk_computes_only_the_kept_logits(keep):
    # A chunk longer than max_chunk is split into pieces; logits_to_keep=k must still return the
    # last k positions of the whole chunk (spanning pieces when the last piece is shorter), and
    # with ragged lengths each row's own last k.
    model = random_model(tiny_config("llama_gqa", vocab=VOCAB), seed=3)
    model.max_chunk = 5
    ids = random_ids(3, 17, 4)
    full = model(ids, cache=model.new_cache(3, 2, 4))
    got = model(ids, cache=model.new_cache(3, 2, 4), logits_to_keep=keep)
    # Fewer logits means products over fewer rows: the same values to rounding, not bit for bit
    # (seen 1e-15 apart on an AVX2 machine), so the suite's float64 tolerance applies.
    assert got.shape == full[:, -keep:].shape and rel_err(got, full[:, -keep:]) < TOL[torch.float64]
    lengths = [17, 3, 11]
    ragged = model(ids, cache=model.new_cache(3, 2, 4), lengths=lengths)
    kept = model(ids, cache=model.new_cache(3, 2, 4), lengths=lengths, logits_to_keep=keep)
    assert kept.shape[:2] == (3, min(keep, 17))
    for b, n in enumerate(lengths):
        want = ragged[b, max(0, n - keep) : n]
        assert rel_err(kept[b, kept.shape[1] - want.shape[0]:], want) < TOL[torch.float64], (keep, b)
