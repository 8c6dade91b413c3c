"""Property tests of batched streams (issue 13): B independent streams in one cache.

`model.new_cache(batch_size=B, sinks, window)` holds B streams in one (layers, B, KV, S, hd)
allocation. `model(ids, cache=cache, lengths=lengths)` feeds row b the next `lengths[b]` tokens of
its own stream (`ids` right-padded to n columns); `cache.reset(rows)` restarts rows; `export_row`
and `import_row` move one row's stream out of the cache and back, into the same or another row.

What this module proves, for every variant in `util.VARIANTS`, SoftMax-off-by-one (`zero_sink`) on a
RoPE and an ALiBi variant, and a sink-token checkpoint (`sink_token_id`):

  1. A random ragged schedule (chunks up to 3S tokens, runs of decode steps with rows advancing at
     different rates, rows of length 0, resets of random rows, `lengths` as a list, a tensor or
     absent, pieces split by a small `model.max_chunk`) gives every row exactly what its own
     stream gives fed alone through a batch-1 cache in the same chunks: float64 within 1e-9,
     float32 within 1e-4 (`test_1_*`).
  2. Every row's whole stream also equals `reference_stream`, the paper's slow list-cache loop,
     which shares no position code with the engine (float64, 1e-9; `test_2_*`).
  3. A row of length 0 is untouched: its k, v and raw_sink_k slices are bit-identical after the
     call and its tokens_seen unchanged. A reset or an import leaves every other row untouched in
     the same way. Checked at every call of every schedule of every test (`BatchedRun`).
  4. `cache.k`, `cache.v` and `cache.raw_sink_k` keep shape and storage through every call, reset,
     export and import (`BatchedRun`).
  5. `cache.tokens_seen` is a (B,) int64 CPU tensor equal to each row's tokens since its last
     reset, after every call (`BatchedRun`).
  6. `logits_to_keep=1` returns (B, 1, V): each row's logits at its own last consumed position,
     also when model.max_chunk splits the call; k = 2, 3 give each row's last k, as the engine
     documents (`test_6_*`, and drawn in every schedule).
  7. `export_row` / `import_row`: a round trip is bit-identical; a stream exported, its row reused
     by another stream, then imported back continues bit-identically to one that never left; a
     stream moved to another row (or another cache) continues as it would alone (`test_7_*`).
  8. Bad `lengths`, rows out of range and foreign states raise a MiniLLMError naming the argument,
     and leave the cache as it was (`test_8_*`).
  9. Decode steps with rows at very different positions (one wrapped ~10 times around its ring, one
     young, one reset mid-run, one idle) equal batch-1 runs and the reference (`test_9_*`).

The sink-token checkpoint: the model does not prepend its sink token itself (generation and
evaluation put it in front of every stream); here every stream starts with it, as `generate` feeds
them, and the batch-1 runs and the reference see the same ids.

Bit-identity (`torch.equal`) is asserted only between two runs of the same computation (same
batch configuration, same calls); across batch configurations (batched vs batch-1) the kernels
may round differently, so those comparisons use the tolerances above on `util.rel_err`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.errors import MiniLLMError
from minillm.reference import reference_stream
from minillm.testing.strategies import Call, ragged_schedules  # the kit's: minillm is proved with what it ships
from util import VARIANTS, random_model, rel_err, tiny_config

TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
VOCAB = 61
SINK_TOKEN = 7
CASES = list(VARIANTS) + ["llama_gqa+zero_sink", "mpt+zero_sink", "gpt_neox_parallel+sink_token"]
_PROFILE_EXAMPLES = settings().max_examples  # ci: 40, default: 10
PER_CASE = _PROFILE_EXAMPLES  # the main property, per case (ci: 40, default: 10)
FEW = max(4, _PROFILE_EXAMPLES // 2)  # the others, per case (ci: 20, default: 5)

properties = pytest.mark.parametrize("case", CASES)

# (property, dtype) -> worst relative error seen; printed at the end of the module.
WORST: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    if not WORST:
        return
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("")
            reporter.write_line("batched-stream properties, worst relative error:")
            for (p, d), e in sorted(WORST.items()):
                reporter.write_line(f"  {p:<28} {d:<8} {e:.3g}")


def record(prop: str, dtype: torch.dtype, err: float) -> None:
    key = (prop, str(dtype).removeprefix("torch."))
    WORST[key] = max(WORST.get(key, 0.0), err)


# ---------------------------------------------------------------------------------------------
# Models, schedules and the batched runner


def make_model(case: str, dtype=torch.float64, seed: int = 0, **size):
    """A random model of `case`: a VARIANTS name, optionally "+zero_sink" or "+sink_token"."""
    variant, _, extra = case.partition("+")
    extra_fields = {"zero_sink": dict(zero_sink=True), "sink_token": dict(sink_token_id=SINK_TOKEN)}.get(extra, {})
    return random_model(tiny_config(variant, vocab=VOCAB, **extra_fields, **size), dtype=dtype, seed=seed)


@dataclass
class Setup:
    size: dict
    seed: int
    B: int
    sinks: int
    window: int
    max_chunk: int

    @property
    def S(self) -> int:
        return self.sinks + self.window


@st.composite
def setups(draw, min_batch: int = 1) -> Setup:
    """A model size, a seed, B in min_batch..4, sinks 0..3, window 1..8, and model.max_chunk (small
    values make the model split one call's (B, n) input into pieces, lengths included)."""
    size = dict(heads=draw(st.integers(1, 4)), head_dim=draw(st.sampled_from([2, 4, 8])),
                layers=draw(st.integers(1, 2)))
    return Setup(size=size, seed=draw(st.integers(0, 2**16)), B=draw(st.integers(min_batch, 4)),
                 sinks=draw(st.integers(0, 3)), window=draw(st.integers(1, 8)),
                 max_chunk=draw(st.sampled_from([1024, 1024, 1024, 2, 5])))


@dataclass
class Stream:
    """One stream, from a reset (or the cache's start) to the next: its tokens, the chunks it was fed
    in, and the batched logits for each chunk. A chunk (start, end, first, call) is tokens
    start:end, fed by call number `call`, with logits for positions first:end (first > start where
    logits_to_keep kept only the last ones; first == end where it kept none that are defined)."""
    rows: list[int]  # the row(s) it lived in (more than one after a move)
    tokens: list[int] = field(default_factory=list)
    chunks: list[tuple[int, int, int, int]] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)


