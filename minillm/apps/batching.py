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

`ChatSessions` keeps several conversations in one cache, a row each, and `turns({i: text, ...})`
runs a turn of any of them together: their new tokens in one ragged prefill, their replies decoded
in the same batched steps, each session rendering its turns exactly as a lone `ChatSession`.

The loop itself, `run_rows`, lives in minillm/generation.py beside `generate` and `ChatSession`,
whose sampling (`Sampler`) and turn bookkeeping (`ChatSession.begin_turn`, `Reply`) it shares;
this module holds the batched APIs on top of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch

from .checks import check_int, check_model
from .errors import MiniLLMError
from .generation import SEED_RANGE, ChatSession, Row, chat_turns, make_sampler, new_stream_ids, run_rows


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
                   eos_ids: Iterable[int] = (), ignore_eos: bool = False,
                   vocab_size: int | None = None) -> Iterator[BatchEvent]:
    """Generate for many prompts through one cache of `batch_size` rows, by continuous batching
    (the module docstring); yield a `BatchEvent` (index, token, stop) for every token, as it is
    produced.

    Each prompt is a sequence of token ids, or a `Request` with settings of its own. The settings
    are `generate`'s, for every prompt; prompt i samples from a generator seeded with
    `row_seed(seed, i)` = seed + i unless its Request gives a seed. So prompt i's tokens are
    those of `generate(model, ids_i, seed=seed + i, ...)`, whatever the batch size and the other
    prompts. Each prompt stops on its own: its EOS id is yielded with stop "eos" (unless
    `ignore_eos`), or its last token with stop "length". `prompts` may be an iterator: it is
    read only as rows free up, so an endless source is served in constant memory. A prompt is
    checked when its row takes it; a bad one raises MiniLLMError naming its index.
    """
    check_model(model)
    check_int("batch_size", batch_size, 1)
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
    cache = model.new_cache(batch_size=batch_size, sinks=sinks, window=window)
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


# ----------------------------------------------------------------------------------------------
# Chat


class ChatSessions:
    """`n` conversations over one shared cache of `n` rows, one row each.

        chats = minillm.ChatSessions(model, tok, 4, window=1020, temperature=0)
        for i, piece in chats.turns({0: "Hello!", 2: "What is the capital of France?"}):
            ...

    Every keyword is `ChatSession`'s; session i samples from `seed + i`, so session i's fed ids
    and replies are those of `ChatSession(model, tok, seed=seed + i, ...)` having the same
    conversation alone. `chats[i]` is session i (a `ChatSession`; `chats[i].turn(text)` runs a
    turn of it alone, in its row). `turns` runs one turn of each session given, together.
    """

    def __init__(self, model, tokenizer, n: int, *, sinks: int = 4, window: int = 1020, seed: int = 0, **settings):
        check_model(model)
        check_int("n", n, 1)
        self.cache = model.new_cache(batch_size=n, sinks=sinks, window=window)
        self.sessions = [ChatSession(model, tokenizer, cache=self.cache, row=i, seed=row_seed(seed, i), **settings)
                         for i in range(n)]

    def __len__(self) -> int:
        return len(self.sessions)

    def __getitem__(self, i: int) -> ChatSession:
        return self.sessions[i]

    def turns(self, texts: Mapping[int, str]) -> Iterator[tuple[int, str]]:
        """One turn of each session i in `texts` ({i: user text}), together; yield (i, piece)."""
        if not isinstance(texts, Mapping):
            raise MiniLLMError(f"turns takes a mapping {{session index: text}}, got {type(texts).__name__}")
        for i in texts:
            check_int("session index", i, 0, len(self.sessions) - 1, hint=f" ({len(self.sessions)} sessions)")
        index = {self.sessions[i]: i for i in texts}
        for session, piece in chat_turns({self.sessions[i]: text for i, text in texts.items()}):
            yield index[session], piece
