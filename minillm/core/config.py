"""ModelConfig: what the engine needs to know about a checkpoint, and nothing about its files.

One frozen dataclass for every family, its fields named for what the forward pass does. Reading a
config.json or a GGUF's metadata into one is `minillm/formats/`; this module parses nothing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..errors import MiniLLMError


@dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" | "falcon" | "mpt" | "gpt_neox"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int  # the trained context; streaming warns past it

    # Block layout.
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm with a bias (MPT's no_bias drops it)
    activation: str = "gelu"  # "swiglu" | "gelu" | "gelu_tanh" | "relu" | "silu"
    parallel_residual: bool = False  # x + attn(.) + mlp(.) instead of two sequential residuals
    shared_norm: bool = False  # parallel block whose attention and MLP read one norm (Falcon-7B)
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # How the checkpoint stores a fused QKV projection: "split" ([q; k; v] blocks), "interleaved"
    # (q, k, v per head: GPT-NeoX, old Falcon) or "grouped" (q..., k, v per KV group: Falcon-40B).
    # Only loading and saving read it; the engine always holds [q; k; v].
    qkv_layout: str = "split"

    # Positions.
    positions: str = "rope"  # "rope" | "alibi"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # rotated dims per head (partial rotary); None means head_dim
    alibi: str = ""  # "mpt" (distance to the query) | "bloom" (Falcon: slope x key position)
    alibi_bias_max: float = 8.0
    learned_pos_emb: bool = False  # MPT `wpe`: absolute positions, cannot stream past max

    # Attention details.
    softmax_scale: float | None = None  # None means 1/sqrt(head_dim)
    clip_qkv: float | None = None
    logit_scale: float | None = None

    # minillm extensions (the paper's section 3.3), stored under "minillm" in config.json.
    sink_token_id: int | None = None  # a learnable sink token prepended to every stream
    zero_sink: bool = False  # SoftMax-off-by-one: an implicit key with zero score and value

    def __post_init__(self) -> None:
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise MiniLLMError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise MiniLLMError(f"config: num_heads={self.num_heads} is not a multiple of "
                               f"num_kv_heads={self.num_kv_heads}")
        if self.positions == "rope" and (not isinstance(self.rotary_dim, int) or self.rotary_dim < 2
                                         or self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise MiniLLMError(f"config: rotary_dim={self.rotary_dim} must be even, >= 2 and "
                               f"<= head_dim={self.head_dim}")
        positive = {"norm_eps": self.norm_eps, "rope_theta": self.rope_theta,
                    "alibi_bias_max": self.alibi_bias_max, "softmax_scale": self.softmax_scale,
                    "clip_qkv": self.clip_qkv, "logit_scale": self.logit_scale}
        for name, value in positive.items():
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise MiniLLMError(f"config: {name} must be a finite number > 0, got {value!r}")

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
