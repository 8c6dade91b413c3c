"""minillm.testing: check any engine's sink cache against minillm, with Hypothesis.

An *engine* is any object with two methods:

    reset()                              start a new stream
    feed(ids: list[int]) -> Tensor       (len(ids), vocab) logits for those tokens, streamed after
                                         everything fed since reset()

`check_engine(make_engine, model_dir, sinks=4, window=60)` draws random token streams (up to 4S
tokens, S = sinks + window, at least one longer than 3S in every run) and chunk schedules (1 to 3S
tokens a call), feeds them to fresh engines from `make_engine()`, and compares every logit with
minillm's own streaming forward on `model_dir` in float64. On the first divergence it lets
Hypothesis shrink the case and raises one `ConformanceError` naming the token, its chunk, its
position relative to S, the worst error, and the shrunk reproduction (tokens and chunk sizes).

Two position conventions (docs/streaming.md): `positions="cache"` (the paper: the cached keys at
positions 0..L-1 of the cache, the query at L-1) and `positions="absolute"` (every key at its
position in the text, the query at t). docs/testing.md has the tolerances and a worked example.

Hypothesis comes with the `testing` extra: pip install "minillm-sinks[testing]" (or the dev extra).
"""

from __future__ import annotations

import importlib
import math
import random
from dataclasses import dataclass, field

import torch

from ..errors import MiniLLMError

__all__ = ["MiniLLMEngine", "check_engine", "ConformanceError", "ConformanceReport", "TOLERANCES", "POSITIONS",
           "strategies"]

POSITIONS = ("cache", "absolute")

# Default bound on |engine logit - float64 reference logit| per dtype the engine computes in,
# measured with MiniLLMEngine on weights/llama-tiny and SmolLM2-135M (docs/testing.md): about ten
# times the worst error seen, so rounding passes and a wrong key, position or mask does not.
TOLERANCES = {
    torch.float64: 1e-8,
    torch.float32: 5e-3,
    torch.bfloat16: 1.0,
    torch.float16: 0.15,
}


class ConformanceError(AssertionError):
    """An engine's logits diverged from the reference (or the engine raised: then `__cause__` is its
    exception and `worst_error` is None).

    Attributes: token_index (in the stream), chunk_index (the feed() call, from 0), token_in_chunk,
    position_vs_S (token_index - S), worst_error (max |got - want| over that token's logits), atol,
    tokens and chunks (the reproduction: feed chunks of these sizes after reset(); after an engine
    exception, the stream so far), positions, sinks, window."""

    def __init__(self, *, token_index, chunk_index, token_in_chunk, worst_error, atol, tokens, chunks,
                 positions, sinks, window, raised: BaseException | None = None):
        self.token_index, self.chunk_index, self.token_in_chunk = token_index, chunk_index, token_in_chunk
        self.worst_error, self.atol = worst_error, atol
        self.tokens, self.chunks = list(tokens), list(chunks)
        self.positions, self.sinks, self.window = positions, sinks, window
        S = sinks + window
        self.position_vs_S = token_index - S
        where = (f"token {token_index} (S{self.position_vs_S:+d}, S={S}: sinks {sinks} + window {window}), "
                 f"chunk {chunk_index} (token {token_in_chunk} of {chunks[chunk_index]})")
        repro = f"reproduction: tokens={self.tokens} chunks={self.chunks}"
        if raised is not None:
            what = f"the engine raised {type(raised).__name__}: {_one_line(raised)} at {where}"
        else:
            what = (f"the engine diverges from minillm's float64 reference ({positions} positions) at {where}: "
                    f"worst logit error {worst_error:.3g} > atol {atol:.3g}")
        super().__init__(f"{what}; {repro}")


@dataclass
class ConformanceReport:
    """What a passing check_engine run saw: examples run, the longest stream, the worst logit error
    overall, and the worst among streams fed one token at a time and among chunked ones."""
    examples: int = 0
    longest: int = 0
    worst_error: float = 0.0
    worst_token_by_token: float = 0.0
    worst_chunked: float = 0.0
    S: int = 0
    positions: str = "cache"
    atol: float = 0.0
    lengths: list = field(default_factory=list, repr=False)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _check_positions(positions, who: str) -> str:
    if not isinstance(positions, str) or positions not in POSITIONS:
        raise MiniLLMError(f"{who}: positions must be 'cache' or 'absolute', got {positions!r}")
    return positions


