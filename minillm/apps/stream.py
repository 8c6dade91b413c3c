"""Text-level streaming: `stream_generate(model, tok, prompt)` yields responses, as mlx-lm's does.

    for r in minillm.stream_generate(model, tok, [{"role": "user", "content": "Hi!"}], max_new_tokens=64):
        print(r.text, end="", flush=True)        # r.token, r.logprob, r.finish_reason

The prompt is a string (encoded as the tokenizer's files say, BOS included where they add one),
token ids, or a list of chat messages (rendered with the checkpoint's chat template and its
generation prompt, `tok.apply_chat_template(messages, add_generation_prompt=True)`). The tokens
are exactly `generate`'s for the same settings (the same sampler, the same cache, the same
generator); only text is added around them.

Stopping, and what the text holds:
- an id of `eos_ids` (by default the model's EOS and end-of-turn ids; `()`: none) ends the stream
  with finish_reason "stop"; its own text (`<|im_end|>`) is not part of the output;
- a `stop` string ends the stream at the token whose text completes it, with finish_reason
  "stop"; the output ends just before the stop string's first occurrence (the stop string and
  anything after it are left out), also when the stop string is split across several tokens.
  Text that might be the start of a stop string is held back until it is known not to be (a
  piece's `text` may then be "", and the held text comes with a later piece);
- `max_new_tokens` reached: finish_reason "length", and every held-back character is given out.
So `"".join(r.text for r in responses)` is the reply, and `finish_reason` is None on every
response but the last.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import MiniLLMError
from .generation import generate_steps


@dataclass(frozen=True)
class GenerationResponse:
    """One generated token, as text. `logprob` is the token's log-probability under the model's
    own distribution (log-softmax of its logits over the tokenizer's vocabulary, before
    temperature, top-k and top-p)."""
    text: str
    token: int
    logprob: float
    finish_reason: str | None  # None until the last response: "stop" or "length"
    prompt_tokens: int
    generation_tokens: int


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The ids of a prompt given as a string, ids (a sequence or 1-D tensor) or chat messages."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, torch.Tensor):
        return prompt.reshape(-1).tolist() if prompt.dim() == 2 and prompt.shape[0] == 1 else prompt.tolist()
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, bytes) or not isinstance(prompt, Iterable):
        raise MiniLLMError(f"prompt must be a string, token ids or a list of chat messages, got {type(prompt).__name__}")
    return list(prompt)


def check_stop(stop) -> tuple[str, ...]:
    """`stop` (None, a string or a list of strings) as a tuple of non-empty strings."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if isinstance(stops, (bytes, dict)) or not isinstance(stops, Iterable):
        raise MiniLLMError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    stops = tuple(stops)
    for s in stops:
        if not isinstance(s, str) or not s:
            raise MiniLLMError(f"stop strings must be non-empty strings, got {s!r}")
    return stops


class StopText:
    """Text pieces in, text out: cut at the first stop string, holding back what might start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.held, self.stopped = tuple(stops), "", False

    def push(self, piece: str) -> str:
        """The text that can be given out now; sets `stopped` when a stop string is complete."""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return text[: min(hits)]
        keep = 0  # the longest end of the text that is the start of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def stream_generate(model, tokenizer, prompt, *, max_new_tokens: int | None = 256, temperature: float = 0.8,
                    top_k: int | None = None, top_p: float | None = 0.95, seed: int = 0, sinks: int = 4,
                    window: int = 1020, eos_ids: Iterable[int] | None = None, stop=None, ignore_eos: bool = False,
                    cache=None, generator: torch.Generator | None = None,
                    positions: str = "cache") -> Iterator[GenerationResponse]:
    """Generate from `prompt` (a string, ids or chat messages) and yield a `GenerationResponse`
    per token: the text it adds, the token, its log-probability and, on the last one, why
    generation ended ("stop": an EOS/end-of-turn id or a `stop` string; "length"). The module
    docstring gives the exact text semantics. Every other setting is `generate`'s (ids beyond
    the tokenizer's vocabulary are never drawn)."""
    stops = StopText(check_stop(stop))
    ids = prompt_ids(tokenizer, prompt)
    if eos_ids is None:
        eos_ids = frozenset(getattr(model, "eos_ids", ())) | tokenizer.stop_ids
    decoder = tokenizer.decoder(start_of_text=False)
    vocab = tokenizer.vocab_size
    n = 0
    for token, logits, why in generate_steps(model, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                             top_k=top_k, top_p=top_p, seed=seed, sinks=sinks, window=window,
                                             eos_ids=eos_ids, ignore_eos=ignore_eos, vocab_size=vocab, cache=cache,
                                             generator=generator, positions=positions):
        n += 1
        logprob = float(torch.log_softmax(logits[:vocab].double(), dim=-1)[token])
        if why == "eos":  # the end-of-sequence token adds no text
            text = stops.push(decoder.flush())
            yield GenerationResponse(text + stops.flush() * (not stops.stopped), token, logprob, "stop", len(ids), n)
            return
        text = stops.push(decoder.push(token))
        if stops.stopped:
            yield GenerationResponse(text, token, logprob, "stop", len(ids), n)
            return
        if why == "length":
            text += stops.push(decoder.flush())
            finish = "stop" if stops.stopped else "length"
            yield GenerationResponse(text + ("" if stops.stopped else stops.flush()), token, logprob, finish,
                                     len(ids), n)
            return
        yield GenerationResponse(text, token, logprob, None, len(ids), n)
