"""The decoder shared by all four families, and `Model.forward`: validate, plan, blocks, head.

One `Block` with a few flags covers them (as in litgpt):
- Llama:    x + attn(rms(x)); then + swiglu(rms(x))                    (sequential)
- GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))                             (parallel residual)
- Falcon:   x + attn(ln(x)) + mlp(ln(x))   7B: one shared norm;  40B: ln_attn / ln_mlp
- MPT:      sequential LayerNorm blocks with ALiBi
The family files in `minillm/formats/families/` only parse configs and name weights.

`model(ids)` is the dense causal forward; `model(ids, cache=cache)` streams the chunk through the
fixed-shape sink + window cache. A forward plans its attention once (attention.plan: key sets and
positions from the contract), runs the blocks, applies the head, and then the cache advances.
`model.fast`, when set (minillm/fast/, on by default in `minillm.load`), may offer a faster plan
for the same computation; it is None here, and this file works without it.
"""

from __future__ import annotations

import itertools
import operator

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from ..checks import check_int, parse_device, parse_dtype, tracing
from ..errors import MiniLLMError
from ..identity import register, same_model
from ..limits import check_forward
from .attention import Spec, plan
from .cache import MAX_SEEN, SinkCache
from .contract import check_positions
from .positions import alibi_slopes, rope_inv_freq