def _new_cache(model, sinks: int, window: int, positions: str, dtype=None):
    return model.new_cache(batch_size=1, sinks=sinks, window=window, dtype=dtype, positions=positions)


class MiniLLMEngine:
    """minillm itself as an engine: a batch-1 SinkCache of `sinks` + `window` on `model` (a
    minillm.Model), in the given position convention."""

    def __init__(self, model, sinks: int, window: int, positions: str = "cache"):
        self.model = model
        self.positions = _check_positions(positions, "MiniLLMEngine")
        self.cache = _new_cache(model, sinks, window, self.positions)

    def reset(self) -> None:
        self.cache.reset()

    @torch.no_grad()
    def feed(self, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([list(ids)], dtype=torch.int64, device=self.model.device)
        return self.model(x, cache=self.cache)[0]


class _Abort(BaseException):
    """Carries a bad-input error out of Hypothesis at once (no shrinking, no notes)."""


def _check_output(out, n: int, vocab: int, chunk_index: int) -> torch.Tensor:
    where = f"engine.feed() of chunk {chunk_index} ({n} tokens)"
    if not isinstance(out, torch.Tensor):
        raise _Abort(MiniLLMError(f"{where} returned a {type(out).__name__}, not a torch.Tensor of shape ({n}, {vocab})"))
    if not out.dtype.is_floating_point:
        raise _Abort(MiniLLMError(f"{where} returned a {out.dtype} tensor; logits must be a floating-point tensor"))
    if out.dim() != 2 or out.shape[1] != vocab:
        raise _Abort(MiniLLMError(f"{where} returned shape {tuple(out.shape)}, not ({n}, {vocab}): one row of "
                                  f"{vocab} logits per token fed"))
    if out.shape[0] != n:
        raise _Abort(MiniLLMError(f"{where} returned logits for {out.shape[0]} tokens, not {n} "
                                  f"(shape {tuple(out.shape)}, expected ({n}, {vocab}))"))
    return out.detach().to(device="cpu", dtype=torch.float64)


def check_engine(make_engine, model_dir, *, sinks: int, window: int, positions: str = "cache",
                 max_examples: int = 50, dtype=torch.float32, atol: float | None = None) -> ConformanceReport:
    """Check the engines `make_engine()` returns against minillm's float64 stream on `model_dir`.

    `dtype` is what the engine computes in: it picks the default `atol` (TOLERANCES), the bound on
    |engine logit - reference logit| for every logit of every token. Runs `max_examples` Hypothesis
    examples (no deadline, health checks for slow engines off, no example database); returns a
    ConformanceReport, or raises one ConformanceError (the shrunk first divergence). Bad arguments
    and malformed engine output raise MiniLLMError with one line naming the problem."""
    try:
        from hypothesis import HealthCheck, Verbosity, given, settings
        from hypothesis import strategies as st
    except ImportError as e:  # pragma: no cover - the testing extra is missing
        raise MiniLLMError("minillm.testing.check_engine needs Hypothesis: pip install 'minillm-sinks[testing]'") from e
    from ..api import load
    from ..checks import check_int
    from .strategies import chunkings, streams

    positions = _check_positions(positions, "check_engine")
    sinks = check_int("check_engine: sinks", sinks, 0)
    window = check_int("check_engine: window", window, 1)
    max_examples = check_int("check_engine: max_examples", max_examples, 1)
    if not callable(make_engine):
        raise MiniLLMError(f"check_engine: make_engine must be a no-argument callable returning an engine, "
                           f"got {type(make_engine).__name__}")
    if atol is None:
        if dtype not in TOLERANCES:
            raise MiniLLMError(f"check_engine: no default tolerance for dtype {dtype!r}; pass atol= "
                               f"(defaults exist for {', '.join(str(d) for d in TOLERANCES)})")
        atol = TOLERANCES[dtype]
    elif isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol > 0 or not math.isfinite(atol):
        raise MiniLLMError(f"check_engine: atol must be a positive finite number, got {atol!r}")
    atol = float(atol)
    oracle = load(model_dir, dtype=torch.float64)
    vocab = oracle.config.vocab_size
    S = sinks + window
    report = ConformanceReport(S=S, positions=positions, atol=atol)

    @torch.no_grad()
    def run(tokens: list[int], chunks: list[int]) -> None:
        cache = _new_cache(oracle, sinks, window, positions, dtype=torch.float64)
        want = oracle(torch.tensor([tokens], dtype=torch.int64), cache=cache)[0]
        t = 0
        worst = 0.0
        try:
            engine = make_engine()
            engine.reset()
        except Exception as e:
            raise ConformanceError(token_index=0, chunk_index=0, token_in_chunk=0, worst_error=None, atol=atol,
                                   tokens=tokens[:chunks[0]], chunks=chunks[:1], positions=positions, sinks=sinks,
                                   window=window,
                                   raised=e) from e
        for c, n in enumerate(chunks):
            try:
                out = engine.feed(tokens[t:t + n])
            except Exception as e:
                raise ConformanceError(token_index=t, chunk_index=c, token_in_chunk=0, worst_error=None, atol=atol,
                                       tokens=tokens[:t + n], chunks=chunks[:c + 1], positions=positions,
                                       sinks=sinks, window=window, raised=e) from e
            got = _check_output(out, n, vocab, c)
            errs = (got - want[t:t + n]).abs().amax(dim=1).nan_to_num(nan=math.inf)
            bad = (errs > atol).nonzero()
            if len(bad):
                j = int(bad[0])
                raise ConformanceError(token_index=t + j, chunk_index=c, token_in_chunk=j, worst_error=float(errs[j]),
                                       atol=atol, tokens=tokens, chunks=chunks, positions=positions, sinks=sinks,
                                       window=window)
            worst = max(worst, float(errs.max()))
            t += n
        report.examples += 1
        report.longest = max(report.longest, len(tokens))
        report.lengths.append(len(tokens))
        report.worst_error = max(report.worst_error, worst)
        if all(n == 1 for n in chunks):
            report.worst_token_by_token = max(report.worst_token_by_token, worst)
        else:
            report.worst_chunked = max(report.worst_chunked, worst)

    long_streams = streams(vocab, 4 * S, min_len=3 * S + 1)

    @st.composite
    def cases(draw):
        tokens = draw(st.one_of(long_streams, streams(vocab, 4 * S)))  # the first branch is Hypothesis' first try
        return tokens, draw(chunkings(len(tokens), max_chunk=3 * S))

    @settings(max_examples=max_examples, deadline=None, database=None, report_multiple_bugs=False,
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet, print_blob=False)
    @given(case=cases())
    def prop(case):
        run(*case)

    try:
        prop()
        # Then one random 4S-token stream in mixed chunks, every run: Hypothesis' first (simplest)
        # long case repeats one token, and a repeated token hides which keys a query sees.
        rng = random.Random(S)
        tokens = [rng.randrange(vocab) for _ in range(4 * S)]
        pattern = [1, 3 * S, 2, S - 1 if S > 1 else 1, 7]
        chunks, left = [], len(tokens)
        while left:
            chunks.append(min(pattern[len(chunks) % len(pattern)], left))
            left -= chunks[-1]
        run(tokens, chunks)
    except _Abort as e:
        raise e.args[0] from None
    except ConformanceError as e:
        if e.worst_error is not None and sum(e.chunks) > e.token_index + 1:
            e = _truncated(run, e)  # Hypothesis keeps the long-stream branch; tokens past the divergence can go
        e.__traceback__ = None
        if hasattr(e, "__notes__"):
            del e.__notes__  # Hypothesis' "Falsifying example": the attributes say it all
        raise e
    except BaseException as e:  # Hypothesis' Flaky/FlakyFailure group of an engine that is not deterministic
        inner = _first_conformance(e)
        if inner is None:
            raise
        raise inner from None
    return report


def _truncated(run, e: ConformanceError) -> ConformanceError:
    """The reproduction cut just after the diverging token, when it still diverges there."""
    n, chunks = e.token_index + 1, []
    for c in e.chunks:
        chunks.append(min(c, n - sum(chunks)))
        if sum(chunks) == n:
            break
    try:
        run(e.tokens[:n], chunks)
    except ConformanceError as shorter:
        if shorter.worst_error is not None:
            return shorter
    except Exception:
        pass
    return e


def _first_conformance(e: BaseException):
    if isinstance(e, ConformanceError):
        return e
    for sub in getattr(e, "exceptions", ()):
        found = _first_conformance(sub)
        if found is not None:
            return found
    return None


def __getattr__(name: str):
    if name == "strategies":
        return importlib.import_module(".strategies", __name__)
    raise AttributeError(f"module 'minillm.testing' has no attribute {name!r}")