def storage(cache) -> list:
    bufs = [cache.k, cache.v] + ([cache.raw_sink_k] if cache.raw_sink_k is not None else [])
    return [(tuple(b.shape), b.data_ptr()) for b in bufs]


def row_state(cache, b: int):
    """Copies of row b's k, v (and raw_sink_k) slices, and its tokens_seen."""
    bufs = [cache.k[:, b], cache.v[:, b]] + ([cache.raw_sink_k[:, b]] if cache.raw_sink_k is not None else [])
    return [x.clone() for x in bufs], int(cache.tokens_seen[b])


def assert_row_untouched(cache, b: int, before, what: str) -> None:
    bufs, seen = row_state(cache, b)
    names = ["k", "v", "raw_sink_k"]
    for name, x, y in zip(names, bufs, before[0]):
        assert torch.equal(x, y), f"{what}: row {b}'s {name} changed, but the row was not to be touched"
    assert seen == before[1], f"{what}: row {b}'s tokens_seen went from {before[1]} to {seen}"


def assert_caches_equal(a, b, what: str) -> None:
    for name in ("k", "v", "raw_sink_k"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None) and (x is None or torch.equal(x, y)), f"{what}: cache.{name} differs"
    assert torch.equal(a.tokens_seen, b.tokens_seen), f"{what}: {a.tokens_seen} != {b.tokens_seen}"


def check_layout(model, cache, B: int, sinks: int, window: int) -> None:
    c = model.config
    shape = (c.num_layers, B, c.num_kv_heads, sinks + window, c.head_dim)
    assert tuple(cache.k.shape) == shape and tuple(cache.v.shape) == shape
    raw = cache.raw_sink_k
    if c.positions == "rope" and sinks:
        assert raw is not None and tuple(raw.shape) == shape[:3] + (sinks, c.head_dim)
    elif c.positions == "alibi":
        assert raw is None, "an ALiBi model keeps no un-rotated sink keys"


