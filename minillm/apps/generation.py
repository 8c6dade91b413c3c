"""Streaming generation: sampling, the token generator, and a multi-turn chat over one cache.

    for token in minillm.generate(model, tok.encode("Once upon a time"), max_new_tokens=50):
        ...

`generate` prefills the prompt through the fixed-shape sink+window cache (a prompt longer than
the cache is windowed exactly, docs/streaming.md), then decodes one token per step. Nothing grows
with the number of generated tokens: the cache is allocated once and no token list is kept, so
`max_new_tokens=None` can run forever in constant memory.

`ChatSession` keeps one cache for a whole conversation, like the paper's MT-Bench demo: each turn
feeds only the new text (rendered with the checkpoint's chat template, or a plain
`USER: ... ASSISTANT:` format) and generates the reply on top of everything before it.

`sink_prefix` / `stream_tensor` are the one place that knows about a checkpoint's dedicated sink
token (the paper's §3.3): it is prepended to every stream, before BOS, and never scored.

Many streams share one cache of B rows through `run_rows`, the continuous-batching loop
(`prefill_rows` for the prompts, one batched decode step for every row): `minillm.generate_batch`
and `minillm.ChatSessions` (minillm/batch.py) are built on it, and `chat_turns` runs the turns of
sessions that share a cache. Every stream samples through a `Sampler`, so a row draws exactly
what `generate` draws for it alone.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from .checks import check_int, check_model
from .errors import MiniLLMError, first_line


def sink_prefix(config) -> list[int]:
    """The ids to put in front of every stream: the checkpoint's sink token, if it has one."""
    return [] if config.sink_token_id is None else [int(config.sink_token_id)]


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(value) -> float:
    """An int or float as a float; an int too large for one (10**400) is inf."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def token_ids(ids, what: str = "ids") -> list[int]:
    """`ids` as a list of Python ints; 1.5, "3", True or a float tensor element is refused by
    name, never silently truncated or parsed."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise MiniLLMError(f"{what} must be integer token ids, got a {ids.dtype} tensor")
        return ids.flatten().tolist()
    out = []
    for i in ids:
        try:
            if isinstance(i, bool):
                raise TypeError
            out.append(operator.index(i))
        except TypeError:
            raise MiniLLMError(f"{what} must be integer token ids, got {i!r} ({type(i).__name__})") from None
    return out


