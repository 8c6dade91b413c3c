"""Attention sinks, measured: attention maps and per-layer attention-sink scores (the paper's §2).

`attention_probs` runs one dense forward over the first tokens of a text and keeps every layer's
attention probabilities; `attention_maps` averages the heads (the paper's Figure 2) and
`attention_sink_scores` measures how much attention queries far from the start still give to
token 0, against what even attention would give. `minillm attn` and tools/reproduce.py use them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int, check_model
from ..errors import MiniLLMError
from ..limits import check_fits
from .generation import stream_tensor
from .sampling import NonFiniteError


def probs_bytes(model, T: int) -> int:
    """Memory `attention_probs` needs for T tokens: each layer's (H, T, T) probabilities in the
    model's dtype and their float32 copy, plus one layer's scores and softmax being computed."""
    c = model.config
    elem = torch.finfo(model.dtype).bits // 8
    per_layer = c.num_heads * T * T
    return c.num_layers * per_layer * (elem + 4) + 2 * per_layer * max(elem, 4)


def attention_probs(model, ids, tokens: int | None = None) -> list[torch.Tensor]:
    """Per layer, the (H, T, T) attention probabilities of a dense forward over the first `tokens`
    tokens of the stream (the sink token, if any, counts as one)."""
    check_model(model)
    check_int("tokens", tokens, 1, none_ok=True)
    stream, _ = stream_tensor(model, ids)
    if tokens is not None:
        stream = stream[:, :tokens]
    check_fits(probs_bytes(model, stream.shape[1]), model.device,
               f"attention maps over {stream.shape[1]} tokens (every layer's heads x T x T probabilities)")
    probs: list[torch.Tensor] = []
    with torch.inference_mode():
        model(stream, attn_probs=probs)
    for layer, p in enumerate(probs):  # maps of NaN would be drawn blank and scored NaN, silently
        if not bool(torch.isfinite(p).all()):
            raise NonFiniteError(f"attention maps: layer {layer}'s attention probabilities are not finite; the "
                                 f"weights or config produce non-finite numbers")
    return [p[0].float().cpu() for p in probs]


def attention_maps(model, ids, tokens: int | None = None, probs=None) -> torch.Tensor:
    """(layers, T, T): attention probabilities with heads averaged (the paper's Figure 2)."""
    probs = attention_probs(model, ids, tokens) if probs is None else probs
    return torch.stack([p.mean(0) for p in probs])


@dataclass
class SinkScores:
    """How much attention queries far from the start give to token 0, per layer."""

    per_layer: list[float]  # heads averaged
    strongest_head: list[float]  # the largest per-head mean
    uniform: float  # the same mean if every query spread its attention evenly
    min_query: int
    tokens: int

    def to_dict(self) -> dict:
        return {"per_layer": self.per_layer, "strongest_head": self.strongest_head, "uniform": self.uniform,
                "min_query": self.min_query, "tokens": self.tokens}


def attention_sink_scores(model, ids, min_query: int | None = None, tokens: int | None = None,
                          probs=None) -> SinkScores:
    """Mean attention on token 0 from queries with index >= `min_query` (default: the second half
    of the first `tokens` tokens), per layer, heads averaged; `uniform` is what even attention
    would give (the mean of 1/(q+1) over those queries), for comparison."""
    check_int("min_query", min_query, none_ok=True)  # its range, once T is known
    probs = attention_probs(model, ids, tokens) if probs is None else probs
    T = probs[0].shape[-1]
    q0 = T // 2 if min_query is None else min_query
    if not 0 <= q0 < T:
        raise MiniLLMError(f"min_query must be in [0, {T - 1}] for {T} tokens, got {q0}")
    per_head = [p[:, q0:, 0].mean(-1) for p in probs]  # (H,) per layer
    uniform = (1.0 / torch.arange(q0 + 1, T + 1, dtype=torch.float64)).mean().item()
    return SinkScores([h.mean().item() for h in per_head], [h.max().item() for h in per_head], uniform, q0, T)