class BatchedRun:
    """Runs Calls on one batched cache with random tokens (from `seed`), checks properties 3-5 at
    every step, and records every stream's tokens, chunks and batched logits."""

    def __init__(self, model, cache, seed: int, max_chunk: int = 1024):
        self.model, self.cache, self.max_chunk = model, cache, max_chunk
        self.B = cache.batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.sink_token = model.config.sink_token_id
        self.streams: list[Stream] = []
        self.current = [self._new_stream(b) for b in range(self.B)]
        self.seen = [0] * self.B  # expected tokens_seen
        self.storage = storage(cache)
        self.ncalls = 0
        self.check_counters("the new cache")

    def _new_stream(self, row: int) -> Stream:
        s = Stream(rows=[row])
        self.streams.append(s)
        return s

    def check_counters(self, what: str) -> None:
        ts = self.cache.tokens_seen
        assert isinstance(ts, torch.Tensor), f"{what}: tokens_seen is a {type(ts).__name__}, not a tensor"
        assert ts.dtype == torch.int64 and ts.device.type == "cpu" and tuple(ts.shape) == (self.B,), \
            f"{what}: tokens_seen is {ts.dtype} on {ts.device}, shape {tuple(ts.shape)}; want int64, cpu, ({self.B},)"
        assert ts.tolist() == self.seen, f"{what}: tokens_seen {ts.tolist()}, want {self.seen}"
        assert storage(self.cache) == self.storage, f"{what}: a cache buffer changed shape or storage"

    def run(self, calls: list[Call]) -> "BatchedRun":
        for c in calls:
            self.call(c)
        return self

    def reset(self, rows) -> None:
        """cache.reset(rows) (rows: "all", an int or a list), checking that other rows are untouched."""
        B, cache = self.B, self.cache
        listed = list(range(B)) if rows == "all" else [rows] if isinstance(rows, int) else list(rows)
        others = {b: row_state(cache, b) for b in range(B) if b not in listed}
        if rows == "all":
            cache.reset()
        else:
            cache.reset(rows)
        for b in listed:
            self.current[b] = self._new_stream(b)
            self.seen[b] = 0
        for b, before in others.items():
            assert_row_untouched(cache, b, before, f"reset({rows!r})")
        self.check_counters(f"after reset({rows!r})")

    def move(self, src: int, dst: int) -> None:
        """state = export_row(src); reset(src); import_row(dst, state): dst continues src's stream."""
        cache = self.cache
        others = {b: row_state(cache, b) for b in range(self.B) if b not in (src, dst)}
        state = cache.export_row(src)
        cache.reset(src)
        cache.import_row(dst, state)
        moved = self.current[src]
        self.current[dst], self.seen[dst] = moved, self.seen[src]
        if dst != src:
            moved.rows.append(dst)
            self.current[src], self.seen[src] = self._new_stream(src), 0
        for b, before in others.items():
            assert_row_untouched(cache, b, before, f"move {src} -> {dst}")
        self.check_counters(f"after moving row {src} to row {dst}")

    def call(self, c: Call) -> torch.Tensor:
        B, cache, model = self.B, self.cache, self.model
        i = self.ncalls
        self.ncalls += 1
        if c.move is not None:
            self.move(*c.move)
        if c.reset is not None:
            self.reset(c.reset)
        ids = torch.randint(0, VOCAB, (B, c.n), generator=self.gen)  # padding is random too
        for b in range(B):
            if self.sink_token is not None and c.lengths[b] and not self.current[b].tokens:
                ids[b, 0] = self.sink_token  # a sink-token checkpoint's streams start with it
        kwargs = {}
        if c.form == "list":
            kwargs["lengths"] = list(c.lengths)
        elif c.form == "tensor":
            kwargs["lengths"] = torch.tensor(c.lengths, dtype=torch.int64)
        else:
            assert all(L == c.n for L in c.lengths)
        if c.keep:
            kwargs["logits_to_keep"] = c.keep
        keep = min(c.keep, c.n)  # the logits of each row's last `keep` consumed positions (0: all n)
        idle = {b: row_state(cache, b) for b in range(B) if c.lengths[b] == 0}
        model.max_chunk = self.max_chunk
        try:
            out = model(ids, cache=cache, **kwargs)
        finally:
            model.max_chunk = 1024
        want_shape = (B, keep or c.n, VOCAB)
        assert tuple(out.shape) == want_shape, f"call {i} {c}: logits {tuple(out.shape)}, want {want_shape}"
        for b, L in enumerate(c.lengths):
            if L:
                s = self.current[b]
                start = len(s.tokens)
                s.tokens += ids[b, :L].tolist()
                # With logits_to_keep=k, a row that consumed L >= k tokens gets its last k; one that
                # consumed fewer has only L defined ones, and which of the k they are is not
                # specified beyond k = 1 (where L >= 1 always): nothing is recorded for it then.
                first = start if not keep else start + L - keep if L >= keep else start + L
                s.chunks.append((start, start + L, first, i))
                s.logits.append(out[b, :L] if not keep else out[b] if L >= keep else out[b, :0])
                self.seen[b] += L
        for b, before in idle.items():
            assert_row_untouched(cache, b, before, f"call {i} {c} (length 0)")
        self.check_counters(f"after call {i} {c}")
        return out

    def fed(self) -> list[Stream]:
        return [s for s in self.streams if s.tokens]


