"""Perplexity in four modes: the exact parallel evaluation equals the token-by-token loop, recompute
equals a slow direct computation, dense equals model(ids); strides, curves, sink scores."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minillm.errors import MiniLLMError
from minillm.evaluate import MAX_CURVE_POINTS, block_size, perplexity, stride_subset
from minillm.apps.attention_maps import attention_maps, attention_probs, attention_sink_scores
from minillm.reference import reference_stream
from util import random_model, rel_err, tiny_config

# One or two variants per family: RoPE (full/partial, MHA/GQA/MQA) and both ALiBi forms.
FAMILIES = ["llama_gqa", "llama_mqa", "falcon_40b", "falcon_rw", "mpt", "gpt_neox_parallel"]
_MODELS: dict = {}


def model_for(variant: str, dtype=torch.float32, **overrides):
    key = (variant, dtype, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = random_model(tiny_config(variant, **overrides), dtype=dtype, seed=1)
    return _MODELS[key]


def random_ids(n: int, seed: int = 0, vocab: int = 61) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def direct_nll(logits: torch.Tensor, targets) -> torch.Tensor:
    return F.cross_entropy(logits.double(), torch.as_tensor(targets), reduction="none")


@given(variant=st.sampled_from(FAMILIES), sinks=st.integers(0, 4), window=st.integers(1, 24),
       length=st.integers(2, 90), block=st.integers(1, 40), seed=st.integers(0, 1000))
def test_parallel_equals_token_by_token_loop(variant, sinks, window, length, block, seed):
    """The property of issue 4: per-token |dNLL| <= 1e-4 in float32 (streaming and window)."""
    model = model_for(variant)
    ids = random_ids(length, seed)
    for mode in ("streaming", "window"):
        par = perplexity(model, ids, mode, sinks, window, block=block)
        loop = perplexity(model, ids, mode, sinks, window, exact_loop=True)
        assert par.tokens == loop.tokens == length - 1
        assert (par.nll - loop.nll).abs().max().item() <= 1e-4


def test_streaming_equals_paper_reference():
    """In float64 the parallel evaluation and the loop both equal the paper's list-cache algorithm."""
    model = model_for("llama_gqa", torch.float64)
    ids = random_ids(150, 3)
    want = direct_nll(reference_stream(model, torch.tensor([ids]), 4, 20)[0, :-1], ids[1:])
    for kw in ({"block": 32}, {"block": 7}, {"exact_loop": True}):
        got = perplexity(model, ids, "streaming", 4, 20, **kw).nll
        assert (got - want).abs().max().item() < 1e-10


