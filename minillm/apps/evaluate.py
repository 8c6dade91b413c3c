"""Long-text perplexity in the paper's four settings (attention-sink measurements: attention_maps.py).

`perplexity(model, ids, mode=..., sinks=4, window=1020)` scores every token of a text: entry i of
`result.nll` is -log p(ids[i+1] | ids[0..i]) for i in 0..N-2 (BOS, if any, is ids[0] and is
never predicted; a checkpoint's sink token goes in front of the stream and is never scored).

Modes, all with the same cache size S = sinks + window (docs/streaming.md):
- "streaming": the sink + window cache (attention sinks, the paper's method).
- "window":    the same cache with no sinks (window = S): the paper's failing baseline.
- "dense":     no eviction, absolute positions. It streams through a cache with no sinks and a
               window as long as the text, which equals the dense forward by the contract, with
               memory per block instead of T x T scores. Its KV cache grows with the text, so it
               is capped (`dense_max_tokens`).
- "recompute": sliding window with recomputation: for every scored token, a fresh dense forward
               over the last S tokens (positions 0..S-1). Several windows go through one batched
               forward; one dense forward covers every token whose window is still the whole
               prefix (causality makes each of its rows a fresh forward over that prefix).

The exact parallel streaming evaluation. `model(ids, cache=cache)` streams a chunk of any length
with every token attending to exactly its own key set (the sinks at their cache-relative
positions plus its band of window keys), so feeding the whole text in long blocks *is* the
parallel evaluation: layer by layer, a block at a time, with the same numbers as the
token-by-token loop (`exact_loop=True`, kept as the reference; tests/test_evaluate.py checks the
equality). The speed-up over the loop is measured by tools/bench_ppl.py.

`stride=K` scores recompute on every K-th token from a seeded random offset (an unbiased estimate
at 1/K of the cost); every mode then also reports `ppl_strided` over exactly that subset.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_bool, check_int, check_model
from ..core.contract import check_positions
from ..errors import MiniLLMError
from .generation import stream_tensor
from .sampling import NonFiniteError, token_ids

MODES = ("streaming", "window", "recompute", "dense")
MAX_CURVE_POINTS = 1000
DENSE_MAX_TOKENS = 32768


@dataclass
class PerplexityResult:
    """Per-token NLL of one mode over one text, and what it summarises to."""

    mode: str
    nll: torch.Tensor  # (N-1,) float64; nll[i] predicts ids[i+1]; meaningful where `scored`
    sinks: int  # the cache the mode used (window mode: 0 sinks; recompute: S = sinks + window)
    window: int
    subset: torch.Tensor | None = None  # (N-1,) bool: the stride subset, if a stride was given
    stride: int | None = None
    offset: int | None = None
    seconds: float = 0.0
    interrupted: bool = False  # Ctrl-C: only what was scored before it counts
    # (N-1,) bool: which tokens were scored. Kept apart from the values, so that a token scored as
    # NaN or Inf (on_nonfinite="keep") is never mistaken for one not scored. Unscored nll is NaN.
    scored: torch.Tensor | None = None

    def __post_init__(self):
        if self.scored is None:
            self.scored = torch.zeros(len(self.nll), dtype=torch.bool)

    @property
    def nonfinite(self) -> int:
        """How many scored tokens have a NaN or infinite NLL (0 unless on_nonfinite="keep")."""
        return int((self.scored & ~torch.isfinite(self.nll)).sum())

    @property
    def tokens(self) -> int:
        """How many tokens were scored."""
        return int(self.scored.sum())

    @property
    def ppl(self) -> float:
        """exp(mean NLL) over the scored tokens; NaN if none was scored (check `tokens`)."""
        return _ppl(self.nll[self.scored])

    @property
    def ppl_strided(self) -> float | None:
        """PPL over the stride subset (the tokens a strided recompute scores), if a stride was given."""
        if self.subset is None:
            return None
        return _ppl(self.nll[self.subset & self.scored])

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def nll_curve(self, max_points: int = MAX_CURVE_POINTS) -> list[list]:
        """[[token_index, running mean NLL], ...] over the scored tokens (log-PPL so far), at most
        `max_points` points, evenly spaced, the last point included. token_index is the index in
        ids of the token just predicted."""
        idx = torch.nonzero(self.scored).flatten()
        if len(idx) == 0:
            return []
        running = torch.cumsum(self.nll[idx], 0) / torch.arange(1, len(idx) + 1, dtype=torch.float64)
        pick = torch.linspace(0, len(idx) - 1, min(len(idx), max_points), dtype=torch.float64).round().long()
        pick = torch.unique(pick)
        return [[int(idx[k]) + 1, float(running[k])] for k in pick]

    def summary(self) -> dict:
        out = {"ppl": self.ppl, "tokens": self.tokens, "seconds": round(self.seconds, 3),
               "sinks": self.sinks, "window": self.window}
        if self.stride is not None:
            out["ppl_strided"] = self.ppl_strided
            out["tokens_strided"] = int((self.subset & self.scored).sum())
        if self.interrupted:
            out["interrupted"] = True
        return out


def _ppl(nll: torch.Tensor) -> float:
    """exp(mean NLL); inf past float64's range (a mean NLL above ~709), NaN for no tokens."""
    if not len(nll):
        return float("nan")
    mean = nll.mean().item()
    return math.exp(mean) if not mean >= 709.0 else math.inf  # NaN stays NaN