def alone(model, s: Stream, sinks: int, window: int) -> list[torch.Tensor]:
    """Stream `s` fed alone through a fresh batch-1 cache, in the same chunks (all logits); per
    chunk, the logits the batched run must have given (positions first:end)."""
    cache = model.new_cache(1, sinks, window)
    ids = torch.tensor([s.tokens])
    return [model(ids[:, a:b], cache=cache)[0, first - a :] for a, b, first, _ in s.chunks]


def check_against_alone(model, run: BatchedRun, sinks: int, window: int, dtype, prop: str) -> None:
    for s in run.fed():
        for (a, b, first, i), got, want in zip(s.chunks, s.logits, alone(model, s, sinks, window)):
            if first == b:
                continue
            err = rel_err(got, want)
            record(prop, dtype, err)
            assert err <= TOL[dtype], (f"{prop}: stream of row(s) {s.rows}, call {i}, its tokens {a}:{b} "
                                       f"(logits {first}:{b}): relative error {err:.3g} against the stream "
                                       f"alone in a batch-1 cache (tol {TOL[dtype]:g})")


def check_against_reference(model, run: BatchedRun, sinks: int, window: int, dtype, prop: str) -> None:
    for s in run.fed():
        ref = reference_stream(model, torch.tensor([s.tokens]), sinks, window)[0]
        for (a, b, first, i), got in zip(s.chunks, s.logits):
            if first == b:
                continue
            err = rel_err(got, ref[first:b])
            record(prop, dtype, err)
            assert err <= TOL[dtype], (f"{prop}: stream of row(s) {s.rows}, call {i}, its tokens {a}:{b} "
                                       f"(logits {first}:{b}): relative error {err:.3g} against reference_stream "
                                       f"(tol {TOL[dtype]:g})")


def batched_run(model, s: Setup, calls: list[Call]) -> BatchedRun:
    cache = model.new_cache(batch_size=s.B, sinks=s.sinks, window=s.window)
    check_layout(model, cache, s.B, s.sinks, s.window)
    return BatchedRun(model, cache, s.seed, s.max_chunk).run(calls)


# ---------------------------------------------------------------------------------------------
# 1, 2 (and 3, 4, 5, 6 along the way): random ragged schedules