_model_ids = itertools.count(1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one call, the same arithmetic as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 at least; float64 stays exact
        return self.weight * F.rms_norm(x.to(acc), self.weight.shape, eps=self.eps).to(x.dtype)


def make_norm(c: ModelConfig) -> nn.Module:
    if c.norm == "rmsnorm":
        return RMSNorm(c.hidden_size, c.norm_eps)
    return nn.LayerNorm(c.hidden_size, eps=c.norm_eps, bias=c.norm_bias)


ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.swiglu = c.activation == "swiglu"
        width = 2 * c.intermediate_size if self.swiglu else c.intermediate_size  # swiglu: [gate; up]
        self.w_in = nn.Linear(c.hidden_size, width, bias=c.mlp_bias)
        self.w_out = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = None if self.swiglu else ACTIVATIONS[c.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.w_out(F.silu(gate) * up)
        return self.w_out(self.act(h))


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.c = c
        self.layer = layer
        self.q_size = c.num_heads * c.head_dim
        self.kv_size = c.num_kv_heads * c.head_dim
        self.wqkv = nn.Linear(c.hidden_size, self.q_size + 2 * self.kv_size, bias=c.qkv_bias)  # [q; k; v]
        self.wo = nn.Linear(self.q_size, c.hidden_size, bias=c.out_bias)

    def forward(self, x, plan, cache, probs_out=None):
        qkv = self.wqkv(x)
        if self.c.clip_qkv is not None:
            qkv = qkv.clamp(-self.c.clip_qkv, self.c.clip_qkv)
        return self.wo(plan.attend(self.layer, qkv, cache, probs_out))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int):
        super().__init__()
        self.parallel = c.parallel_residual
        # Where the partial sums of a tensor-parallel shard (minillm/parallel/) are all-reduced:
        # after each row-parallel projection, or once after a parallel block's attention + MLP.
        self.reduce = _identity
        self.attn_norm = make_norm(c)
        self.mlp_norm = None if c.shared_norm else make_norm(c)
        self.attn = Attention(c, layer)
        self.mlp = MLP(c)

    def forward(self, x, plan, cache, probs_out=None):
        h = self.attn_norm(x)
        a = self.attn(h, plan, cache, probs_out)
        if self.parallel:
            return x + self.reduce(a + self.mlp(h if self.mlp_norm is None else self.mlp_norm(x)))
        x = x + self.reduce(a)
        return x + self.reduce(self.mlp(self.mlp_norm(x)))


def _kept(lengths: torch.Tensor, keep: int, device) -> torch.Tensor:
    """(B, keep) positions of each row's last `keep` consumed tokens (clamped at 0: unspecified)."""
    return (lengths[:, None] - keep + torch.arange(keep)).clamp(min=0).to(device)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, n, d) at positions idx (B, k) per row -> (B, k, d)."""
    return x.gather(1, idx[:, :, None].expand(-1, -1, x.shape[-1]))


class Model(nn.Module):
    """A decoder-only LM. `model(ids)` is dense; `model(ids, cache=cache)` streams."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.wpe = nn.Embedding(c.max_position_embeddings, c.hidden_size) if c.learned_pos_emb else None
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_layers))
        self.norm = make_norm(c)
        self.lm_head = None if c.tie_word_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.uid = next(_model_ids)  # caches remember which model made them
        register(self)  # so that a twin (the same config and weights) may use its caches (identity.py)
        # A longer streamed chunk goes in pieces of this many tokens (which never changes the result):
        # it bounds one piece's (n, S + n) scores per head, while keeping the products efficient.
        self.max_chunk = 1024
        self.fast = None  # the fast layer (minillm.fast.enable), or None: this file's path alone
        self.eos_ids: frozenset[int] = frozenset()  # the ids that end a reply (minillm.load reads them)
        self.quantized: str | None = None  # "int8" once minillm.quantize_int8 has replaced the weights
        self._specs: dict = {}

    @property
    def is_quantized(self) -> bool:
        return self.quantized is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def spec(self) -> Spec:
        """The config, positional tables, dtype and device every plan of this model shares."""
        key = (self.device, self.dtype)
        if key not in self._specs:
            c, device = self.config, self.device
            rope = c.positions == "rope"
            inv_freq = rope_inv_freq(c.rotary_dim, c.rope_theta).to(device) if rope else None
            slopes = None if rope else alibi_slopes(c.alibi, c.num_heads, c.alibi_bias_max).to(device)
            self._specs[key] = Spec(c, inv_freq, slopes, self.dtype, device)
        return self._specs[key]

    def new_cache(self, batch_size: int = 1, sinks: int = 4, window: int = 1020, dtype=None,
                  device=None, positions: str = "cache") -> SinkCache:
        """A fixed-shape cache of capacity S = sinks + window (the new token included).

        `positions` is the position convention (docs/streaming.md): "cache" (the paper's: the
        keys at their ranks in the cache, the query at min(t, S-1)) or "absolute" (every key at its
        text position, the query at t). Both coincide until the cache is full.

        `dtype` and `device` default to the model's (a dtype may be given as a string). A cache
        that does not fit in the device's available memory is refused up front, with its size."""
        from ..limits import cache_bytes, check_fits

        c = self.config
        check_positions(positions, "new_cache: positions")
        for name, value, low in (("batch_size", batch_size, 1), ("sinks", sinks, 0), ("window", window, 1)):
            check_int(f"new_cache: {name}", value, low)
        dtype = self.dtype if dtype is None else parse_dtype(dtype)
        device = self.device if device is None else parse_device(device)
        check_fits(cache_bytes(c, batch_size, sinks, window, torch.finfo(dtype).bits // 8), device,
                   f"new_cache: a KV cache of {batch_size} x {sinks + window} keys (sinks {sinks} + window {window})")
        return SinkCache(num_layers=c.num_layers, batch_size=batch_size, num_kv_heads=c.num_kv_heads,
                         head_dim=c.head_dim, sinks=sinks, window=window, dtype=dtype,
                         device=device, owner_id=self.uid,
                         keep_raw_sinks=c.positions == "rope", positions=positions)

    def _check(self, input_ids: torch.Tensor, cache: SinkCache | None) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise MiniLLMError(f"input_ids must be a (batch, tokens) tensor with at least one token, got {got}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise MiniLLMError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if input_ids.device != self.device:
            raise MiniLLMError(f"device mismatch: input_ids are on {input_ids.device}, the model on {self.device}")
        V = self.config.vocab_size
        # One reduction (the embedding would fail obscurely); not while torch.compile traces (checks.tracing).
        if not tracing() and bool(((input_ids < 0) | (input_ids >= V)).any()):
            bad = input_ids[(input_ids < 0) | (input_ids >= V)][0].item()
            raise MiniLLMError(f"input_ids: token id {bad} is out of range for the model's vocabulary of {V}")
        if cache is None:
            if self.wpe is not None and input_ids.shape[1] > self.config.max_position_embeddings:
                raise MiniLLMError(f"input of {input_ids.shape[1]} tokens exceeds this checkpoint's learned "
                                   f"position table ({self.config.max_position_embeddings})")
            return
        if not isinstance(cache, SinkCache):
            raise MiniLLMError(f"cache must be a SinkCache from model.new_cache(), got {type(cache).__name__}")
        if cache.owner_id != self.uid and not same_model(cache.owner_id, self):  # a twin's cache is fine
            raise MiniLLMError("cache was made by a different model (other weights or config); use this "
                               "model's new_cache()")
        if cache.batch_size != input_ids.shape[0]:
            raise MiniLLMError(f"batch_size mismatch: the cache holds {cache.batch_size} rows, the input has "
                               f"{input_ids.shape[0]}")
        if cache.dtype != self.dtype:
            raise MiniLLMError(f"dtype mismatch: the cache is {cache.dtype}, the model is {self.dtype}")
        if cache.device != self.device:
            raise MiniLLMError(f"device mismatch: the cache is on {cache.device}, the model on {self.device}")
        if self.wpe is not None:
            raise MiniLLMError("this checkpoint has learned absolute position embeddings (transformer.wpe), "
                               "which cannot stream past max_seq_len; use the dense forward")
        if int(cache._seen.max()) > MAX_SEEN - input_ids.shape[1]:  # the int64 count would wrap around
            raise MiniLLMError(f"cache: {input_ids.shape[1]} more tokens would carry a row's tokens_seen "
                               f"({int(cache._seen.max())}) past 2^63-1; reset the row")

    def forward(self, input_ids: torch.Tensor, cache: SinkCache | None = None,
                attn_probs: list | None = None, logits_to_keep: int = 0, lengths=None) -> torch.Tensor:
        """(B, T) ids -> (B, T, vocab) logits. With `cache`, streams the T tokens through it.

        `lengths` (with a cache; a (B,) tensor or list of ints in [0, T]): row b consumes only
        input_ids[b, :lengths[b]], the next tokens of its own stream (right padding); logits at
        padded positions are unspecified, and a row of length 0 is not touched. When every length
        is 0 or 1 this is the batched decode step, each row at its own position.

        `attn_probs`, when a list is given, receives each layer's (B, H, T, keys) attention
        probabilities (the explicit-scores path, for attention maps). `logits_to_keep=k > 0`
        returns only the last k positions' logits (B, k, vocab), each row's last k consumed ones
        with `lengths`, and computes only those: a recomputation that needs the last token's
        prediction skips a (T, vocab) product.
        """
        self._check(input_ids, cache)
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise MiniLLMError(f"logits_to_keep must be an integer >= 0, got {logits_to_keep!r}")
        if attn_probs is not None and not isinstance(attn_probs, list):
            raise MiniLLMError(f"attn_probs must be a list (it receives each layer's probabilities) or None, "
                               f"got {type(attn_probs).__name__}")
        B, T = input_ids.shape
        check_forward(self, B, T, cache, min(logits_to_keep, T), attn_probs is not None)  # memory, up front
        lengths = self._lengths(lengths, B, T, cache)
        keep = min(logits_to_keep, T)
        if lengths is not None and T > 1 and int(lengths.max()) <= 1:  # one token per row at most: decode
            logits = self._forward(input_ids[:, :1].contiguous(), cache, attn_probs, 0, lengths)  # as a (B, 1) call
            return logits.expand(B, keep or T, logits.shape[-1])  # padded positions are unspecified
        if cache is None or T <= self.max_chunk:
            return self._forward(input_ids, cache, attn_probs, keep, lengths)
        # Chunking never changes the result: pieces of max_chunk tokens, each row its share of each.
        # Only the logits asked for are computed: with logits_to_keep, at most the last `keep`
        # positions of each piece (one is always computed, and dropped if not wanted).
        logits, last = [], None
        for p0 in range(0, T, self.max_chunk):
            piece = input_ids[:, p0 : p0 + self.max_chunk]
            n = piece.shape[1]
            if lengths is None:
                want = min(n, keep - (T - p0 - n)) if keep else n  # this piece's share of the last `keep`
                out = self._forward(piece, cache, attn_probs, max(1, want) if keep else 0)
                if want > 0:
                    logits.append(out[:, -want:])
                continue
            share = (lengths - p0).clamp(0, n)
            if keep == 1:  # each row's last logits come from the last piece it has tokens in
                out = self._forward(piece, cache, attn_probs, 1, share)
                last = out if last is None else torch.where((share > 0).to(out.device)[:, None, None], out, last)
            else:
                logits.append(self._forward(piece, cache, attn_probs, 0, share))
        if last is not None:
            return last
        logits = torch.cat(logits, dim=1)
        if lengths is None or not keep:
            return logits
        return _gather_rows(logits, _kept(lengths, keep, logits.device))

    @staticmethod
    def _lengths(lengths, B: int, T: int, cache) -> torch.Tensor | None:
        """`lengths` checked, as a (B,) int64 CPU tensor; None when every row consumes all T."""
        if lengths is None:
            return None
        if cache is None:
            raise MiniLLMError("lengths: per-row lengths need a cache (the dense forward has no streams)")
        if isinstance(lengths, torch.Tensor):
            dt = lengths.dtype
            if dt.is_floating_point or dt.is_complex or dt == torch.bool or lengths.dim() != 1:
                raise MiniLLMError(f"lengths must be a ({B},) integer tensor, got {tuple(lengths.shape)} {dt}")
            lengths = lengths.tolist()
        values = lengths.tolist() if hasattr(lengths, "tolist") else lengths  # numpy arrays
        if not isinstance(values, (list, tuple)) or len(values) != B:  # not a dict's keys, nor a set's order
            raise MiniLLMError(f"lengths must give one integer per row: a list or tensor of {B}, got {lengths!r:.80}")
        checked = []
        for b, n in enumerate(values):
            is_bool = isinstance(n, bool) or getattr(n, "dtype", None) == bool
            try:
                checked.append(None if is_bool else operator.index(n))  # ints, numpy integers
            except TypeError:
                checked.append(None)
            if checked[-1] is None:
                raise MiniLLMError(f"lengths[{b}] must be an integer, got {n!r} ({type(n).__name__})")
            if not 0 <= checked[-1] <= T:
                raise MiniLLMError(f"lengths[{b}] must be in [0, {T}] (the input has {T} tokens per row), got {n}")
        return None if all(n == T for n in checked) else torch.tensor(checked)

    def _forward(self, input_ids, cache, attn_probs, logits_to_keep=0, lengths=None):
        n = input_ids.shape[1]
        p = None
        if self.fast is not None and attn_probs is None:
            p = self.fast.plan(self, n, cache, lengths)  # the same attention, faster; None: not this call
        if p is None:
            p = plan(self.spec(), n, cache, lengths)
        step = getattr(p, "step", None) or self._step  # a fast plan may bring its own (compiled) step
        if lengths is not None and logits_to_keep and n > 1:  # each row's own last positions
            logits = step(input_ids, p, cache, attn_probs, 0, _kept(lengths, logits_to_keep, input_ids.device))
        else:
            logits = step(input_ids, p, cache, attn_probs, logits_to_keep)
        if cache is not None:  # every layer has written its keys
            cache.advance(n if lengths is None else lengths)
        return logits

    def _step(self, input_ids, plan, cache, attn_probs, logits_to_keep=0, kept=None):
        c = self.config
        x = self.embed(input_ids)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(input_ids.shape[1], device=x.device))
        plan.prepare(cache)
        for block in self.layers:
            x = block(x, plan, cache, attn_probs)
        if kept is not None:  # (B, k) positions per row
            x = _gather_rows(x, kept)
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        x = self.norm(x)
        logits = F.linear(x, self.embed.weight) if self.lm_head is None else self.lm_head(x)
        if c.logit_scale is not None:
            logits = logits * c.logit_scale
        return logits
