"""minillm.testing, the kit other engines check their sink caches with (issue 23).

`SinkLlama` below is an engine written without minillm: a plain-torch float32 Llama that reads the
checkpoint's safetensors itself and keeps its own sink cache (the held keys un-rotated, each
query's visible keys and their positions worked out from text positions). It must pass the kit in
both conventions; the `plant=` variants reproduce the bugs the kit exists to catch:

  window+1        one key too many in the window (an off-by-one ring buffer)
  no_rerotate     sinks kept at their text positions while the query moves on (vLLM's eviction PR;
                  under the cache convention this is exactly the absolute one)
  chunk_mask      chunks of more than one token get a plain sliding-window mask of S keys that
                  ignores the sinks (mlx-lm's RotatingKVCache with keep > 0 fed chunks)
  late            after 3S tokens the cache evicts sink 0 instead of the oldest window key

The model is a tiny random Llama (2 layers, 32 wide, vocab 61) saved to a temporary directory;
S = 2 + 6, so streams reach 32 tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import minillm
from minillm.errors import MiniLLMError
from minillm.testing import ConformanceError, MiniLLMEngine, check_engine
from util import random_model, tiny_config

SINKS, WINDOW = 2, 6
S = SINKS + WINDOW
FEW = 8  # Hypothesis examples per check: the planted bugs are caught within a few


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("kit") / "tiny-llama"
    minillm.save_pretrained(random_model(tiny_config("llama_gqa", vocab=61), dtype=torch.float32, seed=3), directory)
    return directory


class SinkLlama:
    """An independent float32 Llama with a sink cache (see the module docstring)."""

    def __init__(self, model_dir, sinks, window, positions="cache", plant=None):
        c = json.loads((model_dir / "config.json").read_text())
        self.w = load_file(str(model_dir / "model.safetensors"))
        self.w = {k: v.float() for k, v in self.w.items()}
        self.L, self.H, self.KV = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
        self.hd, self.eps, theta = c["head_dim"], c["rms_norm_eps"], c["rope_theta"]
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd)
        self.sinks, self.window, self.positions, self.plant = sinks, window, positions, plant
        self.reset()

    def reset(self):
        self.t = 0
        self.pos = torch.zeros(0, dtype=torch.int64)  # text positions of the held keys
        self.k = [torch.zeros(self.KV, 0, self.hd) for _ in range(self.L)]  # un-rotated
        self.v = [torch.zeros(self.KV, 0, self.hd) for _ in range(self.L)]

    def norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[name]

    def rope(self, x, p):  # x (..., hd), p broadcastable to x[..., 0]: rotate-half RoPE
        a = p.float()[..., None] * self.inv_freq
        cos, sin = torch.cat([a.cos(), a.cos()], -1), torch.cat([a.sin(), a.sin()], -1)
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def visible(self, kp, t, chunked):  # (n, Lk) bool: which keys each query sees
        t, kp = t[:, None], kp[None, :]
        sinks, window = self.sinks, self.window + (self.plant == "window+1")
        if self.plant == "chunk_mask" and chunked:
            return (kp <= t) & (t - kp < sinks + self.window)
        see = (kp <= t) & ((kp < sinks) | (kp > t - window))
        if self.plant == "late":  # past 3S: sink 0 gone, one more window key
            S = sinks + self.window
            see = see & ~((t >= 3 * S) & (kp == 0)) | ((t >= 3 * S) & (kp == t - window))
        return see

    @torch.no_grad()
    def feed(self, ids):
        n, w = len(ids), self.w
        t = torch.arange(self.t, self.t + n)
        kp = torch.cat([self.pos, t])
        see = self.visible(kp, t, n > 1)
        if self.positions == "cache" and self.plant != "no_rerotate":
            rank = see.cumsum(-1) - 1  # each visible key's place in its query's cache
            qpos, kpos = see.sum(-1) - 1, rank
        else:
            qpos, kpos = t, kp[None, :].expand(n, -1)
        x = w["model.embed_tokens.weight"][torch.tensor(ids)]
        for i in range(self.L):
            p = f"model.layers.{i}."
            h = self.norm(x, p + "input_layernorm.weight")
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(n, self.H, self.hd).transpose(0, 1)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(n, self.KV, self.hd).transpose(0, 1)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, self.KV, self.hd).transpose(0, 1)
            K, V = torch.cat([self.k[i], k], 1), torch.cat([self.v[i], v], 1)
            self.k[i], self.v[i] = K, V
            g = self.H // self.KV
            Kr = self.rope(K.repeat_interleave(g, 0)[:, None], kpos[None])  # (H, n, Lk, hd)
            qr = self.rope(q, qpos[None])  # (H, n, hd)
            scores = (qr[:, :, None, :] * Kr).sum(-1) / self.hd ** 0.5
            probs = scores.masked_fill(~see, float("-inf")).softmax(-1)
            a = (probs @ V.repeat_interleave(g, 0)).transpose(0, 1).reshape(n, -1)
            x = x + a @ w[p + "self_attn.o_proj.weight"].T
            h = self.norm(x, p + "post_attention_layernorm.weight")
            gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        logits = self.norm(x, "model.norm.weight") @ w["lm_head.weight"].T
        self.t += n
        # Evict what no later query can see (one more key kept for the plants that read it).
        last, extra = self.t - 1, 1 if self.plant in ("window+1", "late") else 0
        keep = (kp < self.sinks) | (kp > last - self.window - extra)
        self.pos = kp[keep]
        self.k = [K[:, keep] for K in self.k]
        self.v = [V[:, keep] for V in self.v]
        return logits


def check(make, model_dir, positions="cache", **kw):
    return check_engine(make, model_dir, sinks=SINKS, window=WINDOW, positions=positions,
                        max_examples=kw.pop("max_examples", FEW), **kw)


# ---------------------------------------------------------------------------------------------
# Correct engines pass


@pytest.mark.parametrize("positions", ["cache", "absolute"])
def test_minillm_engine_passes(model_dir, positions):
    model = minillm.load(model_dir, dtype=torch.float32)
    report = check(lambda: MiniLLMEngine(model, SINKS, WINDOW, positions=positions), model_dir, positions)
    assert report.examples >= FEW and report.longest > 3 * S and report.worst_error <= report.atol


@pytest.mark.parametrize("positions", ["cache", "absolute"])
def test_independent_float32_engine_passes(model_dir, positions):
    report = check(lambda: SinkLlama(model_dir, SINKS, WINDOW, positions), model_dir, positions)
    assert report.longest > 3 * S and 0 < report.worst_error <= report.atol


# ---------------------------------------------------------------------------------------------
# Planted bugs are caught: one ConformanceError (not a group), shrunk, with its reproduction


def caught(make, model_dir, positions="cache") -> ConformanceError:
    with pytest.raises(ConformanceError) as info:
        check(make, model_dir, positions)
    e = info.value
    assert type(e) is ConformanceError and isinstance(e, AssertionError)
    assert sum(e.chunks) == len(e.tokens) and e.worst_error > e.atol
    assert e.position_vs_S == e.token_index - S
    assert "\n" not in str(e) and f"token {e.token_index} " in str(e) and f"chunks={e.chunks}" in str(e)
    return e


def test_each_convention_catches_the_other(model_dir):
    """A correct cache-convention engine fails the absolute check and vice versa: past S tokens the
    sinks' distance to the query is S-1-i in one and t-i in the other (the two agree below S)."""
    for engine, checked in (("absolute", "cache"), ("cache", "absolute")):
        e = caught(lambda: SinkLlama(model_dir, SINKS, WINDOW, engine), model_dir, checked)
        assert e.token_index >= S and len(e.tokens) == e.token_index + 1 and e.positions == checked