@properties
@settings(max_examples=PER_CASE)
@given(data=st.data())
@torch.no_grad()
def test_1_ragged_schedule_equals_each_row_alone_float64(case, data):
    """Every row of a random ragged batched schedule equals its own streams, each fed alone through
    a fresh batch-1 cache in the same chunks (float64, 1e-9); properties 3-5 at every call."""
    s = data.draw(setups())
    model = make_model(case, torch.float64, s.seed, **s.size)
    run = batched_run(model, s, data.draw(ragged_schedules(s.B, s.S)))
    check_against_alone(model, run, s.sinks, s.window, torch.float64, "1:rows-alone")


@properties
@settings(max_examples=FEW)
@given(data=st.data())
@torch.no_grad()
def test_1_ragged_schedule_equals_each_row_alone_float32(case, data):
    """The same in float32 (1e-4): the batched kernels' float32 rounding stays at float32 level."""
    s = data.draw(setups())
    model = make_model(case, torch.float32, s.seed, **s.size)
    run = batched_run(model, s, data.draw(ragged_schedules(s.B, s.S)))
    check_against_alone(model, run, s.sinks, s.window, torch.float32, "1:rows-alone")


@properties
@settings(max_examples=FEW)
@given(data=st.data())
@torch.no_grad()
def test_2_ragged_schedule_equals_reference(case, data):
    """Every row's whole stream (each reset starts a new one) equals reference_stream, the paper's
    literal list cache, token by token (float64, 1e-9)."""
    s = data.draw(setups())
    model = make_model(case, torch.float64, s.seed, **s.size)
    run = batched_run(model, s, data.draw(ragged_schedules(s.B, s.S)))
    check_against_reference(model, run, s.sinks, s.window, torch.float64, "2:reference")


# ---------------------------------------------------------------------------------------------
# 6: logits_to_keep=1


@properties
@settings(max_examples=FEW)
@given(data=st.data())
@torch.no_grad()
def test_6_logits_to_keep_one_is_each_rows_last_consumed_position(case, data):
    """Two caches fed the same ragged calls, one returning all logits and one logits_to_keep=1: the
    latter is (B, 1, V), row b equal to the former at lengths[b]-1 (rows of length 0 excluded),
    also when max_chunk splits a call so that a row ends in an earlier piece; and the two caches
    stay bit-identical (logits_to_keep changes only which logits are computed). Also k = 2, 3,
    as the engine documents it (row b's last k consumed positions), for rows of length >= k."""
    s = data.draw(setups())
    model = make_model(case, torch.float64, s.seed, **s.size)
    calls = data.draw(ragged_schedules(s.B, s.S))
    k = data.draw(st.sampled_from([1, 1, 1, 2, 3]), label="logits_to_keep")
    full = BatchedRun(model, model.new_cache(s.B, s.sinks, s.window), s.seed, s.max_chunk)
    last = BatchedRun(model, model.new_cache(s.B, s.sinks, s.window), s.seed, s.max_chunk)
    for i, c in enumerate(calls):
        want = full.call(Call(c.lengths, c.n, c.form, 0, c.reset))
        got = last.call(Call(c.lengths, c.n, c.form, k, c.reset))
        keep = min(k, c.n)
        for b, L in enumerate(c.lengths):
            if L >= keep:
                err = rel_err(got[b], want[b, L - keep : L])
                record("6:logits_to_keep", torch.float64, err)
                assert err <= TOL[torch.float64], f"call {i} {c}: row {b} (length {L}): relative error {err:.3g}"
        assert_caches_equal(full.cache, last.cache, f"call {i}: the cache fed with logits_to_keep={k}")


# ---------------------------------------------------------------------------------------------
# 7: export_row / import_row