def stream_tensor(model, ids: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, int]:
    """(1, L) int64 tensor on the model's device: sink prefix + ids; and the prefix length."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise MiniLLMError(f"ids must be a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise MiniLLMError(f"ids must be integer token ids, got a {ids.dtype} tensor")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise MiniLLMError(f"ids must be a sequence of token ids (encode text with the tokenizer first), "
                           f"got {type(ids).__name__}")
    prefix = sink_prefix(model.config)
    ids = prefix + token_ids(ids)
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise MiniLLMError(f"token id {bad[0]} is out of range for the model's vocabulary of "
                           f"{model.config.vocab_size}")
    return torch.tensor([ids], dtype=torch.long, device=model.device), len(prefix)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not _is_real(temperature) or not temperature >= 0:  # also refuses NaN and strings
        raise MiniLLMError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    check_int("top_k", top_k, 0, none_ok=True, hint=" (0 or None: off)")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise MiniLLMError(f"top_p must be a number in (0, 1], got {top_p!r}")


SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


def check_seed(seed) -> int:
    return check_int("seed", seed, *SEED_RANGE)


class NonFiniteError(MiniLLMError):
    """The model produced NaN or infinite logits (broken weights, a config that overflows, float16)."""


def where_nonfinite(model, ids: torch.Tensor) -> str:
    """The first place a dense forward over `ids` (1, T) goes non-finite: "the embedding",
    "layer i", "the final norm" or "the output head"; "" if it stays finite. Only run after a
    failure, so it costs nothing on the normal path."""
    found: list[str] = []
    hooks = []

    def watch(name):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if not found and isinstance(out, torch.Tensor) and not bool(torch.isfinite(out).all()):
                found.append(name)
        return hook

    parts = [("the embedding", model.embed)] + [(f"layer {i}", b) for i, b in enumerate(model.layers)]
    parts.append(("the final norm", model.norm))
    for name, module in parts:
        hooks.append(module.register_forward_hook(watch(name)))
    try:
        with torch.no_grad():
            logits = model(ids)
        if not found and not bool(torch.isfinite(logits).all()):
            found.append("the output head")
    except Exception:  # a diagnosis must never hide the original error
        pass
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else ""


def check_finite(logits: torch.Tensor, model, ids: torch.Tensor | None, what: str) -> None:
    """Raise NonFiniteError naming `what` (the step) and, if it can be found, the layer."""
    if bool(torch.isfinite(logits).all()):
        return
    kind = "NaN" if bool(torch.isnan(logits).any()) else "infinite"
    where = where_nonfinite(model, ids[:, -64:]) if ids is not None else ""
    raise NonFiniteError(f"{kind} logits at {what}{f' (first non-finite output: {where})' if where else ''}; "
                         f"the weights or config produce non-finite numbers (in float16, try "
                         f"--dtype bfloat16 or float32)")


def sample(logits: torch.Tensor, *, temperature: float = 0.8, top_k: int | None = None,
           top_p: float | None = 0.95, generator: torch.Generator | None = None,
           vocab_size: int | None = None) -> int:
    """One token id from a (V,) row of logits.

    temperature 0 is greedy (argmax). Otherwise softmax(logits / temperature), restricted to the
    `top_k` most likely ids and then to the smallest set whose probability reaches `top_p`; a
    temperature so small that logits / temperature overflows is the limit, greedy. Ids >=
    `vocab_size` (padding rows of a model vocabulary larger than its tokenizer's) are never
    produced. Non-finite logits raise NonFiniteError.
    """
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:vocab_size]  # ids past the tokenizer's vocabulary cannot be decoded
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError("sample: the logits are not all finite")
    if temperature == 0:
        return int(torch.argmax(logits))
    temperature = _as_float(temperature)  # torch cannot divide by an int past 64 bits
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):
        # A tiny temperature (1e-300 rounds to 0 in float32) overflows. In float64 with the max
        # subtracted first, the top logit becomes 0 and the rest at most 0 (-inf once they
        # underflow), finite for any temperature > 0: sampling tends to greedy, its exact limit.
        scaled = (logits.double() - logits.max().double()) / temperature
    logits = scaled
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = torch.sort(probs, descending=True)
        # Drop a token when the more likely ones already reach top_p (the first is always kept).
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


def prefill(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Feed a prompt (1, T) of any length through `cache`; return the last position's logits (V,).

    The prompt goes in chunks of `model.max_chunk` tokens, each asking the model for its last
    position's logits only (`logits_to_keep=1`): memory is the cache plus one chunk's
    activations, however long the prompt (a (T, vocab) logits tensor would be 128 KB per token
    at a 32k vocabulary). Chunking never changes the result (the streaming contract)."""
    step = _chunk(model)
    logits = None
    with torch.no_grad():
        for p0 in range(0, ids.shape[1], step):
            logits = model(ids[:, p0 : p0 + step], cache=cache, logits_to_keep=1)
    return logits[0, -1]


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
    step, out = _chunk(model), {}
    with torch.no_grad():
        for p0 in range(0, ids.shape[1], step):
            lengths = [min(max(t - p0, 0), step) for t in total]
            logits = model(ids[:, p0 : p0 + max(lengths)], cache=cache, lengths=lengths, logits_to_keep=1)
            out.update({b: logits[b, -1] for b in feeds if lengths[b] and p0 + lengths[b] == total[b]})
    return out


def _chunk(model) -> int:
    return max(1, int(getattr(model, "max_chunk", 1024)))


@dataclass
class Sampler:
    """How one stream picks its tokens and when it stops: `generate`'s settings and state.

    `generate` and the batched loop (`run_rows`) draw every token through `next`, so a batch
    row makes exactly the `sample` calls, with the same generator, that `generate` makes for the
    same prompt alone."""
    temperature: float
    top_k: int | None
    top_p: float | None
    max_new_tokens: int | None  # None: no limit
    eos: frozenset[int]  # empty with ignore_eos
    vocab_size: int | None
    generator: torch.Generator
    n: int = 0  # tokens drawn so far

    @property
    def done(self) -> bool:
        """The token limit is reached (at once for max_new_tokens=0)."""
        return self.max_new_tokens is not None and self.n >= self.max_new_tokens

    def next(self, logits: torch.Tensor) -> tuple[int, str | None]:
        """The next token from a (V,) row of logits, and why the stream stops after it: "eos"
        (the token is an EOS id, yielded all the same), "length" (max_new_tokens reached) or None."""
        token = sample(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       generator=self.generator, vocab_size=self.vocab_size)
        self.n += 1
        return token, "eos" if token in self.eos else "length" if self.done else None


def make_sampler(model, *, max_new_tokens: int | None = 256, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = 0.95, seed: int = 0, eos_ids: Iterable[int] = (),
                 ignore_eos: bool = False, vocab_size: int | None = None,
                 generator: torch.Generator | None = None) -> Sampler:
    """A checked `Sampler` (every argument as `generate` takes it); draws from `generator`, or from
    a new one on the model's device seeded with `seed`."""
    check_sampling(temperature, top_k, top_p)
    check_int("max_new_tokens", max_new_tokens, 0, none_ok=True)
    check_int("vocab_size", vocab_size, 1, none_ok=True)
    if generator is None:
        check_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise MiniLLMError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if isinstance(eos_ids, (str, bytes)):
        raise MiniLLMError(f"eos_ids must be a collection of token ids, got {type(eos_ids).__name__}")
    try:
        eos = frozenset(token_ids(eos_ids, "eos_ids"))
    except TypeError:  # not iterable
        raise MiniLLMError(f"eos_ids must be a collection of integer token ids, got {eos_ids!r}") from None
    if generator is None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    return Sampler(temperature, top_k, top_p, max_new_tokens, frozenset() if ignore_eos else eos, vocab_size,
                   generator)


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
             seed: int = 0, sinks: int = 4, window: int = 1020, eos_ids: Iterable[int] = (),
             ignore_eos: bool = False, vocab_size: int | None = None, cache=None,
             generator: torch.Generator | None = None) -> Iterator[int]:
    """Yield generated token ids, one at a time, streaming through a fixed sink+window cache.

    - `max_new_tokens=None` generates until an EOS id (or forever with `ignore_eos`).
    - An id in `eos_ids` is yielded, then generation stops (unless `ignore_eos`).
    - `cache`: continue an existing stream (a chat); by default a new `model.new_cache(1, sinks,
      window)`. It holds one stream (batch_size 1; `minillm.generate_batch` runs many). The sink
      token (if the checkpoint has one) is prepended when the cache is empty.
    - The last yielded id is not fed to the cache (nothing needs its logits); a caller continuing
      the stream must feed it first (ChatSession does).
    - Sampling draws from `generator`, or from a new one seeded with `seed`.
    """
    check_model(model)
    sampler = make_sampler(model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, eos_ids=eos_ids, ignore_eos=ignore_eos, vocab_size=vocab_size,
                           generator=generator)
    if cache is None:
        cache = model.new_cache(batch_size=1, sinks=sinks, window=window)
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
        yield token
        if stop:
            return
        step.fill_(token)
        with torch.no_grad():
            logits = model(step, cache=cache)[0, -1]
        check_finite(logits[:limit], model, step, step_name(sampler.n, int(cache.tokens_seen[0]) - 1, start))


