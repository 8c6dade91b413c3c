"""Many streams at once: continuous batching over the rows of one cache, and chat sessions sharing one.

    for index, token, stop in minillm.generate_batch(model, [ids_a, ids_b, ids_c], batch_size=2):
        ...   # prompt `index` produced `token`; `stop` is "eos" or "length" on its last one

Every row of a cache of B rows is its own stream: its own sinks, window and position count
(docs/streaming.md), fed by ragged calls, `model(ids, cache=cache, lengths=...)`, in which row b
consumes its own `lengths[b]` tokens and a row of length 0 is not touched. `generate_batch` keeps
the rows busy by *continuous batching*, one loop of four steps:

1. admit: every free row takes the next pending prompt, and `cache.reset([row])` makes it a new
   stream there;
2. prefill: the admitted prompts go through the cache together, right-padded, in ragged chunks
   (`prefill_rows`); the rows already generating consume nothing;
3. sample: every active row draws its next token from its own logits with its own seeded
   generator (`Sampler`, the very calls `generate` makes); a row that draws an EOS id or reaches
   its `max_new_tokens` is finished, and its row is free for step 1;
4. decode: the rows still going feed their token in one batched step (the others length 0),
   and the loop returns to step 1.

A short answer therefore never waits for a long one, and a finished row is refilled at the next
step. Rows never interact (the engine's per-row contract), so each prompt's tokens are those
`generate(model, ids, seed=...)` produces for it alone (tests/test_batch_generation.py).

The loop is `run_rows`, over `Row`s (a stream each: its sampling, its prompt); `generate_batch`
feeds it prompts, and `minillm.ChatSessions` (minillm/apps/chat.py) feeds it chat turns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..checks import check_int, check_model
from ..core.contract import check_positions
from ..errors import MiniLLMError
from .generation import new_stream_ids, prefill_chunk, step_name
from .sampling import SEED_RANGE, Sampler, check_finite, make_sampler


# ----------------------------------------------------------------------------------------------
# The loop


def prefill_rows(model, cache, feeds: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """`prefill` for several streams of one cache at once: row b consumes its own ids feeds[b]
    (1-D, any lengths), rows not in `feeds` consume nothing; returns {b: logits (V,)} at each
    row's last fed token.

    The rows go in together, right-padded, through ragged calls (`lengths`) of at most
    `model.max_chunk` columns, each asking for one position's logits per row, so memory is bounded
    as in `prefill`; a row whose ids end in an earlier chunk consumes nothing in the later ones."""
    B = cache.batch_size
    total = [len(feeds[b]) if b in feeds else 0 for b in range(B)]
    ids = torch.zeros((B, max(total)), dtype=torch.long, device=model.device)  # right padding: id 0
    for b, feed in feeds.items():
        ids[b, : len(feed)] = feed
    step, out = prefill_chunk(model), {}
    with torch.no_grad():
        for p0 in range(0, ids.shape[1], step):
            lengths = [min(max(t - p0, 0), step) for t in total]
            logits = model(ids[:, p0 : p0 + max(lengths)], cache=cache, lengths=lengths, logits_to_keep=1)
            out.update({b: logits[b, -1] for b in feeds if lengths[b] and p0 + lengths[b] == total[b]})
    return out


@dataclass
class Row:
    """A stream in a row of the cache: whose it is, how it samples, and what it feeds next."""
    key: object  # the prompt's index, or the ChatSession
    label: str  # names the stream in errors: "prompt 3", "session row 1"
    sampler: Sampler
    ids: torch.Tensor  # (1, L): the prompt to prefill (with the sink prefix on a new stream)
    new_stream: bool  # reset the row before the prefill
    logits: torch.Tensor | None = None  # (V,): what the next token is drawn from
    start: int = 0  # the row's tokens_seen before the prefill


def run_rows(model, cache, take) -> Iterator[tuple[Row, int | None, str | None]]:
    """The continuous-batching loop over the rows of `cache`: streams of their own in each row.

    Each pass: (1) every free row b takes its next stream, `take(b)` (a new one is reset there);
    (2) the streams just taken are prefilled together (`prefill_rows`); (3) every active row
    draws its next token (`Sampler.next`, as `generate` draws it) and a row whose stream stops
    is free again; (4) the rows still going feed their token in one batched decode step (the
    others length 0). The module docstring explains what this gives (`generate_batch`).

    `take(b)` gives free row b its next stream (a `Row`), or None when there is none left; the
    loop ends when no row is active and nothing is left. Yields (row, token, stop) for every
    token drawn. A stream that may draw none (max_new_tokens=0) is prefilled all the same, as
    `generate` prefills it, and yields (row, None, "length")."""
    B = cache.batch_size
    rows: list[Row | None] = [None] * B
    step = torch.zeros((B, 1), dtype=torch.long, device=model.device)  # each row's last token
    while True:
        admitted: dict[int, Row] = {}
        for b in range(B):
            if rows[b] is None and (row := take(b)) is not None:
                admitted[b] = row
        if admitted:
            fresh = [b for b, r in admitted.items() if r.new_stream and int(cache.tokens_seen[b])]
            if fresh:
                cache.reset(fresh)
            for b, r in admitted.items():
                rows[b], r.start = r, int(cache.tokens_seen[b])
            for b, logits in prefill_rows(model, cache, {b: r.ids[0] for b, r in admitted.items()}).items():
                r = admitted[b]
                r.logits = logits
                check_finite(logits[: r.sampler.vocab_size], model, r.ids,
                             f"{r.label}: {step_name(0, int(cache.tokens_seen[b]) - 1, r.start)}")
                if r.sampler.done:
                    rows[b] = None
                    yield r, None, "length"
        active = [b for b in range(B) if rows[b] is not None]
        if not active:
            if admitted:  # all of them asked for no tokens: take more
                continue
            return
        lengths = [0] * B
        for b in active:
            r = rows[b]
            token, stop = r.sampler.next(r.logits)
            yield r, token, stop
            if stop:
                rows[b] = None
            else:
                step[b, 0] = token
                lengths[b] = 1
        if not any(lengths):
            continue
        with torch.no_grad():
            logits = model(step, cache=cache, lengths=lengths, logits_to_keep=1)
        for b in active:
            r = rows[b]
            if r is not None:
                r.logits = logits[b, -1]
                check_finite(r.logits[: r.sampler.vocab_size], model, step[b : b + 1],
                             f"{r.label}: {step_name(r.sampler.n, int(cache.tokens_seen[b]) - 1, r.start)}")


# ----------------------------------------------------------------------------------------------
# Many prompts


class Request:
    """One prompt of `generate_batch` with settings of its own: any of `SETTINGS` given here
    replaces the call's value for this prompt only.

        Request(ids, max_new_tokens=20, seed=7)
    """

    SETTINGS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed")

    def __init__(self, ids: Sequence[int] | torch.Tensor, **settings):
        unknown = sorted(set(settings) - set(self.SETTINGS))
        if unknown:
            raise MiniLLMError(f"Request: unknown setting {unknown[0]!r} (known: {', '.join(self.SETTINGS)})")
        self.ids, self.settings = ids, settings

    def __repr__(self) -> str:
        return f"Request({self.ids!r}{''.join(f', {k}={v!r}' for k, v in self.settings.items())})"


class BatchEvent(NamedTuple):
    """A token of prompt `index` (its place in the prompts given). `stop` is None while the prompt
    goes on, and "eos" (the token is an EOS id) or "length" on its last token. A prompt with
    max_new_tokens=0 has one event, with token None and stop "length" (its prompt is still
    prefilled, as `generate` prefills it)."""
    index: int
    token: int | None
    stop: str | None


def row_seed(seed: int, index: int) -> int:
    """Prompt `index`'s default seed: seed + index, wrapped past torch's largest seed (2**64 - 1)."""
    s = seed + index
    return s if s <= SEED_RANGE[1] else s % (1 << 64)


def generate_batch(model, prompts: Iterable[Sequence[int] | torch.Tensor | Request], *, batch_size: int = 8,
                   max_new_tokens: int | None = 256, temperature: float = 0.8, top_k: int | None = None,
                   top_p: float | None = 0.95, seed: int = 0, sinks: int = 4, window: int = 1020,
                   eos_ids: Iterable[int] | None = None, ignore_eos: bool = False,
                   vocab_size: int | None = None, positions: str = "cache") -> Iterator[BatchEvent]:
    """Generate for many prompts through one cache of `batch_size` rows, by continuous batching
    (the module docstring); yield a `BatchEvent` (index, token, stop) for every token, as it is
    produced.

    Each prompt is a sequence of token ids, or a `Request` with settings of its own. The settings
    are `generate`'s (`positions` too: the cache's position convention), for every prompt; prompt i samples from a generator seeded with
    `row_seed(seed, i)` = seed + i unless its Request gives a seed. So prompt i's tokens are
    those of `generate(model, ids_i, seed=seed + i, ...)`, whatever the batch size and the other
    prompts (`eos_ids=None`: the model's `eos_ids`, as in `generate`). Each prompt stops on its own: its EOS id is yielded with stop "eos" (unless
    `ignore_eos`), or its last token with stop "length". `prompts` may be an iterator: it is
    read only as rows free up, so an endless source is served in constant memory. A prompt is
    checked when its row takes it; a bad one raises MiniLLMError naming its index.
    """
    check_model(model)
    check_int("batch_size", batch_size, 1)
    check_positions(positions)
    defaults = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    common = dict(eos_ids=eos_ids, ignore_eos=ignore_eos, vocab_size=vocab_size)
    make_sampler(model, seed=seed, **defaults, **common)  # the call's own settings, checked up front
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Iterable):
        raise MiniLLMError(f"prompts must be a collection of token-id sequences (encode text with the "
                           f"tokenizer first), got {type(prompts).__name__}")
    if hasattr(prompts, "__len__"):
        batch_size = min(batch_size, len(prompts))  # no row that could never be used
        if batch_size == 0:
            return
    cache = model.new_cache(batch_size=batch_size, sinks=sinks, window=window, positions=positions)
    pending = enumerate(prompts)

    def take(b: int) -> Row | None:
        for i, prompt in pending:
            ids, settings = (prompt.ids, prompt.settings) if isinstance(prompt, Request) else (prompt, {})
            try:
                sampler = make_sampler(model, **{**defaults, "seed": row_seed(seed, i), **settings}, **common)
                return Row(i, f"prompt {i}", sampler, new_stream_ids(model, ids, 0), new_stream=True)
            except MiniLLMError as e:
                raise MiniLLMError(f"prompt {i}: {e}") from None
        return None

    for row, token, stop in run_rows(model, cache, take):
        yield BatchEvent(row.key, token, stop)