@properties
@settings(max_examples=FEW)
@given(data=st.data())
@torch.no_grad()
def test_7_export_import_is_bit_identical_to_never_leaving(case, data):
    """Caches A and B get the same calls. In B, row r is exported and imported straight back (B is
    then bit-identical to A); exported again, reset and reused by another stream (row r alone,
    chunks past S), then imported back: B is bit-identical to A again, buffers and tokens_seen,
    and every row's logits in the calls that follow are torch.equal to A's."""
    s = data.draw(setups(min_batch=2))
    model = make_model(case, torch.float64, s.seed, **s.size)
    prefix = data.draw(ragged_schedules(s.B, s.S), label="prefix")
    r = data.draw(st.integers(0, s.B - 1), label="row")
    interlude = data.draw(st.lists(st.integers(1, 3 * s.S), min_size=1, max_size=3), label="interlude")
    suffix = data.draw(ragged_schedules(s.B, s.S, resets=False), label="suffix")
    a = BatchedRun(model, model.new_cache(s.B, s.sinks, s.window), s.seed, s.max_chunk).run(prefix)
    b = BatchedRun(model, model.new_cache(s.B, s.sinks, s.window), s.seed, s.max_chunk).run(prefix)
    assert_caches_equal(a.cache, b.cache, "the same calls twice")  # determinism, the premise
    cache = b.cache

    cache.import_row(r, cache.export_row(r))
    assert_caches_equal(a.cache, cache, f"import_row({r}, export_row({r}))")
    b.check_counters("after the round trip")

    state = cache.export_row(r)
    cache.reset(r)
    gen = torch.Generator().manual_seed(s.seed + 1)
    for n in interlude:  # another stream in row r; the other rows idle
        lengths = [n if row == r else 0 for row in range(s.B)]
        model(torch.randint(0, VOCAB, (s.B, n), generator=gen), cache=cache, lengths=lengths)
    assert int(cache.tokens_seen[r]) == sum(interlude)
    cache.import_row(r, state)
    assert_caches_equal(a.cache, cache, "after the stream came back")
    b.check_counters("after the stream came back")

    n_before = [len(stream.chunks) for stream in a.streams]  # the suffix has no resets: no new streams
    a.run(suffix)
    b.run(suffix)
    assert len(a.streams) == len(b.streams) == len(n_before)
    for sa, sb, k in zip(a.streams, b.streams, n_before):
        for ga, gb, chunk in zip(sa.logits[k:], sb.logits[k:], sa.chunks[k:]):
            assert torch.equal(ga, gb), f"row(s) {sa.rows}, chunk {chunk}: logits differ from never having left"
    assert_caches_equal(a.cache, b.cache, "after the suffix")


@properties
@settings(max_examples=FEW)
@given(data=st.data())
@torch.no_grad()
def test_7_moved_rows_continue_their_streams(case, data):
    """Random schedules with row moves (export a row, reset it, import the stream into another
    row, or back into the same one) in between ragged chunks, decode steps and resets: every stream,
    whichever rows it lived in, equals that stream alone in a batch-1 cache (float64, 1e-9), and
    the rows not involved in a move stay bit-identical."""
    s = data.draw(setups(min_batch=2))
    model = make_model(case, torch.float64, s.seed, **s.size)
    run = batched_run(model, s, data.draw(ragged_schedules(s.B, s.S, moves=True)))
    check_against_alone(model, run, s.sinks, s.window, torch.float64, "7:moved-rows")


@pytest.mark.parametrize("case", ["llama_gqa", "falcon_rw", "mpt+zero_sink", "gpt_neox_parallel+sink_token"])
@torch.no_grad()
def test_7_a_stream_moves_between_caches_of_other_batch_sizes(case):
    """A row's state is one stream, whatever the batch size of the cache it came from (assumed
    here, beyond the issue's wording: export from a 3-row cache, import into a 1-row and into a
    2-row cache of the same sinks/window/dtype): the stream continues as it would alone."""
    model = make_model(case, seed=11)
    sinks, window = 2, 5
    big = BatchedRun(model, model.new_cache(3, sinks, window), seed=1)
    big.run([Call([12, 4, 9], 12), Call([1, 1, 0], 1), Call([1, 0, 1], 1)])
    stream = big.current[2]
    state = big.cache.export_row(2)
    for B, dst in ((1, 0), (2, 1)):
        other = BatchedRun(model, model.new_cache(B, sinks, window), seed=2)
        other.run([Call([5] * B, 5)])  # something else first, in every row
        other.cache.import_row(dst, state)
        other.current[dst], other.seen[dst] = Stream(rows=[2, dst], tokens=list(stream.tokens)), big.seen[2]
        other.check_counters(f"after importing into row {dst} of a {B}-row cache")
        cont = other.current[dst]
        other.run([Call([9] * B, 9), Call([1] * B, 1), Call([0] * (B - 1) + [1], 1, keep=1)])
        full = Stream(rows=cont.rows, tokens=cont.tokens, chunks=stream.chunks + cont.chunks,
                      logits=stream.logits + cont.logits)
        for (a, b, first, i), got, want in zip(full.chunks, full.logits, alone(model, full, sinks, window)):
            err = rel_err(got, want)
            record("7:other-cache", torch.float64, err)
            assert err <= TOL[torch.float64], f"{B}-row cache, row {dst}: tokens {a}:{b}: relative error {err:.3g}"