# ----------------------------------------------------------------------------------------------
# Many streams in one cache (minillm/batch.py)


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
    others length 0). minillm/batch.py explains what this gives (`generate_batch`).

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
# Chat


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Ids of `text` as it continues a stream. SentencePiece-style tokenizers put a space in front
    of every text they encode ("\nUSER" would come back as " \nUSER"); encoding "\n" + text and
    dropping the ids of "\n" avoids that. Falls back to a plain encode if the two do not split."""
    anchor = tokenizer.encode("\n", add_bos=False)
    ids = tokenizer.encode("\n" + text, add_bos=False)
    if ids[: len(anchor)] == anchor:
        return ids[len(anchor):]
    return tokenizer.encode(text, add_bos=False)


PLAIN_FIRST = "USER: {text}\nASSISTANT:"
PLAIN_NEXT = "\nUSER: {text}\nASSISTANT:"


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool,
                         bos_token: str = "", eos_token: str = "", **special_tokens: str) -> str:
    """Render a Hugging Face chat template (Jinja) the way transformers does: a sandboxed
    environment with trim_blocks/lstrip_blocks, loop controls ({% break %}, {% continue %}), the
    {% generation %} tag (rendered as its body), transformers' `tojson` (no HTML escaping, no ASCII
    escaping), and `raise_exception` and `strftime_now`. Any failure is one MiniLLMError."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 is a declared dependency
        raise MiniLLMError("the chat template needs jinja2 (pip install jinja2)") from None
    env = _jinja_env(jinja2, ImmutableSandboxedEnvironment)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token, **special_tokens)
    except Exception as e:  # a template is code: TemplateError, but also TypeError, RecursionError, ...
        raise MiniLLMError(f"the checkpoint's chat template failed: {type(e).__name__}: {first_line(e)}"
                           if not isinstance(e, jinja2.TemplateError) else
                           f"the checkpoint's chat template failed: {first_line(e)}") from None


