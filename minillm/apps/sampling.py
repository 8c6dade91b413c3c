"""How a stream picks its tokens: the sampling settings, `sample`, and the `Sampler` of one stream.

    token = sample(logits, temperature=0.8, top_k=None, top_p=0.95, generator=g)

`generate` (minillm/apps/generation.py) and the batched loop (minillm/apps/batching.py) draw every
token through a `Sampler` from `make_sampler`, so a batch row makes exactly the `sample` calls, with
the same generator, that `generate` makes for the same prompt alone. Logits that are NaN or
infinite raise `NonFiniteError`, naming the step and, where it can be found, the first layer that
went non-finite (`check_finite`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from ..checks import check_int
from ..errors import MiniLLMError


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(value) -> float:
    """An int or float as a float; an int too large for one (10**400) is inf."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def token_ids(ids, what: str = "ids", *, ordered: bool = True) -> list[int]:
    """`ids` as a list of Python ints; 1.5, "3", True or a float tensor element is refused by
    name, never silently truncated or parsed; so are bytes, a dict and (for a sequence, `ordered`)
    a set, whose iteration is not a token sequence."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise MiniLLMError(f"{what} must be integer token ids, got a {ids.dtype} tensor")
        if ids.device.type == "meta":
            raise MiniLLMError(f"{what} is a meta tensor (shapes only, no values); give real token ids")
        return ids.flatten().tolist()
    if isinstance(ids, (bytes, bytearray, memoryview)):  # iterates as byte values, not token ids
        raise MiniLLMError(f"{what} must be integer token ids, got {type(ids).__name__} (encode text with the "
                           f"tokenizer first)")
    if isinstance(ids, Mapping) or (ordered and isinstance(ids, (set, frozenset))):
        raise MiniLLMError(f"{what} must be a sequence of token ids, got a {type(ids).__name__} "
                           f"({'its keys' if isinstance(ids, Mapping) else 'an unordered set'} would be read)")
    out = []
    for i in ids:
        try:
            if isinstance(i, bool):
                raise TypeError
            out.append(operator.index(i))
        except TypeError:
            raise MiniLLMError(f"{what} must be integer token ids, got {i!r} ({type(i).__name__})") from None
    return out


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
    `top_k` most likely ids and then to the smallest set whose probability reaches `top_p` (the most
    likely id is always kept, however small `top_p`); a temperature so small that logits / temperature overflows is the limit, greedy. Ids >=
    `vocab_size` (padding rows of a model vocabulary larger than its tokenizer's) are never
    produced. Non-finite logits raise NonFiniteError.
    """
    # float64 logits stay float64 (a float64 model's logits can pass float32's range); others float32
    logits = logits.double() if logits.dtype == torch.float64 else logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[:vocab_size]  # ids past the tokenizer's vocabulary cannot be decoded
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError("sample: the logits are not all finite")
    if temperature == 0:
        return int(torch.argmax(logits))
    temperature = _as_float(temperature)  # torch cannot divide by an int past 64 bits
    # top_k and top_p rank the tokens by their logits, not by the scaled ones: a huge temperature
    # (1e38, inf) makes every scaled logit equal, and "the k most likely" must still mean those.
    keep = None
    if top_k and top_k < logits.shape[-1]:
        keep = logits >= torch.topk(logits, top_k).values[-1]
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):
        # A tiny temperature (1e-300 rounds to 0 in float32) overflows. In float64 with the max
        # subtracted first, the top logit becomes 0 and the rest at most 0 (-inf once they
        # underflow), finite for any temperature > 0: sampling tends to greedy, its exact limit.
        scaled = (logits.double() - logits.max().double()) / temperature
    if keep is not None:
        scaled = scaled.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p is not None and top_p < 1:
        order = torch.argsort(logits, descending=True, stable=True)
        sorted_p = probs[order]
        # Drop a token when the more likely ones already reach top_p. The most likely token is
        # always kept: a top_p below float32's smallest number (1e-300) would otherwise round to 0
        # and drop every token.
        drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        drop[0] = False
        probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


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
    # A tensor-parallel shard's (minillm/parallel/): rank 0's token, broadcast to every rank.
    share: Callable[[int], int] | None = None

    @property
    def done(self) -> bool:
        """The token limit is reached (at once for max_new_tokens=0)."""
        return self.max_new_tokens is not None and self.n >= self.max_new_tokens

    def next(self, logits: torch.Tensor) -> tuple[int, str | None]:
        """The next token from a (V,) row of logits, and why the stream stops after it: "eos"
        (the token is an EOS id, yielded all the same), "length" (max_new_tokens reached) or None."""
        token = sample(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       generator=self.generator, vocab_size=self.vocab_size)
        if self.share is not None:
            token = self.share(token)
        self.n += 1
        return token, "eos" if token in self.eos else "length" if self.done else None


def make_sampler(model, *, max_new_tokens: int | None = 256, temperature: float = 0.8, top_k: int | None = None,
                 top_p: float | None = 0.95, seed: int = 0, eos_ids: Iterable[int] | None = None,
                 ignore_eos: bool = False, vocab_size: int | None = None,
                 generator: torch.Generator | None = None) -> Sampler:
    """A checked `Sampler` (every argument as `generate` takes it); draws from `generator`, or from
    a new one on the model's device seeded with `seed`. `eos_ids=None`: the model's `eos_ids`."""
    check_sampling(temperature, top_k, top_p)
    check_int("max_new_tokens", max_new_tokens, 0, none_ok=True)
    if not isinstance(ignore_eos, bool):
        raise MiniLLMError(f"ignore_eos must be True or False, got {ignore_eos!r:.40}")
    check_int("vocab_size", vocab_size, 1, none_ok=True)
    if generator is None:
        check_seed(seed)
    elif not isinstance(generator, torch.Generator):
        raise MiniLLMError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    elif torch.device(generator.device).type != torch.device(model.device).type:
        raise MiniLLMError(f"generator is on {generator.device}, the model on {model.device}: sampling draws on "
                           f"the model's device (torch.Generator(device=model.device))")
    if eos_ids is None:  # the model's own (minillm.load reads them); () stops on none
        eos_ids = getattr(model, "eos_ids", ())
    if isinstance(eos_ids, (str, bytes)):
        raise MiniLLMError(f"eos_ids must be a collection of token ids, got {type(eos_ids).__name__}")
    try:
        eos = frozenset(token_ids(eos_ids, "eos_ids", ordered=False))
    except TypeError:  # not iterable
        raise MiniLLMError(f"eos_ids must be a collection of integer token ids, got {eos_ids!r}") from None
    if generator is None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    share = getattr(getattr(model, "shard", None), "broadcast_token", None)
    return Sampler(temperature, top_k, top_p, max_new_tokens, frozenset() if ignore_eos else eos, vocab_size,
                   generator, share=share)