# ---------------------------------------------------------------------------------------------
# 8: bad input

B8, N8 = 3, 4
BAD_LENGTHS = {
    "too few": [1, 2],
    "too many": [1, 2, 3, 4],
    "tensor too short": torch.tensor([1, 2]),
    "2-D tensor": torch.tensor([[1], [2], [3]]),
    "negative": [1, -1, 2],
    "negative tensor": torch.tensor([1, -1, 2]),
    "more than n": [1, N8 + 1, 2],
    "more than n tensor": torch.tensor([1, N8 + 1, 2]),
    "floats": [1.0, 2.0, 3.0],
    "a fraction": [1, 2.5, 3],
    "float tensor": torch.tensor([1.0, 2.0, 3.0]),
    "bools": [True, False, True],
    "bool tensor": torch.tensor([True, False, True]),
}


def fed_cache(model, B=B8, sinks=2, window=3):
    """A cache whose rows hold streams of different lengths (past S for row 0)."""
    cache = model.new_cache(B, sinks, window)
    model(torch.randint(0, VOCAB, (B, 9), generator=torch.Generator().manual_seed(0)), cache=cache,
          lengths=[9] + [min(9, 2 * b) for b in range(1, B)])
    return cache


def snapshot(cache):
    return [x.clone() for x in (cache.k, cache.v) + ((cache.raw_sink_k,) if cache.raw_sink_k is not None else ())] \
        + [cache.tokens_seen.clone()]


def assert_refused(fn, pattern: str, cache=None):
    """fn() raises a MiniLLMError whose message matches `pattern`, and leaves `cache` as it was."""
    before = snapshot(cache) if cache is not None else None
    with pytest.raises(MiniLLMError) as e:
        fn()
    assert re.search(pattern, str(e.value)), f"message {str(e.value)!r} does not name {pattern!r}"
    if cache is not None:
        after = snapshot(cache)
        assert all(torch.equal(x, y) for x, y in zip(before, after)), "the refused call changed the cache"


@pytest.mark.parametrize("what", list(BAD_LENGTHS))
@torch.no_grad()
def test_8_bad_lengths_are_refused_by_name(what):
    """lengths of the wrong size, negative, above n, or not integers (floats, bools): a MiniLLMError
    that names `lengths`, and the cache is left as it was."""
    model = make_model("llama_gqa", seed=1)
    cache = fed_cache(model)
    ids = torch.zeros(B8, N8, dtype=torch.int64)
    assert_refused(lambda: model(ids, cache=cache, lengths=BAD_LENGTHS[what]), "lengths", cache)


@pytest.mark.parametrize("row", [B8, B8 + 5, -1])
@torch.no_grad()
def test_8_rows_out_of_range_are_refused_by_name(row):
    """reset, export_row and import_row of a row outside 0..B-1 (a negative row included): a
    MiniLLMError that names the row, and the cache is left as it was."""
    model = make_model("llama_gqa", seed=1)
    cache = fed_cache(model)
    state = cache.export_row(0)
    assert_refused(lambda: cache.reset(row), "row", cache)
    assert_refused(lambda: cache.reset([0, row]), "row", cache)
    assert_refused(lambda: cache.export_row(row), "row", cache)
    assert_refused(lambda: cache.import_row(row, state), "row", cache)