_ENV = None


def _jinja_env(jinja2, sandbox):
    """One environment, built once, with what transformers' `_compile_jinja_template` adds."""
    global _ENV
    if _ENV is not None:
        return _ENV
    import datetime
    import json

    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: transformers marks assistant text with it; rendered as is."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    _ENV = env
    return env


# End-of-turn tokens of common chat formats: a reply stops on these too, when the template uses them.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class ChatSession:
    """A conversation over one persistent streaming cache.

    `turn(text)` feeds the user's turn and yields the reply as text pieces (incrementally
    detokenized). Only new tokens are fed each turn. With a chat template, the whole conversation
    (system prompt, every turn, every reply) is rendered as transformers' `apply_chat_template(...,
    add_generation_prompt=True)` renders it, and only the text after the previous reply is fed:
    the previous reply is rendered as a marker, and what follows the marker is the new part. So the
    ids fed over a conversation are the ids transformers tokenizes for it (tests/test_chat.py),
    also for templates that trim replies or strip <think> blocks from earlier turns (the cache
    keeps the reply as it was generated). If the part before the marker is not what was fed (a
    template that rewrites earlier turns), the new turn is rendered on its own instead. A reply
    ends at EOS or at the template's end-of-turn token (`<|im_end|>` for ChatML).

    By default the session has a cache of its own. With `cache=` (a cache of B rows) and `row=`,
    it keeps its conversation in that row of a cache shared with other sessions (`sinks` and
    `window` are then the cache's); `minillm.ChatSessions` runs the turns of several at once.
    """

    MARK = "\ue000minillm-reply\ue001"  # private-use characters: no template alters them

    def __init__(self, model, tokenizer, *, sinks: int = 4, window: int = 1020,
                 max_new_tokens: int | None = 256, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = 0.95, seed: int = 0, ignore_eos: bool = False,
                 use_template: bool = True, system: str | None = None, cache=None, row: int = 0):
        check_sampling(temperature, top_k, top_p)
        if system is not None and not isinstance(system, str):
            raise MiniLLMError(f"system must be a string, got {type(system).__name__}")
        self.model, self.tok = model, tokenizer
        self.template = tokenizer.chat_template if use_template else None
        if system is not None and self.template is None:
            raise MiniLLMError("a system prompt needs a chat template to render it, and this chat has none "
                               "(the checkpoint has no template, or --no-template was given)")
        if cache is None:
            self.cache = model.new_cache(batch_size=1, sinks=sinks, window=window)
            self.row = check_int("row", row, 0, 0, hint=" (a session with its own cache has one row)")
        elif not hasattr(cache, "tokens_seen"):
            raise MiniLLMError(f"cache must be a SinkCache from model.new_cache(), got {type(cache).__name__}")
        else:
            self.cache = cache
            self.row = check_int("row", row, 0, cache.batch_size - 1, hint=f" (the cache has {cache.batch_size} rows)")
        self.stop_ids = frozenset(tokenizer.eos_ids) | self._end_of_turn_ids()
        self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             ignore_eos=ignore_eos, eos_ids=self.stop_ids, vocab_size=tokenizer.vocab_size)
        self.generator = torch.Generator(device=model.device).manual_seed(seed)
        tt = getattr(tokenizer, "template_tokens", None)
        self.template_tokens = dict(tt) if tt else {"bos_token": self._token_text(tokenizer.bos_id),
                                                    "eos_token": self._token_text(tokenizer.eos_id)}
        self.messages: list[dict] = [{"role": "system", "content": system}] if system is not None else []
        self.prompt_text = ""  # the rendered conversation up to this turn's generation prompt
        self.unfed: int | None = None  # the reply's last token: generated but not yet in the cache
        self.turns = 0

    def _end_of_turn_ids(self) -> frozenset[int]:
        if not self.template or not hasattr(self.tok, "token_to_id"):
            return frozenset()
        found = (self.tok.token_to_id(t) for t in END_OF_TURN if t in self.template)
        return frozenset(i for i in found if i is not None)

    def _token_text(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        if hasattr(self.tok, "token_text"):  # the token's string, as transformers' bos_token
            return self.tok.token_text(token_id)
        return self.tok.decode([token_id])

    def _render(self, messages: list[dict]) -> str:
        return render_chat_template(self.template, messages, add_generation_prompt=True, **self.template_tokens)

    def _new_ids(self, text: str) -> list[int]:
        """The ids to feed for a new user turn (after the previous reply)."""
        first = self.turns == 0
        unfed_stop = self.unfed is not None and self.unfed in self.stop_ids
        # A reply cut by max_new_tokens: its last token is reply text, not yet in the cache.
        ids: list[int] = [self.unfed] if self.unfed is not None and not unfed_stop else []
        if self.template is None:
            if first:
                return self.tok.encode(PLAIN_FIRST.format(text=text))
            return [self.unfed] * (self.unfed is not None) + encode_continuation(self.tok, PLAIN_NEXT.format(text=text))
        user = {"role": "user", "content": text}
        rendered = self._render(self.messages + [user])
        if first:
            # The template writes every special token itself (BOS included): transformers
            # tokenizes its output with add_special_tokens=False, and so do we.
            self.prompt_text = rendered
            return self.tok.encode(rendered, add_bos=False)
        said = self.prompt_text + self.messages[-1]["content"]  # what the cache holds, as text
        marked = self._render(self.messages[:-1] + [{"role": "assistant", "content": self.MARK}, user])
        before, mark, after = marked.partition(self.MARK)
        if rendered.startswith(said):
            # The template renders the reply as it was generated: the rest closes the reply (its
            # end-of-turn token, if the template writes one, is there as text) and opens the new turn.
            delta = rendered[len(said):]
        elif (mark and self.MARK not in after and before.startswith(self.prompt_text)
              and not before[len(self.prompt_text):].strip()):
            # The template alters the reply (trims it, strips a <think> block): the cache keeps the
            # reply as generated, and what the template puts after it is fed.
            delta = after
        else:  # a template that rewrites earlier turns: the reply's stop token, then this turn on its own
            if self.unfed is not None:
                ids = [self.unfed]
            system = [self.messages[0]] if self.messages[:1] and self.messages[0]["role"] == "system" else []
            delta = self._render(system + [user])
        self.prompt_text = rendered
        return ids + encode_continuation(self.tok, delta) if delta else ids

    def turn(self, text: str) -> Iterator[str]:
        """Feed the user's `text`; yield the reply's text as it is generated.

        Stopping early (not reading the generator to its end) still records the reply so far, so
        the next turn continues the conversation the cache holds."""
        if self.cache.batch_size > 1:  # a row of a shared cache: the batched turn, with only this session
            yield from (piece for _, piece in chat_turns({self: text}))
            return
        reply = self.begin_turn(text)
        try:
            for token in generate(self.model, reply.ids, cache=self.cache, generator=self.generator, **self.sampling):
                piece = reply.push(token)
                if piece is None:
                    break
                if piece:
                    yield piece
            tail = reply.flush()
            if tail:
                yield tail
        finally:
            reply.close()

    def begin_turn(self, text: str) -> Reply:
        """Start a turn: the ids to feed for `text` and the reply's bookkeeping (`Reply`). The
        batched turns (`chat_turns`) use it too, so every session renders its turns alike."""
        if not isinstance(text, str):
            raise MiniLLMError(f"a chat turn must be a string, got {type(text).__name__}")
        ids = self._new_ids(text)
        self.unfed = None
        return Reply(self, text, ids)

    def sampler(self) -> Sampler:
        """This turn's sampling (the session's settings, its one generator across turns), as
        `generate(**self.sampling, generator=self.generator)` samples."""
        return make_sampler(self.model, generator=self.generator, **self.sampling)


class Reply:
    """One reply of a ChatSession as it is generated: its incremental decoder and its text so far.

    `push(token)` for each token drawn (the token becomes the session's `unfed`: the next turn
    feeds it first, or renders the stop it stands for); `close()` records the turn, also when the
    reply stopped early, so the session's history is what its cache holds."""

    def __init__(self, session: ChatSession, text: str, ids: list[int]):
        self.session, self.text, self.ids = session, text, ids
        self.decoder = session.tok.decoder(start_of_text=False)
        self.pieces: list[str] = []
        self.fed = False  # the prompt went through the cache (a token was drawn after it)
        self.closed = False

    def push(self, token: int) -> str | None:
        """The text `token` adds to the reply ("" while a character is incomplete); None for the
        stop token that ends it (EOS or end-of-turn), which adds no text."""
        s = self.session
        self.fed = True
        s.unfed = token
        if token in s.stop_ids and not s.sampling["ignore_eos"]:
            return None
        piece = self.decoder.push(token)
        if piece:
            self.pieces.append(piece)
        return piece

    def flush(self) -> str:
        """The reply's last text (a character held back by the decoder)."""
        tail = self.decoder.flush()
        if tail:
            self.pieces.append(tail)
        return tail

    def close(self) -> None:
        """Record the turn in the session (once), if its prompt reached the cache."""
        s = self.session
        if self.closed:
            return
        self.closed = True
        if self.fed or int(s.cache.tokens_seen[s.row]):
            self.flush()
            if s.template:
                s.messages += [{"role": "user", "content": self.text},
                               {"role": "assistant", "content": "".join(self.pieces)}]
            s.turns += 1


def chat_turns(turns: Mapping[ChatSession, str]) -> Iterator[tuple[ChatSession, str]]:
    """One turn of each given session, run together; yield (session, text piece) as replies come.

    The sessions must share one cache (`ChatSession(..., cache=, row=)`), each in its own row.
    Every session renders its turn as `ChatSession.turn` does (`begin_turn`), the new ids of all
    go through one ragged prefill, and the replies decode in the same batched steps, each with
    its own sampling; sessions not given are not touched. Nothing is fed unless every session's
    turn renders and checks; stopping early records each reply so far, as `turn` does."""
    sessions = list(turns)
    if not sessions:
        return
    if any(not isinstance(s, ChatSession) for s in sessions):
        raise MiniLLMError("chat_turns: the keys must be ChatSessions")
    cache = sessions[0].cache
    if any(s.cache is not cache for s in sessions) or len({s.row for s in sessions}) < len(sessions):
        raise MiniLLMError("chat_turns: the sessions must share one cache, each in its own row")
    model = sessions[0].model
    replies: dict[ChatSession, Reply] = {}
    rows: list[Row] = []
    saved = [(s, s.prompt_text, s.unfed) for s in sessions]
    try:  # render and check every turn before anything is fed
        for s in sessions:
            replies[s] = reply = s.begin_turn(turns[s])
            seen = int(cache.tokens_seen[s.row])
            rows.append(Row(s, f"session row {s.row}", s.sampler(), new_stream_ids(model, reply.ids, seen),
                             new_stream=False))
    except BaseException:
        for s, prompt_text, unfed in saved:
            s.prompt_text, s.unfed = prompt_text, unfed
        raise
    by_row = {r.key.row: r for r in rows}
    try:
        for row, token, stop in run_rows(model, cache, lambda b: by_row.pop(b, None)):
            s, reply = row.key, replies[row.key]
            if token is None:  # max_new_tokens=0: the turn was fed, no token drawn
                continue
            piece = reply.push(token)
            if piece:
                yield s, piece
            if stop or piece is None:
                tail = reply.flush()
                if tail:
                    yield s, tail
    finally:
        for reply in replies.values():
            reply.close()
