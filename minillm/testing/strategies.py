"""Hypothesis strategies for streaming tests: the ones `check_engine` draws from, and minillm's own
property tests (tests/test_streaming.py, tests/test_batched.py) too.

    streams(vocab, max_len)      a token list (ints in [0, vocab)), 1..max_len long
    chunkings(n)                 chunk sizes (positive ints) that add up to n
    ragged_schedules(batch, S)   a list of `Call`s: ragged batched chunks, decode runs and resets

Importing this module imports Hypothesis (the `testing` extra: pip install "minillm-sinks[testing]").
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

__all__ = ["streams", "chunkings", "ragged_schedules", "Call"]


def streams(vocab: int, max_len: int, min_len: int = 1) -> st.SearchStrategy[list[int]]:
    """A token stream: a list of min_len..max_len token ids in [0, vocab). Shrinks towards short
    streams of token 0."""
    if vocab < 1 or not 1 <= min_len <= max_len:
        raise ValueError(f"streams: need vocab >= 1 and 1 <= min_len <= max_len, got vocab={vocab}, "
                         f"min_len={min_len}, max_len={max_len}")
    return st.lists(st.integers(0, vocab - 1), min_size=min_len, max_size=max_len)


def _split(sizes: list[int], max_chunk: int | None) -> list[int]:
    if max_chunk is None:
        return sizes
    out = []
    for n in sizes:
        out += [max_chunk] * (n // max_chunk) + ([n % max_chunk] if n % max_chunk else [])
    return out


@st.composite
def chunkings(draw, n: int, max_chunk: int | None = None) -> list[int]:
    """Chunk sizes that add up to n (each at most max_chunk, when given): random cut points (up to
    12), a prefill followed by single-token decode steps, or one fixed chunk size repeated (the
    last chunk takes the rest). Shrinks towards a single chunk (or max_chunk-sized ones)."""
    if n < 1 or (max_chunk is not None and max_chunk < 1):
        raise ValueError(f"chunkings: need n >= 1 and max_chunk >= 1, got n={n}, max_chunk={max_chunk}")
    if n == 1:
        return [1]
    mode = draw(st.integers(0, 2))
    if mode == 0:  # random cut points
        cuts = sorted(set(draw(st.lists(st.integers(1, n - 1), unique=True, max_size=min(n - 1, 12)))))
        edges = [0, *cuts, n]
        sizes = [b - a for a, b in zip(edges[:-1], edges[1:])]
    elif mode == 1:  # a prefill, then decode steps
        prefill = draw(st.integers(1, n))
        sizes = [prefill] + [1] * (n - prefill)
    else:  # a fixed chunk size
        k = draw(st.integers(1, n if max_chunk is None else min(n, max_chunk)))
        sizes = [k] * (n // k) + ([n % k] if n % k else [])
    return _split(sizes, max_chunk)


@dataclass
class Call:
    """One batched forward: row b consumes lengths[b] tokens of a (B, n) input.

    Before the forward, optionally: `move` = (src, dst): state = export_row(src), reset(src),
    import_row(dst, state); then `reset`: None, "all" (cache.reset()), an int or a list of rows."""
    lengths: list[int]
    n: int
    form: str = "list"  # how lengths is passed: "list", "tensor" (int64), or "absent" (every row takes n)
    keep: int = 0  # logits_to_keep
    reset: object = None
    move: tuple[int, int] | None = None


@st.composite
def ragged_schedules(draw, batch: int, S: int, max_events: int = 6, resets: bool = True,
                     moves: bool = False) -> list[Call]:
    """A list of `Call`s for a batch of `batch` rows and a cache of capacity S: ragged chunks of up
    to 3S tokens, and runs of up to S+2 decode steps (every length 0 or 1) in which row b takes a
    token every `every[b]` steps (0: never), so rows drift apart; occasional resets of random rows
    (and, with moves, row moves) before an event."""
    if batch < 1 or S < 1:
        raise ValueError(f"ragged_schedules: need batch >= 1 and S >= 1, got batch={batch}, S={S}")
    B = batch
    calls: list[Call] = []
    for _ in range(draw(st.integers(1, max_events))):
        reset = move = None
        if resets and draw(st.integers(0, 4)) == 0:
            rows = draw(st.lists(st.integers(0, B - 1), min_size=1, max_size=B, unique=True))
            reset = draw(st.sampled_from(["all", rows, rows[0]]))
        if moves and draw(st.integers(0, 2)) == 0:
            move = (draw(st.integers(0, B - 1)), draw(st.integers(0, B - 1)))
        keep = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3]))
        if draw(st.integers(0, 2)) == 0:  # a run of decode steps
            steps = draw(st.integers(1, S + 2))
            every = draw(st.lists(st.sampled_from([0, 1, 1, 2, 3]), min_size=B, max_size=B))
            n = draw(st.sampled_from([1, 1, 2]))  # n = 2: decode steps with one padded column
            forms = ["list", "tensor"] + (["absent"] if n == 1 and all(e == 1 for e in every) else [])
            form = draw(st.sampled_from(forms))
            for i in range(steps):
                lengths = [int(e > 0 and i % e == 0) for e in every]
                calls.append(Call(lengths, n, form, keep, reset if i == 0 else None, move if i == 0 else None))
        else:  # one ragged chunk
            n = draw(st.integers(1, 3 * S))
            lengths = draw(st.lists(st.one_of(st.just(0), st.just(n), st.integers(0, n)), min_size=B, max_size=B))
            form = draw(st.sampled_from(["list", "tensor"] + (["absent"] if all(L == n for L in lengths) else [])))
            calls.append(Call(lengths, n, form, keep, reset, move))
    return calls