FOREIGN = {  # how the cache a state comes from differs from the one it is imported into
    "another model": lambda m, m2: fed_cache(m2),
    "other sinks": lambda m, m2: fed_cache(m, sinks=3),
    "other window": lambda m, m2: fed_cache(m, window=4),
    "other dtype": lambda m, m2: m.new_cache(B8, 2, 3, dtype=torch.float32),
}


@pytest.mark.parametrize("variant", ["llama_gqa", "mpt"])
@pytest.mark.parametrize("origin", list(FOREIGN))
@torch.no_grad()
def test_8_foreign_states_are_refused_by_name(origin, variant):
    """import_row of a state exported by another model's cache (same config, other weights: a model
    with the same weights is the same model, tests/test_importing.py), or by a cache of
    other sinks, window or dtype: a MiniLLMError naming the state (or import_row), and the cache is
    left as it was."""
    model = make_model(variant, seed=1)
    other_model = make_model(variant, seed=2)  # the same config, other weights
    state = FOREIGN[origin](model, other_model).export_row(1)
    cache = fed_cache(model)
    assert_refused(lambda: cache.import_row(1, state), r"state|import_row", cache)


@torch.no_grad()
def test_8_lengths_forms_agree():
    """lengths as a list of ints, an int64 tensor and an int32 tensor feed the same tokens (and with
    every length n, passing no lengths at all is the same as passing them)."""
    model = make_model("falcon_40b", seed=2)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    outs, caches = [], []
    for lengths in ([7, 0, 3], torch.tensor([7, 0, 3]), torch.tensor([7, 0, 3], dtype=torch.int32)):
        cache = model.new_cache(3, 2, 3)
        outs.append(model(ids, cache=cache, lengths=lengths))
        caches.append(cache)
    for out, cache in zip(outs[1:], caches[1:]):
        assert torch.equal(out[0], outs[0][0]) and torch.equal(out[2, :3], outs[0][2, :3])
        assert_caches_equal(cache, caches[0], "lengths as a tensor")
    a, b = model.new_cache(3, 2, 3), model.new_cache(3, 2, 3)
    got, want = model(ids, cache=a), model(ids, cache=b, lengths=[7, 7, 7])
    assert rel_err(got, want) <= TOL[torch.float64]
    assert a.tokens_seen.tolist() == b.tokens_seen.tolist() == [7, 7, 7]


# ---------------------------------------------------------------------------------------------
# 9: decode steps with rows at very different positions


def long_decode_schedule(S: int) -> list[Call]:
    """Row 0: a 6S prefill, then decode to ~11S (wrapping its ring about ten times); row 1: a
    3-token prefill, then decode; row 2: S+1 tokens, reset mid-run, a fresh stream by decode steps;
    row 3: idle at first, then every other step. Includes one call in which every length is 0, and
    one ragged chunk in the middle of the decode steps."""
    calls = [Call([6 * S, 3, S + 1, 0], 6 * S)]
    for i in range(5 * S):
        lengths = [1, 1, 1, int(i > S and i % 2 == 0)]
        reset = [2] if i == 2 * S else None
        if i == 3 * S:
            calls.append(Call([0, 0, 0, 0], 1))  # nobody moves
            calls.append(Call([2, 0, S + 2, 1], S + 2))  # a ragged chunk between decode steps
        calls.append(Call(lengths, 1, form="tensor" if i % 3 else "list", keep=int(i % 4 == 0), reset=reset))
    return calls


@properties
@torch.no_grad()
def test_9_decode_with_rows_at_different_positions(case):
    """Decode steps over 4 rows at positions from 0 to ~11S (sinks 2, window 5): every row's logits
    equal its streams alone in batch-1 caches, and the reference (float64, 1e-9)."""
    model = make_model(case, seed=7)
    sinks, window = 2, 5
    s = Setup(size={}, seed=5, B=4, sinks=sinks, window=window, max_chunk=1024)
    run = batched_run(model, s, long_decode_schedule(sinks + window))
    assert run.cache.tokens_seen[0] >= 10 * (sinks + window)
    check_against_alone(model, run, sinks, window, torch.float64, "9:decode-positions")
    check_against_reference(model, run, sinks, window, torch.float64, "9:decode-positions")
