"""GPT-NeoX / Pythia: LayerNorm, GELU MLP, partial rotary, (usually) parallel residual."""

from __future__ import annotations

from ...errors import MiniLLMError
from ...core.config import ModelConfig
from ..config import ConfigReader, extensions_to_hf, minillm_extensions, rope_settings

MODEL_TYPES = ("gpt_neox",)

GLOBAL = {
    "embed.weight": "gpt_neox.embed_in.weight",
    "norm.weight": "gpt_neox.final_layer_norm.weight",
    "norm.bias": "gpt_neox.final_layer_norm.bias",
    "lm_head.weight": "embed_out.weight",
}
LAYER = {  # relative to gpt_neox.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "attn_norm.bias": "input_layernorm.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp_norm.bias": "post_attention_layernorm.bias",
    "attn.wqkv.weight": "attention.query_key_value.weight",  # per head: q, k, v ("interleaved")
    "attn.wqkv.bias": "attention.query_key_value.bias",
    "attn.wo.weight": "attention.dense.weight",
    "attn.wo.bias": "attention.dense.bias",
    "mlp.w_in.weight": "mlp.dense_h_to_4h.weight",
    "mlp.w_in.bias": "mlp.dense_h_to_4h.bias",
    "mlp.w_out.weight": "mlp.dense_4h_to_h.weight",
    "mlp.w_out.bias": "mlp.dense_4h_to_h.bias",
}
LAYER_PREFIX = "gpt_neox.layers.{i}."
# Old checkpoints store the causal mask and the rotary table as tensors; both are recomputed here.
IGNORED = (r"gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)",)

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu"}


# The config policy, as data (see minillm/formats/config.py).
PARSED = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "max_position_embeddings", "layer_norm_eps", "use_parallel_residual",
    "attention_bias", "tie_word_embeddings", "rotary_pct", "rotary_emb_base", "rope_theta",
    "rope_parameters", "minillm",
})
REFUSED = frozenset()
NEUTRAL = frozenset()


def weight_map(c: ModelConfig | None = None) -> dict:  # one layout for every GPT-NeoX config
    return {"global": GLOBAL, "layer": LAYER, "layer_prefix": LAYER_PREFIX}


def parse(r: ConfigReader) -> ModelConfig:
    hidden = r.get("hidden_size", required=True, type_=int, ge=1)
    heads = r.get("num_attention_heads", required=True, type_=int, ge=1)
    if hidden % heads:
        raise MiniLLMError(f"{r.where}: hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    act = r.get("hidden_act", "gelu")
    if act not in ACTIVATIONS:
        raise MiniLLMError(f"{r.where}: unsupported option hidden_act={act!r} for gpt_neox")
    theta, factor = rope_settings(r, theta_keys=("rotary_emb_base", "rope_theta"))
    pct = r.get("rotary_pct", None, type_=float, gt=0, le=1)
    key = "partial_rotary_factor" if factor is not None else "rotary_pct"
    if factor is None:
        factor = 1.0 if pct is None else pct
    head_dim = hidden // heads
    rotary_dim = int(head_dim * factor)  # transformers' rounding
    if rotary_dim < 2:
        # transformers then rotates nothing at all; a rotary-free GPT-NeoX is not a model minillm runs.
        raise MiniLLMError(f"{r.where}: unsupported option {key}={factor} (it leaves {rotary_dim} of "
                           f"{head_dim} dims per head rotated; minillm needs at least 2)")
    if rotary_dim % 2:
        raise MiniLLMError(f"{r.where}: unsupported option {key}={factor} (it rotates an odd number of "
                           f"dims, {rotary_dim}, per head)")
    bias = r.get("attention_bias", True, type_=bool)
    return ModelConfig(
        family="gpt_neox",
        vocab_size=r.get("vocab_size", required=True, type_=int, ge=1),
        hidden_size=hidden,
        num_layers=r.get("num_hidden_layers", required=True, type_=int, ge=1),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=r.get("intermediate_size", 4 * hidden, type_=int, ge=1),
        max_position_embeddings=r.get("max_position_embeddings", 2048, type_=int, ge=1),
        norm="layernorm",
        norm_eps=r.get("layer_norm_eps", 1e-5, type_=float, gt=0),
        activation=ACTIVATIONS[act],
        parallel_residual=r.get("use_parallel_residual", True, type_=bool),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=True,
        tie_word_embeddings=r.get("tie_word_embeddings", False, type_=bool),
        qkv_layout="interleaved",
        positions="rope",
        rope_theta=theta,
        rotary_dim=rotary_dim,
        **minillm_extensions(r),
    )


def to_hf(c: ModelConfig) -> dict:
    if c.qkv_bias != c.out_bias or not c.mlp_bias:
        raise MiniLLMError("gpt_neox: this bias layout cannot be saved as gpt_neox")
    act = {v: k for k, v in ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[c.activation]
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "hidden_act": act,
        "max_position_embeddings": c.max_position_embeddings,
        "layer_norm_eps": c.norm_eps,
        "use_parallel_residual": c.parallel_residual,
        "attention_bias": c.qkv_bias,
        "tie_word_embeddings": c.tie_word_embeddings,
        "rotary_pct": c.rotary_dim / c.head_dim,
        "rotary_emb_base": c.rope_theta,
        **extensions_to_hf(c),
    }
