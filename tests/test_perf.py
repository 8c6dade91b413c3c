"""The fast decode path (issue 6) computes exactly what the slow paths compute.

- Wide CPU Linear weights are stored column-major (fast/layout.py): after construction,
  loading, `.to()` and `.double()`, with unchanged values and an unchanged saved checkpoint.
- `logits_to_keep` gives the last positions' logits, with or without a cache.
- A RoPE decode step allocates nothing in proportion to the cache (profiled at several S).
- `minillm.fast.compile_decode`: one graph at steady state, no recompile from step to step, eager's logits,
  and the same cache contents afterwards.
- `tools/bench.py` runs every section end to end on a toy model and writes its JSON and PNG.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

import minillm
from util import random_model, rel_err, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _linear_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _cpu_layout_ok(model) -> bool:
    """Wide weights (out >= in) column-major, narrow ones as stored."""
    ws = _linear_weights(model)
    return all(w.stride() == ((1, w.shape[0]) if w.shape[0] >= w.shape[1] else (w.shape[1], 1)) for w in ws)


def test_cpu_linear_weights_are_column_major_everywhere(tmp_path):
    model = random_model(tiny_config("falcon_40b"), dtype=torch.float32)
    assert any(w.shape[0] < w.shape[1] for w in _linear_weights(model))  # both kinds present
    assert _cpu_layout_ok(model)
    minillm.save_pretrained(model, tmp_path)
    loaded = minillm.load(tmp_path)
    assert _cpu_layout_ok(loaded)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    ids = torch.randint(0, 61, (2, 9))
    assert rel_err(loaded(ids), model(ids)) == 0.0
    loaded.double()  # in place, through Module._apply
    assert all(w.dtype == torch.float64 for w in _linear_weights(loaded)) and _cpu_layout_ok(loaded)


@pytest.mark.parametrize("variant", ["llama_gqa", "mpt"])
def test_logits_to_keep(variant):
    model = random_model(tiny_config(variant))
    ids = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        assert rel_err(model(ids, logits_to_keep=3), full[:, -3:]) < 1e-14
        model.max_chunk = 7  # the cached path splits long chunks itself
        a = model(ids, cache=model.new_cache(2, 2, 10))
        b = model(ids, cache=model.new_cache(2, 2, 10), logits_to_keep=1)
    assert b.shape == (2, 1, 61) and rel_err(b, a[:, -1:]) < 1e-14
    for bad in (-1, 1.5, True):
        with pytest.raises(minillm.MiniLLMError, match="logits_to_keep"):
            model(ids, logits_to_keep=bad)


def _decode_allocations(model, S: int) -> int:
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(1, 4, S - 4)
    cache.tokens_seen = 3 * S  # steady state: full, the sinks re-rotated every step
    tok = torch.tensor([[3]])
    with torch.inference_mode():
        model(tok, cache=cache)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(tok, cache=cache)
    return sum(e.self_cpu_memory_usage for e in prof.key_averages() if e.self_cpu_memory_usage > 0)


def test_rope_decode_step_allocates_nothing_that_grows_with_the_cache():
    model = random_model(tiny_config("llama_gqa", layers=2), dtype=torch.float32)
    sizes = {S: _decode_allocations(model, S) for S in (512, 2048, 8192)}
    # SDPA's CPU kernel works in key blocks of 512: beyond one block nothing depends on S.
    assert len(set(sizes.values())) == 1, sizes
    assert sizes[8192] < 64 * 1024  # a few kB of activations, vs 8192-slot caches of 1 MB per layer


@torch.inference_mode()
def test_compiled_decode_equals_eager_and_never_recompiles():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()  # another test's graphs (tests/test_fast.py compiles too) must not count here

    eager = random_model(tiny_config("llama_gqa", layers=1), dtype=torch.float32)
    compiled = minillm.fast.compile_decode(copy.deepcopy(eager))
    S = 16
    caches = [m.new_cache(1, 2, S - 2) for m in (eager, compiled)]
    g = torch.Generator().manual_seed(0)
    for buf in ("k", "v", "raw_sink_k"):
        values = torch.randn(getattr(caches[0], buf).shape, generator=g)
        for c in caches:
            getattr(c, buf).copy_(values)
            c.tokens_seen = 5 * S + 3  # steady state from the first step
    for step in range(2 * S):  # twice round the ring: every slot rewritten
        tok = torch.tensor([[(7 * step) % 61]])
        want = eager(tok, cache=caches[0])
        got = compiled(tok, cache=caches[1])
        assert rel_err(got, want) < 1e-5, step
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, never recompiled
    for buf in ("k", "v", "raw_sink_k"):
        assert rel_err(getattr(caches[1], buf), getattr(caches[0], buf)) < 1e-5
    torch._dynamo.reset()


def test_bench_runs_every_section(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    out = tmp_path / "b.json"
    try:
        rc = bench.main(["--models", "smoke", "--sizes", "16,32", "--cache-size", "64", "--prompt", "40",
                         "--new-tokens", "4", "--reps", "5", "--steps", "2", "--threads", "1", "--bw-gib", "0.05",
                         "--compile-kwargs", "{}", "--json", str(out), "--png", str(tmp_path / "b.png")])
    finally:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
    assert rc == 0
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert set(sections) == {"recompute", "hf", "bandwidth", "compile"}
    assert all("error" not in s and "error" not in str(s.get("rows")) for s in sections.values()), sections
    assert [r["S"] for r in sections["recompute"]["rows"]] == [16, 32]
    hf = sections["hf"]["rows"][0]
    assert hf["ours_decode_tok_s"] > 0 and hf["hf_decode_tok_s"] > 0
    assert hf["short_prompt_agreement"] == "16/16"  # a prompt that fits the cache: the same greedy tokens
    assert sections["compile"]["rows"][0]["rel_err_vs_eager"] < 1e-5
    assert result["machine"]["torch"] == torch.__version__ and (tmp_path / "b.png").stat().st_size > 0