@pytest.mark.parametrize("variant", ["llama_gqa", "falcon_rw", "mpt", "gpt_neox_sequential"])
def test_dense_equals_dense_forward(variant):
    model = model_for(variant)
    ids = random_ids(120, 5)
    want = direct_nll(model(torch.tensor([ids]))[0, :-1], ids[1:])
    for kw in ({}, {"block": 16}, {"exact_loop": True}):
        got = perplexity(model, ids, "dense", 4, 20, **kw)  # the cache flags do not matter
        assert (got.sinks, got.window) == (0, 119)
        assert (got.nll - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("variant", ["mpt", "llama_gqa"])
def test_window_mode_is_sliding_window_attention(variant):
    """With one layer, window attention over S keys (no sinks) is exactly a fresh dense forward over
    the last S tokens, because every key depends only on its own token and the distance: so the
    cached window mode must equal the recompute mode, computed by separate dense forwards."""
    model = model_for(variant, torch.float64, layers=1)
    ids = random_ids(80, 6)
    got = perplexity(model, ids, "window", 3, 13)
    want = perplexity(model, ids, "recompute", 0, 16)
    assert (got.sinks, got.window) == (0, 16) and got.tokens == 79
    assert (got.nll - want.nll).abs().max().item() < 1e-10
    # ...and the sinks matter: once the text is past S, the 3-sink cache scores differently.
    streaming = perplexity(model, ids, "streaming", 3, 13)
    # (Equal to rounding before eviction, not bit for bit: a chunk that reaches past S scores its sinks
    # in a separate attention merged by log-sum-exp, attention._sdpa_sink_split.)
    assert (streaming.nll[:15] - got.nll[:15]).abs().max().item() < 1e-12
    assert (streaming.nll[15:] - got.nll[15:]).abs().max().item() > 1e-3


def slow_recompute(model, stream, S, n_prefix, start=None):
    """For each position p (from `start`, default n_prefix): a fresh dense forward over the last S
    tokens ending at p."""
    out = []
    for p in range(n_prefix if start is None else start, stream.shape[1] - 1):
        if p < S:
            ctx = stream[:, : p + 1]
        else:  # the sink token (if any) in front of the last S - n_prefix text tokens
            ctx = torch.cat([stream[:, :n_prefix], stream[:, p - (S - n_prefix) + 1 : p + 1]], dim=1)
        assert ctx.shape[1] == min(p + 1, S)
        out.append(direct_nll(model(ctx)[0, -1:], stream[0, p + 1 : p + 2])[0])
    return torch.stack(out)


@pytest.mark.parametrize("variant, sink_token", [("llama_gqa", None), ("falcon_rw", None), ("gpt_neox_parallel", 7)])
def test_recompute_equals_slow_direct_computation(variant, sink_token):
    model = model_for(variant, sink_token_id=sink_token)
    ids = random_ids(60, 7)
    stream = torch.tensor([([sink_token] if sink_token is not None else []) + ids])
    want = slow_recompute(model, stream, 2 + 14, 0 if sink_token is None else 1)
    for batch in (None, 1, 5):
        got = perplexity(model, ids, "recompute", 2, 14, recompute_batch=batch)
        assert got.tokens == 59
        assert (got.nll - want).abs().max().item() < 1e-4
    strided = perplexity(model, ids, "recompute", 2, 14, stride=4, seed=3, recompute_batch=3)
    assert torch.equal(strided.scored, strided.subset) and strided.tokens == int(strided.subset.sum())
    assert (strided.nll[strided.subset] - want[strided.subset]).abs().max().item() < 1e-4
    assert strided.ppl == pytest.approx(strided.ppl_strided)


def test_sink_token_is_prepended_and_never_scored():
    model = model_for("gpt_neox_parallel", sink_token_id=7)
    ids = random_ids(40, 8)
    dense = direct_nll(model(torch.tensor([[7] + ids]))[0, 1:-1], ids[1:])  # not the sink's prediction
    for mode in ("streaming", "dense"):  # T <= S: streaming is dense too
        got = perplexity(model, ids, mode, 4, 60)
        assert got.tokens == 39 and (got.nll - dense).abs().max().item() < 1e-4
    assert attention_probs(model, ids, tokens=10)[0].shape == (4, 10, 10)  # the sink token counts


@pytest.mark.parametrize("variant, sink_token", [("llama_gqa", None), ("mpt", None), ("gpt_neox_parallel", 7)])
def test_prefix_is_fed_first_and_never_scored(variant, sink_token):
    # prefix=P is the text P + ids with P's predictions unscored, in the cached modes (P are then
    # the stream's first tokens: the sinks), and P in front of every window in recompute mode.
    model = model_for(variant, sink_token_id=sink_token)
    ids, P = random_ids(70, 11), [3, 3, 3, 3]
    for mode in ("streaming", "window", "dense"):
        whole = perplexity(model, P + ids, mode, 4, 20)
        got = perplexity(model, ids, mode, 4, 20, prefix=P)
        # The text's first token is scored too: after a prefix it has context.
        assert got.tokens == 70 and torch.equal(got.nll, whole.nll[len(P) - 1:]), mode
    lead = [sink_token] if sink_token is not None else []
    n_front = len(lead) + len(P)
    want = slow_recompute(model, torch.tensor([lead + P + ids]), 4 + 20, n_front, start=n_front - 1)
    got = perplexity(model, ids, "recompute", 4, 20, prefix=P)
    assert got.tokens == 70 and (got.nll - want).abs().max().item() < 1e-4
    plain = perplexity(model, ids, "recompute", 4, 20)
    assert not torch.equal(plain.nll, got.nll)  # the prefix is really there


def test_recompute_with_bos_as_a_prefix_scores_the_same_tokens():
    model = model_for("llama_gqa")
    ids = [1] + random_ids(80, 13)  # a BOS-led text
    plain = perplexity(model, ids, "recompute", 0, 16, stride=3, seed=2)
    bos = perplexity(model, ids[1:], "recompute", 0, 16, prefix=ids[:1], stride=3, seed=2)
    assert torch.equal(plain.scored, bos.scored) and bos.tokens == plain.tokens
    early = plain.scored.clone()
    early[15:] = False
    assert torch.equal(plain.nll[early], bos.nll[early])  # windows that reach back to BOS are the same
    assert not torch.equal(plain.nll[plain.scored], bos.nll[bos.scored])  # later ones start with it


def test_prefix_errors():
    model = model_for("llama_gqa")
    ids = random_ids(30, 12)
    with pytest.raises(MiniLLMError, match="prefix: 24 prefix token"):
        perplexity(model, ids, "recompute", 4, 20, prefix=[1] * 24)
    with pytest.raises(MiniLLMError, match="out of range"):
        perplexity(model, ids, "streaming", 4, 20, prefix=[10**6])
    with pytest.raises(MiniLLMError):
        perplexity(model, ids, "streaming", 4, 20, prefix="abc")


def test_stride_subset():
    off, mask = stride_subset(100, 7, seed=5)
    assert 0 <= off < 7 and torch.equal(torch.nonzero(mask).flatten(), torch.arange(off, 100, 7))
    assert stride_subset(100, 7, seed=5)[0] == off  # reproducible from the seed
    assert {stride_subset(100, 7, seed=s)[0] for s in range(50)} == set(range(7))  # every offset occurs
    assert stride_subset(3, 10, seed=1)[1].sum() == 1  # a short text still has one token
    assert torch.equal(stride_subset(10, 1)[1], torch.ones(10, dtype=torch.bool))
    with pytest.raises(MiniLLMError, match="stride"):
        stride_subset(10, 0)


def test_every_mode_reports_the_same_strided_subset():
    model = model_for("llama_gqa")
    ids = random_ids(90, 9)
    results = {m: perplexity(model, ids, m, 2, 10, stride=6, seed=11) for m in ("streaming", "window", "dense", "recompute")}
    subsets = {(r.offset, tuple(r.subset.tolist())) for r in results.values()}
    assert len(subsets) == 1
    s = results["streaming"]
    assert s.ppl_strided == pytest.approx(math.exp(s.nll[s.subset].mean().item()))
    assert s.tokens == 89 and results["recompute"].tokens == int(s.subset.sum())
    assert perplexity(model, ids, "streaming", 2, 10).ppl_strided is None


def test_nll_curve():
    model = model_for("llama_mqa", vocab=61, layers=1)
    ids = random_ids(2600, 10)
    r = perplexity(model, ids, "streaming", 4, 60)
    curve = r.nll_curve()
    assert 990 <= len(curve) <= MAX_CURVE_POINTS
    assert curve[0] == [1, pytest.approx(r.nll[0].item())]
    assert curve[-1][0] == 2599 and curve[-1][1] == pytest.approx(math.log(r.ppl))
    assert all(a[0] < b[0] for a, b in zip(curve, curve[1:]))
    assert len(r.nll_curve(max_points=10)) == 10
    short = perplexity(model, ids[:50], "streaming", 4, 60).nll_curve()
    assert [x for x, _ in short] == list(range(1, 50))


class Interrupting:
    """A model proxy whose n-th call raises KeyboardInterrupt (Ctrl-C in the middle of a run)."""

    def __init__(self, model, after: int):
        self.model, self.calls, self.after = model, 0, after

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt
        return self.model(*args, **kwargs)


def test_interrupt_keeps_the_scored_prefix():
    model = model_for("llama_gqa")
    ids = random_ids(100, 11)
    full = perplexity(model, ids, "streaming", 2, 10, block=16)
    part = perplexity(Interrupting(model, 3), ids, "streaming", 2, 10, block=16, interruptible=True)
    assert part.interrupted and part.tokens == 48
    assert torch.equal(part.nll[:48], full.nll[:48]) and torch.isnan(part.nll[48:]).all()
    assert part.scored[:48].all() and not part.scored[48:].any() and part.nonfinite == 0
    assert part.ppl == pytest.approx(math.exp(full.nll[:48].mean().item()))
    with pytest.raises(KeyboardInterrupt):
        perplexity(Interrupting(model, 3), ids, "streaming", 2, 10, block=16)


def test_bad_input():
    model = model_for("llama_gqa")
    with pytest.raises(MiniLLMError, match="unknown mode 'bogus'"):
        perplexity(model, [1, 2, 3], "bogus")
    with pytest.raises(MiniLLMError, match="at least 2"):
        perplexity(model, [1], "streaming")
    with pytest.raises(MiniLLMError, match="window must be an integer >= 1"):
        perplexity(model, [1, 2, 3], "streaming", 4, 0)
    with pytest.raises(MiniLLMError, match="sinks must be an integer >= 0"):
        perplexity(model, [1, 2, 3], "streaming", -1, 4)
    with pytest.raises(MiniLLMError, match="out of range"):
        perplexity(model, [1, 2, 300], "streaming")
    with pytest.raises(MiniLLMError, match=r"dense mode over 99 tokens needs a 0 MiB KV cache .* cap is 50"):
        perplexity(model, random_ids(100), "dense", dense_max_tokens=50)


def test_block_size_bounds_the_scores():
    model = model_for("llama_gqa")  # 4 heads
    assert block_size(model, 1024) == 512  # 4 * 512 * 1536 <= 2**22 < 4 * 1024 * 2048
    assert block_size(model, 16, budget=1 << 30) == model.max_chunk
    assert block_size(model, 32768) == 64  # never below 64
    n = block_size(model, 4096, budget=1 << 24)
    assert 4 * n * (4096 + n) <= 1 << 24 < 4 * 2 * n * (4096 + 2 * n)


def test_attention_maps_and_sink_scores():
    model = model_for("llama_gqa")
    ids = random_ids(64, 12)
    probs = attention_probs(model, ids)
    maps = attention_maps(model, ids, probs=probs)
    assert maps.shape == (2, 64, 64)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 64), atol=1e-5)
    assert torch.equal(maps.triu(1), torch.zeros_like(maps))  # causal
    s = attention_sink_scores(model, ids, probs=probs)
    assert s.min_query == 32 and s.tokens == 64 and len(s.per_layer) == 2
    for layer, p in enumerate(probs):
        assert s.per_layer[layer] == pytest.approx(p[:, 32:, 0].mean().item(), rel=1e-6)
        assert s.strongest_head[layer] == pytest.approx(p[:, 32:, 0].mean(-1).max().item(), rel=1e-6)
    assert s.uniform == pytest.approx(sum(1 / (q + 1) for q in range(32, 64)) / 32)
    # A layer that puts everything on token 0 scores 1; even attention scores `uniform`.
    T = 16
    sink = torch.zeros(2, T, T)
    sink[:, :, 0] = 1
    even = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    s = attention_sink_scores(None, None, min_query=8, probs=[sink, even[None].expand(2, T, T)])
    assert s.per_layer == [1.0, pytest.approx(s.uniform)]
    with pytest.raises(MiniLLMError, match="min_query"):
        attention_sink_scores(None, None, min_query=16, probs=[sink])
    assert rel_err(attention_maps(model, ids, tokens=20), maps[:, :20, :20]) < 1e-5  # causal prefix


def test_nonfinite_logits_are_an_error_or_kept_as_scored():
    """A NaN weight is a clear error naming the token; with on_nonfinite="keep" the tokens count as
    scored (NaN), never as "not scored"."""
    from minillm.apps.sampling import NonFiniteError

    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32, seed=3)
    with torch.no_grad():
        model.layers[1].mlp.w_out.weight[0, 0] = float("nan")
    ids = random_ids(40, 12)
    for mode in ("streaming", "window", "recompute", "dense"):
        with pytest.raises(NonFiniteError, match="token 1 is nan"):
            perplexity(model, ids, mode, 2, 10)
        kept = perplexity(model, ids, mode, 2, 10, on_nonfinite="keep")
        assert kept.tokens == 39 and kept.nonfinite == 39 and math.isnan(kept.ppl)
