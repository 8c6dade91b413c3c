"""Streaming generation: one prompt through a fixed-size sink+window cache, a token at a time.

    for token in minillm.generate(model, tok.encode("Once upon a time"), max_new_tokens=50):
        ...

`generate` prefills the prompt through the fixed-shape sink+window cache (a prompt longer than
the cache is windowed exactly, docs/streaming.md), then decodes one token per step. Nothing grows
with the number of generated tokens: the cache is allocated once and no token list is kept, so
`max_new_tokens=None` can run forever in constant memory.

`sink_prefix` / `stream_tensor` are the one place that knows about a checkpoint's dedicated sink
token (the paper's §3.3): it is prepended to every stream, before BOS, and never scored.

Many streams in one cache are minillm/apps/batching.py; a conversation is minillm/apps/chat.py;
how a token is drawn is minillm/apps/sampling.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from ..checks import check_model
from ..errors import MiniLLMError
from ..progress import report
from .sampling import check_finite, make_sampler, token_ids


def sink_prefix(config) -> list[int]:
    """The ids to put in front of every stream: the checkpoint's sink token, if it has one."""
    return [] if config.sink_token_id is None else [int(config.sink_token_id)]


def stream_tensor(model, ids: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, int]:
    """(1, L) int64 tensor on the model's device: sink prefix + ids; and the prefix length."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise MiniLLMError(f"ids must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise MiniLLMError(f"ids must be integer token ids, got a {ids.dtype} tensor")
        ids = token_ids(ids)  # (a meta tensor, shapes only, is refused there)
    elif isinstance(ids, str) or not isinstance(ids, Iterable):
        raise MiniLLMError(f"ids must be a sequence of token ids (encode text with the tokenizer first), "
                           f"got {type(ids).__name__}")
    prefix = sink_prefix(model.config)
    ids = prefix + token_ids(ids)
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise MiniLLMError(f"token id {bad[0]} is out of range for the model's vocabulary of "
                           f"{model.config.vocab_size}")
    return torch.tensor([ids], dtype=torch.long, device=model.device), len(prefix)


def prefill(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Feed a prompt (1, T) of any length through `cache`; return the last position's logits (V,).

    The prompt goes in chunks of `model.max_chunk` tokens, each asking the model for its last
    position's logits only (`logits_to_keep=1`): memory is the cache plus one chunk's
    activations, however long the prompt (a (T, vocab) logits tensor would be 128 KB per token
    at a 32k vocabulary). Chunking never changes the result (the streaming contract)."""
    step = prefill_chunk(model)
    logits = None
    with torch.no_grad():
        for p0 in range(0, ids.shape[1], step):
            logits = model(ids[:, p0 : p0 + step], cache=cache, logits_to_keep=1)
            report("prefill", min(p0 + step, ids.shape[1]), ids.shape[1])
    return logits[0, -1]


def prefill_chunk(model) -> int:
    """Tokens per prefill call: the model's `max_chunk` (1024 for a model without one)."""
    return max(1, int(getattr(model, "max_chunk", 1024)))


def new_stream_ids(model, prompt_ids, tokens_seen: int) -> torch.Tensor:
    """(1, L) ids to feed a stream that has consumed `tokens_seen` tokens: the prompt, after the
    sink prefix when the stream is new (a continued stream has it at its start already)."""
    ids, _ = stream_tensor(model, prompt_ids)
    if tokens_seen:
        ids = ids[:, len(sink_prefix(model.config)):]
    if ids.shape[1] == 0:
        raise MiniLLMError("the prompt is empty (no token ids to start from)")
    return ids


def step_name(n: int, position: int, start: int) -> str:
    """Where a stream is, for error messages: after its prompt (n = 0) or at generation step n + 1."""
    if n == 0:
        return f"the prompt's last token (stream position {position})"
    return f"generation step {n + 1} (stream position {position}, {position + 1 - start} tokens into this call)"


def generate(model, prompt_ids: Sequence[int] | torch.Tensor, *, max_new_tokens: int | None = 256,
             temperature: float = 0.8, top_k: int | None = None, top_p: float | None = 0.95,
             seed: int = 0, sinks: int = 4, window: int = 1020, eos_ids: Iterable[int] | None = None,
             ignore_eos: bool = False, vocab_size: int | None = None, cache=None,
             generator: torch.Generator | None = None, positions: str = "cache") -> Iterator[int]:
    """Yield generated token ids, one at a time, streaming through a fixed sink+window cache.

    - `max_new_tokens=None` generates until an EOS id (or forever with `ignore_eos`).
    - An id in `eos_ids` is yielded, then generation stops (unless `ignore_eos`). `eos_ids=None`
      (the default) is the model's own `model.eos_ids` (its EOS and end-of-turn ids, which
      `minillm.load` reads from the checkpoint); `eos_ids=()` stops on none.
    - `cache`: continue an existing stream (a chat); by default a new `model.new_cache(1, sinks,
      window, positions=positions)`, `positions` the position convention ("cache", the paper's, or
      "absolute"; docs/streaming.md). It holds one stream (batch_size 1; `minillm.generate_batch`
      runs many). The sink
      token (if the checkpoint has one) is prepended when the cache is empty.
    - The last yielded id is not fed to the cache (nothing needs its logits); a caller continuing
      the stream must feed it first (ChatSession does).
    - Sampling draws from `generator`, or from a new one seeded with `seed`.

    `minillm.stream_generate` is the text-level form (a string, ids or messages in; text pieces,
    log-probabilities, stop strings and a finish reason out), drawing exactly these tokens.
    """
    for token, _, _ in generate_steps(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                      top_k=top_k, top_p=top_p, seed=seed, sinks=sinks, window=window,
                                      eos_ids=eos_ids, ignore_eos=ignore_eos, vocab_size=vocab_size, cache=cache,
                                      generator=generator, positions=positions):
        yield token


def generate_steps(model, prompt_ids, *, max_new_tokens, temperature, top_k, top_p, seed, sinks, window, eos_ids,
                   ignore_eos, vocab_size, cache, generator,
                   positions: str = "cache") -> Iterator[tuple[int, torch.Tensor, str | None]]:
    """`generate`, yielding (token, the logits it was drawn from, stop: None, "eos" or "length")."""
    check_model(model)
    sampler = make_sampler(model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, eos_ids=eos_ids, ignore_eos=ignore_eos, vocab_size=vocab_size,
                           generator=generator)
    if cache is None:
        cache = model.new_cache(batch_size=1, sinks=sinks, window=window, positions=positions)
    elif not hasattr(cache, "tokens_seen"):
        raise MiniLLMError(f"cache must be a SinkCache from model.new_cache(), got {type(cache).__name__}")
    elif cache.batch_size != 1:
        raise MiniLLMError(f"generate streams one prompt through a cache of batch_size 1, got {cache.batch_size} "
                           f"rows (minillm.generate_batch runs many prompts at once)")
    start = int(cache.tokens_seen[0])
    ids = new_stream_ids(model, prompt_ids, start)
    limit = vocab_size
    logits = prefill(model, ids, cache)
    check_finite(logits[:limit], model, ids, step_name(0, int(cache.tokens_seen[0]) - 1, start))
    step = torch.empty((1, 1), dtype=torch.long, device=model.device)  # reused every step
    while not sampler.done:
        token, stop = sampler.next(logits)
        yield token, logits, stop
        if stop:
            return
        step.fill_(token)
        with torch.no_grad():
            logits = model(step, cache=cache)[0, -1]
        check_finite(logits[:limit], model, step, step_name(sampler.n, int(cache.tokens_seen[0]) - 1, start))