def test_window_off_by_one_is_caught(model_dir):
    e = caught(lambda: SinkLlama(model_dir, SINKS, WINDOW, plant="window+1"), model_dir)
    assert e.token_index >= S and len(e.tokens) == e.token_index + 1  # shrunk: it ends at the divergence


def test_sinks_never_rerotated_is_caught(model_dir):
    e = caught(lambda: SinkLlama(model_dir, SINKS, WINDOW, plant="no_rerotate"), model_dir)
    assert e.token_index >= S and len(e.tokens) == e.token_index + 1


def test_chunk_mask_ignoring_sinks_is_caught(model_dir):
    e = caught(lambda: SinkLlama(model_dir, SINKS, WINDOW, plant="chunk_mask"), model_dir)
    assert e.chunks[e.chunk_index] > 1 and e.token_index >= S


def test_error_after_3S_tokens_is_caught(model_dir):
    e = caught(lambda: SinkLlama(model_dir, SINKS, WINDOW, plant="late"), model_dir)
    assert e.token_index == 3 * S and len(e.tokens) == 3 * S + 1


# ---------------------------------------------------------------------------------------------
# Bad input


class Wrong:
    def __init__(self, fn):
        self.fn = fn

    def reset(self):
        pass

    def feed(self, ids):
        return self.fn(ids)