def stride_subset(n: int, stride: int, seed: int = 0) -> tuple[int, torch.Tensor]:
    """(offset, mask): every `stride`-th of n scored positions, from an offset drawn with `seed`.
    The same (n, stride, seed) always gives the same subset, so separate runs compare equal sets."""
    check_int("stride", stride, 1)
    offset = random.Random(seed).randrange(min(stride, n)) if n else 0
    mask = torch.zeros(n, dtype=torch.bool)
    mask[offset::stride] = True
    return offset, mask


def block_size(model, capacity: int, budget: int = 1 << 22) -> int:
    """Tokens per block of the parallel evaluation: the largest power-of-two fraction of
    model.max_chunk (at least 64) whose attention scores (heads x block x (capacity + block)) stay
    within `budget` elements. Small blocks keep the scores, masks and softmax in cache: at S = 1024
    on 4M- and 12M-parameter Llamas (8 heads, one thread), 256-token blocks were the fastest, 1.4x
    faster than 512 and 1.2x than 64 (blocks of 1024 were slower still)."""
    h = model.config.num_heads
    n = model.max_chunk
    while n > 64 and h * n * (capacity + n) > budget:
        n //= 2
    return n


def _check_ids(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        if not (ids.dim() == 1 or (ids.dim() == 2 and ids.shape[0] == 1)):
            raise MiniLLMError("ids must be a 1-D sequence of token ids (one text)")
        ids = ids.flatten()
    elif isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise MiniLLMError(f"ids must be a sequence of token ids (encode text with the tokenizer first), "
                           f"got {type(ids).__name__}")
    ids = token_ids(ids)
    if len(ids) < 2:
        raise MiniLLMError(f"the text is {len(ids)} token(s) long; perplexity needs at least 2")
    return ids


def perplexity(model, ids, mode: str = "streaming", sinks: int = 4, window: int = 1020, *,
               stride: int | None = None, seed: int = 0, exact_loop: bool = False, progress: bool = False,
               block: int | None = None, dense_max_tokens: int = DENSE_MAX_TOKENS,
               recompute_batch: int | None = None, interruptible: bool = False,
               on_nonfinite: str = "raise", prefix: Sequence[int] = (),
               positions: str = "cache") -> PerplexityResult:
    """Score `ids` (one text, BOS included if the model uses one) in one of MODES.

    `sinks`/`window` describe the cache (S = sinks + window) for every mode. `exact_loop` feeds
    one token at a time (the reference) instead of blocks. `stride` scores recompute on a subset
    and reports `ppl_strided` for every mode. `progress` draws a tqdm bar (tokens/s) on stderr.
    With `interruptible`, Ctrl-C returns what was scored so far (`result.interrupted`).
    A NaN or infinite NLL (non-finite logits) raises NonFiniteError naming the token, unless
    `on_nonfinite="keep"`, which scores it as it is (`result.nonfinite` counts them).

    `prefix`: token ids put in front of the text and never scored (after the checkpoint's own sink
    token, if it has one). In the cached modes they are the stream's first tokens, so with
    `sinks >= len(prefix)` they are the attention sinks (the paper's Table 1 puts four line breaks
    there); in recompute mode every window starts with them ("recompute with BOS": `prefix=[bos]`
    and the text without its BOS), and holds S - len(prefix) text tokens.

    `positions`: the cache's position convention in the cached modes, "cache" (the paper's) or
    "absolute" (docs/streaming.md); recompute windows are always fresh forwards.
    """
    check_model(model)
    check_positions(positions)
    if mode not in MODES:
        raise MiniLLMError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    check_int("sinks", sinks, 0)
    check_int("window", window, 1)
    check_int("block", block, 1, none_ok=True)
    check_int("recompute_batch", recompute_batch, 1, none_ok=True)
    check_int("dense_max_tokens", dense_max_tokens, 1)
    check_int("seed", seed)
    for name, flag in (("exact_loop", exact_loop), ("progress", progress), ("interruptible", interruptible)):
        check_bool(name, flag)
    if on_nonfinite not in ("raise", "keep"):
        raise MiniLLMError(f"on_nonfinite must be 'raise' or 'keep', got {on_nonfinite!r}")
    ids = _check_ids(ids)
    if mode == "recompute" and recompute_batch is not None:  # its memory, before any work
        from ..limits import check_forward

        b = min(recompute_batch, len(ids))
        check_forward(model, b, sinks + window, None, 0, False,
                      f"recompute_batch={recompute_batch}: {b} windows of {sinks + window} tokens at once")
    if isinstance(prefix, (str, bytes)) or not hasattr(prefix, "__len__"):
        raise MiniLLMError(f"prefix must be a sequence of token ids (possibly empty), got {type(prefix).__name__}")
    prefix = token_ids(prefix, "prefix") if len(prefix) else []
    stream, n_prefix = stream_tensor(model, prefix + ids)
    n_prefix += len(prefix)  # tokens in front of the text: the sink token, then `prefix`
    if mode == "recompute" and n_prefix >= sinks + window:
        raise MiniLLMError(f"prefix: {n_prefix} prefix token(s) leave no room for the text in a recompute "
                           f"window of S={sinks + window}")
    # Without a prefix the text's first token has no context and is not scored; after a prefix it
    # is (so "recompute with BOS", prefix=[bos] and the text without it, scores the same tokens).
    n_skip = n_prefix - 1 if prefix else n_prefix  # stream positions whose predictions are not scored
    n = len(ids) - (0 if prefix else 1)  # scored positions
    nll = torch.full((n,), float("nan"), dtype=torch.float64)
    subset, offset = None, None
    if stride is not None:
        offset, subset = stride_subset(n, stride, seed)
    S = sinks + window
    if mode == "window":
        sinks, window = 0, S
    elif mode == "dense":
        sinks, window = 0, stream.shape[1] - 1
        check_dense(model, window, dense_max_tokens)
    result = PerplexityResult(mode, nll, sinks, window, subset, stride, offset)
    scored = result.scored

    def store(p0: int, values: torch.Tensor) -> None:
        _store(nll, scored, n_skip, p0, values, bar, None if on_nonfinite == "keep" else mode)

    todo = int(subset.sum()) if (mode == "recompute" and subset is not None) else n
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=todo, desc=f"{mode:>9}", unit="tok", unit_scale=True, file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            if mode == "recompute":
                want = torch.arange(n) if subset is None else torch.nonzero(subset).flatten()
                _recompute_nll(model, stream, n_prefix, S, want + n_skip, recompute_batch, store)
            elif mode == "dense" and model.wpe is not None:  # learned positions cannot use a cache
                store(0, _nll_rows(model(stream[:, :-1])[0], stream[0, 1:]))
            else:
                _cached_nll(model, stream, n_prefix, sinks, window, exact_loop,
                            block or block_size(model, sinks + window), store, positions)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        result.interrupted = True
    finally:
        result.seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
    return result


def check_dense(model, tokens: int, cap: int) -> None:
    """Refuse dense mode over more than `cap` tokens, naming the KV cache it would need."""
    c = model.config
    elem = torch.finfo(model.dtype).bits // 8
    mib = c.num_layers * 2 * c.num_kv_heads * tokens * c.head_dim * elem / 2**20
    if tokens > cap:
        raise MiniLLMError(f"dense mode over {tokens} tokens needs a {mib:.0f} MiB KV cache that grows with "
                           f"the text; the cap is {cap} tokens (raise it with --dense-max-tokens, or use "
                           f"--max-tokens)")


def _nll_rows(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, V) logits, (n,) targets -> (n,) NLL, computed in float32 at least."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def _store(nll: torch.Tensor, scored: torch.Tensor, n_skip: int, p0: int, values: torch.Tensor, bar,
           check_mode: str | None) -> None:
    """values[j] predicts stream position p0 + j + 1, i.e. nll index p0 + j - n_skip (the first
    n_skip predictions, of the prefix and of an unprefixed text's first token, are not scored).
    With `check_mode`, a non-finite value raises NonFiniteError naming the token and the mode."""
    skip = max(0, n_skip - p0)
    values = values[skip:].double().cpu()
    i0 = p0 + skip - n_skip
    if check_mode is not None and not bool(torch.isfinite(values).all()):
        j = int(torch.nonzero(~torch.isfinite(values))[0])
        raise NonFiniteError(f"{check_mode} mode: the NLL of token {i0 + j + 1} is {float(values[j])} (non-finite "
                             f"logits); the weights or config produce non-finite numbers (in float16, try "
                             f"--dtype bfloat16 or float32)")
    nll[i0 : i0 + len(values)] = values
    scored[i0 : i0 + len(values)] = True
    if bar is not None:
        bar.update(len(values))


