"""Llama / Llama-2: RMSNorm, SwiGLU, RoPE, grouped-query attention."""

from __future__ import annotations

from ...errors import MiniLLMError
from ...core.config import ModelConfig
from ..config import ConfigReader, extensions_to_hf, minillm_extensions, rope_settings

MODEL_TYPES = ("llama",)

GLOBAL = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LAYER = {  # relative to model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.wqkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.wqkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.wo.bias": "self_attn.o_proj.bias",
    "mlp.w_in.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.w_in.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.w_out.weight": "mlp.down_proj.weight",
    "mlp.w_out.bias": "mlp.down_proj.bias",
}
LAYER_PREFIX = "model.layers.{i}."
IGNORED = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


# The config policy, as data (see minillm/formats/config.py).
PARSED = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "attention_bias", "mlp_bias", "tie_word_embeddings", "rope_theta",
    "rope_parameters", "minillm",
})
REFUSED = frozenset()
NEUTRAL = frozenset()


def weight_map(c: ModelConfig | None = None) -> dict:  # one layout for every Llama config
    return {"global": GLOBAL, "layer": LAYER, "layer_prefix": LAYER_PREFIX}


def parse(r: ConfigReader) -> ModelConfig:
    hidden = r.get("hidden_size", required=True, type_=int, ge=1)
    heads = r.get("num_attention_heads", required=True, type_=int, ge=1)
    act = r.get("hidden_act", "silu")
    if act != "silu":
        raise MiniLLMError(f"{r.where}: unsupported option hidden_act={act!r} for llama (needs 'silu')")
    theta, factor = rope_settings(r)
    if factor not in (None, 1.0):
        raise MiniLLMError(f"{r.where}: unsupported option partial_rotary_factor={factor} for llama")
    kv = r.get("num_key_value_heads", heads, type_=int, ge=1)
    if heads % kv:
        raise MiniLLMError(f"{r.where}: 'num_attention_heads' = {heads} is not a multiple of "
                           f"'num_key_value_heads' = {kv}")
    head_dim = r.get("head_dim", None, type_=int, ge=1)
    if head_dim is None:  # the default, hidden_size / num_attention_heads, must be a whole number
        if hidden % heads:
            raise MiniLLMError(f"{r.where}: 'hidden_size' = {hidden} is not divisible by 'num_attention_heads' = "
                               f"{heads} (and no 'head_dim' is given)")
        head_dim = hidden // heads
        if head_dim % 2:
            raise MiniLLMError(f"{r.where}: 'hidden_size' = {hidden} / 'num_attention_heads' = {heads} gives an odd "
                               f"head size, {head_dim}; RoPE rotates pairs of dimensions")
    elif head_dim % 2:
        raise MiniLLMError(f"{r.where}: 'head_dim' = {head_dim} is odd; RoPE rotates pairs of dimensions")
    return ModelConfig(
        family="llama",
        vocab_size=r.get("vocab_size", required=True, type_=int, ge=1),
        hidden_size=hidden,
        num_layers=r.get("num_hidden_layers", required=True, type_=int, ge=1),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=r.get("intermediate_size", required=True, type_=int, ge=1),
        max_position_embeddings=r.get("max_position_embeddings", 2048, type_=int, ge=1),
        norm="rmsnorm",
        norm_eps=r.get("rms_norm_eps", 1e-6, type_=float, gt=0),
        norm_bias=False,
        activation="swiglu",
        qkv_bias=r.get("attention_bias", False, type_=bool),
        out_bias=r.get("attention_bias", False, type_=bool),
        mlp_bias=r.get("mlp_bias", False, type_=bool),
        tie_word_embeddings=r.get("tie_word_embeddings", False, type_=bool),
        positions="rope",
        rope_theta=theta,
        **minillm_extensions(r),
    )


def to_hf(c: ModelConfig) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.qkv_bias,
        "mlp_bias": c.mlp_bias,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        **extensions_to_hf(c),
    }