@pytest.mark.parametrize("fn, message", [
    (lambda ids: torch.zeros(len(ids), 60), r"chunk 0 \(\d+ tokens\) returned shape \(\d+, 60\), not \(\d+, 61\)"),
    (lambda ids: torch.zeros(len(ids) + 1, 61), r"returned logits for \d+ tokens, not \d+"),
    (lambda ids: torch.zeros(len(ids), 61, dtype=torch.int64), r"returned a torch.int64 tensor; logits must be a floating"),
    (lambda ids: [0.0] * 61, r"returned a list, not a torch.Tensor"),
])
def test_malformed_engine_output_is_one_line_naming_it(model_dir, fn, message):
    with pytest.raises(MiniLLMError, match=message) as info:
        check(lambda: Wrong(fn), model_dir)
    assert "\n" not in str(info.value)


def test_bad_positions_and_arguments(model_dir):
    model = minillm.load(model_dir, dtype=torch.float32)
    for call in (lambda: check(lambda: None, model_dir, positions="relative"),
                 lambda: MiniLLMEngine(model, SINKS, WINDOW, positions="relative")):
        with pytest.raises(MiniLLMError, match=r"positions must be 'cache' or 'absolute', got 'relative'$"):
            call()
    with pytest.raises(MiniLLMError, match="no default tolerance for dtype torch.int8"):
        check(lambda: None, model_dir, dtype=torch.int8)


def test_an_engine_that_raises_is_its_failure(model_dir):
    class Boom(SinkLlama):
        def feed(self, ids):
            if self.t + len(ids) > S + 2:
                raise ValueError("kv cache full")
            return super().feed(ids)

    with pytest.raises(ConformanceError) as info:
        check(lambda: Boom(model_dir, SINKS, WINDOW), model_dir)
    e = info.value
    assert isinstance(e.__cause__, ValueError) and e.worst_error is None
    assert "raised ValueError: kv cache full" in str(e) and "\n" not in str(e)
    assert sum(e.chunks) == len(e.tokens) > S + 2 >= e.token_index


def test_import_minillm_does_not_import_hypothesis():
    code = ("import sys, minillm; assert 'hypothesis' not in sys.modules; "
            "import minillm.testing; assert minillm.testing.check_engine; assert 'hypothesis' not in sys.modules; "
            "import minillm.testing.strategies; assert 'hypothesis' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert minillm.testing.strategies.streams is not None


def test_readme_example_runs():
    """The README's "Test your own engine" example, run as written (test_readme runs only console blocks)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Test your own engine", 1)[1].split("\n## ", 1)[0]
    assert len(("## Test your own engine" + section).rstrip("\n").splitlines()) <= 15
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})


def test_an_engine_that_cannot_be_made_is_its_failure(model_dir):
    def make():
        raise OSError("weights not found")

    with pytest.raises(ConformanceError, match="raised OSError: weights not found at token 0") as info:
        check(make, model_dir)
    e = info.value
    assert isinstance(e.__cause__, OSError) and sum(e.chunks) == len(e.tokens) and len(e.chunks) == 1