def _cached_nll(model, stream, n_prefix, sinks, window, exact_loop, block, store, positions="cache") -> None:
    """Stream the text through a sink+window cache: in blocks (parallel) or one token at a time."""
    last = stream.shape[1] - 1  # the last token is only a target
    targets = stream[0, 1:]
    cache = model.new_cache(batch_size=1, sinks=sinks, window=window, positions=positions)
    if not exact_loop:
        for p0 in range(0, last, block):
            p1 = min(p0 + block, last)
            store(p0, _nll_rows(model(stream[:, p0:p1], cache=cache)[0], targets[p0:p1]))
        return
    # The reference loop, tuned: one model call per token, logits gathered in a preallocated
    # buffer and scored every `rows` steps, so the loop body is the decode step and a copy.
    # 256 rows amortise the cross-entropy call over many steps while the buffer stays small
    # (256 x vocab floats: 32 MB at a 32k vocabulary).
    rows = 256
    buf = None
    for p in range(last):
        logits = model(stream[:, p : p + 1], cache=cache)[0, 0]
        if buf is None:
            buf = torch.empty((rows, logits.shape[-1]), dtype=logits.dtype, device=logits.device)
        buf[p % rows] = logits
        if p % rows == rows - 1 or p == last - 1:
            p0 = p - p % rows
            store(p0, _nll_rows(buf[: p - p0 + 1], targets[p0 : p + 1]))


