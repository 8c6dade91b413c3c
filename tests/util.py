"""Small helpers for the tests: tiny configs for every family variant, random models, errors."""

from __future__ import annotations

import torch

import minillm

from minillm.core.config import ModelConfig
from minillm.random_init import init_random
from minillm.core.model import Model

# Engine-level configs of every variant the property tests cover (sizes are overridden per test).
VARIANTS: dict[str, dict] = {
    "llama_mha": dict(family="llama", norm="rmsnorm", norm_bias=False, activation="swiglu"),
    "llama_gqa": dict(family="llama", norm="rmsnorm", norm_bias=False, activation="swiglu", kv_div=2),
    "llama_mqa": dict(family="llama", norm="rmsnorm", norm_bias=False, activation="swiglu", kv_div=0),
    "falcon_7b": dict(family="falcon", activation="gelu", parallel_residual=True, shared_norm=True,
                      kv_div=0, qkv_layout="split"),
    "falcon_40b": dict(family="falcon", activation="gelu", parallel_residual=True, kv_div=2,
                       qkv_layout="grouped"),
    "falcon_rw": dict(family="falcon", activation="gelu", positions="alibi", alibi="bloom", qkv_bias=True,
                      out_bias=True, mlp_bias=True, qkv_layout="interleaved"),
    "mpt": dict(family="mpt", activation="gelu", norm_bias=False, positions="alibi", alibi="mpt"),
    "gpt_neox_parallel": dict(family="gpt_neox", activation="gelu", parallel_residual=True, partial=0.25,
                              qkv_bias=True, out_bias=True, mlp_bias=True, qkv_layout="interleaved"),
    "gpt_neox_sequential": dict(family="gpt_neox", activation="gelu", partial=0.5, qkv_bias=True,
                                out_bias=True, mlp_bias=True, qkv_layout="interleaved"),
}


def tiny_config(variant: str, *, heads: int = 4, head_dim: int = 8, layers: int = 2, vocab: int = 61,
                **overrides) -> ModelConfig:
    spec = dict(VARIANTS[variant])
    kv_div = spec.pop("kv_div", 1)  # 1: MHA, 0: one KV head, k: heads // k KV heads
    partial = spec.pop("partial", 1.0)
    kv = heads if kv_div == 1 else (1 if kv_div == 0 else max(1, heads // kv_div))
    while heads % kv:
        kv -= 1
    fields = dict(vocab_size=vocab, hidden_size=heads * head_dim, num_layers=layers, num_heads=heads,
                  num_kv_heads=kv, head_dim=head_dim, intermediate_size=2 * heads * head_dim + 4,
                  max_position_embeddings=256, rotary_dim=max(2, int(head_dim * partial) // 2 * 2))
    fields.update(spec)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_model(config: ModelConfig, dtype=torch.float64, seed: int = 0, std: float = 0.3, fast: bool = True,
                 **fast_options) -> Model:
    """A model with random weights large enough that attention is far from uniform (drawn in
    float32, then cast, so every dtype of a test sees the same weights). `fast`: with the fast
    layer, as `minillm.load` gives it (options: minillm.fast.FastPath's); False: the core alone."""
    model = init_random(Model(config), seed, std, norm_jitter=0.1).to(dtype).eval()
    if fast:
        from minillm.fast import enable

        enable(model, **fast_options)
    return model


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got - want| / max|want|, the project's relative error."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


class Scripted:
    """A stand-in model whose greedy choice follows a script, recording every id it is fed."""

    def __init__(self, vocab: int, script: list[int]):
        self.config = tiny_config("llama_gqa", vocab=vocab)
        self.device = torch.device("cpu")
        self.script = iter(script)
        self.fed: list[int] = []

    def new_cache(self, batch_size=1, sinks=4, window=1020, positions="cache"):
        return minillm.SinkCache(num_layers=1, batch_size=1, num_kv_heads=1, head_dim=2, sinks=sinks,
                                 window=window, dtype=torch.float32, device="cpu", owner_id=0,
                                 keep_raw_sinks=False, positions=positions)

    def __call__(self, ids, cache, logits_to_keep=0):
        self.fed += ids[0].tolist()
        cache.tokens_seen += ids.shape[1]
        logits = torch.zeros(1, ids.shape[1], self.config.vocab_size)
        logits[0, -1, next(self.script)] = 1.0  # scripts end with EOS
        return logits[:, -logits_to_keep:] if logits_to_keep else logits


def wait_for_probe(proc, probe, point: str, seconds: float = 120, poll: float = 0.005) -> None:
    """Wait until the process `proc` reports `point` in its MINILLM_STARTUP_PROBE file `probe`
    (minillm/_probe.py), so a test's signal lands after that point whatever the machine's speed;
    fail if it ends or `seconds` pass first."""
    import time

    deadline = time.monotonic() + seconds
    while not (probe.exists() and point in probe.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, (f"never reported {point!r}", proc.poll())
        time.sleep(poll)