def _recompute_nll(model, stream, n_prefix, S, positions, batch, store) -> None:
    """For each stream position p in `positions`: a fresh dense forward over the last S tokens
    ending at p (with the sink token, if any, in front of the last S-1), scoring stream[p+1]."""
    targets = stream[0, 1:]
    early = positions[positions < S]  # the window is the whole prefix stream[0..p]
    if len(early):
        top = int(early.max()) + 1
        logits = model(stream[:, :top])[0]  # row p: by causality, a fresh forward over 0..p
        for p in early.tolist():  # sorted, so partial results stay a prefix of the order
            store(p, _nll_rows(logits[p : p + 1], targets[p : p + 1]))
    late = positions[positions >= S]
    if not len(late):
        return
    W = S - n_prefix  # text tokens per window; the sink token fills the rest
    rows = stream[0].unfold(0, W, 1)  # rows[r] = stream[r : r + W], a view
    c = model.config
    if batch is None:  # keep one batch's logits and activations to a few hundred MB
        # At most 64 windows (larger batches were no faster on CPU), at most 8192 tokens in all
        # (b x S, so one batch's attention scores stay small), and at most 2**25 floats (128 MB in
        # float32) of logits (the forward computes all S positions of each window) plus about four
        # hidden-size activations per token.
        batch = max(1, min(64, 8192 // S, (1 << 25) // (S * (c.vocab_size + 4 * c.hidden_size))))
    for chunk in late.split(batch):
        ctx = rows[chunk - W + 1]  # (b, W): the windows ending at each p
        if n_prefix:
            ctx = torch.cat([stream[0, :n_prefix].expand(len(chunk), -1), ctx], dim=1)
        logits = model(ctx)[:, -1]  # (b, V): each window's last position predicts stream[p + 1]
        values = _nll_rows(logits, targets[chunk])
        for j, p in enumerate(chunk.tolist()):
            store(p, values[j : j + 1])
