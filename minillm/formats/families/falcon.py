"""Falcon: the 7B layout (multi-query, parallel attention, one shared LayerNorm), the 40B "new
decoder" layout (grouped KV heads, two LayerNorms), and the falcon-rw ALiBi variant.

Falcon's fused QKV is stored three ways, recorded in `qkv_layout`:
- new decoder: per KV group, the group's query heads then one key and one value ("grouped");
- multi-query: all query heads, then the key, then the value ("split");
- otherwise: per head, query, key, value ("interleaved").
"""

from __future__ import annotations

from ...errors import MiniLLMError
from ...core.config import ModelConfig
from ..config import ConfigReader, extensions_to_hf, minillm_extensions, rope_settings

MODEL_TYPES = ("falcon", "RefinedWeb", "RefinedWebModel")

GLOBAL = {
    "embed.weight": "transformer.word_embeddings.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "lm_head.weight": "lm_head.weight",
}
LAYER = {  # relative to transformer.h.{i}.; the norm names depend on the layout (see weight_map)
    "attn.wqkv.weight": "self_attention.query_key_value.weight",
    "attn.wqkv.bias": "self_attention.query_key_value.bias",
    "attn.wo.weight": "self_attention.dense.weight",
    "attn.wo.bias": "self_attention.dense.bias",
    "mlp.w_in.weight": "mlp.dense_h_to_4h.weight",
    "mlp.w_in.bias": "mlp.dense_h_to_4h.bias",
    "mlp.w_out.weight": "mlp.dense_4h_to_h.weight",
    "mlp.w_out.bias": "mlp.dense_4h_to_h.bias",
}
NORMS = {  # (attention norm, MLP norm) per block layout
    "two_norms": ("ln_attn", "ln_mlp"),  # new decoder, num_ln_in_parallel_attn = 2
    "shared": ("input_layernorm", None),  # parallel attention reading one norm
    "sequential": ("input_layernorm", "post_attention_layernorm"),
}
LAYER_PREFIX = "transformer.h.{i}."
IGNORED = (r"transformer\.h\.\d+\.self_attention\.(rotary_emb\.inv_freq|maybe_rotary\.inv_freq)",)


# The config policy, as data (see minillm/formats/config.py).
PARSED = frozenset({
    "model_type", "vocab_size", "hidden_size", "num_attention_heads", "n_head", "num_hidden_layers",
    "n_layer", "num_kv_heads", "n_head_kv", "new_decoder_architecture", "multi_query", "parallel_attn",
    "num_ln_in_parallel_attn", "activation", "alibi", "bias", "ffn_hidden_size",
    "max_position_embeddings", "layer_norm_epsilon", "tie_word_embeddings", "rope_theta",
    "rope_parameters", "minillm",
})
REFUSED = frozenset({"apply_residual_connection_post_layernorm"})
NEUTRAL = frozenset()


def _norm_layout(c: ModelConfig) -> str:
    if not c.parallel_residual:
        return "sequential"
    return "shared" if c.shared_norm else "two_norms"


def weight_map(c: ModelConfig) -> dict:
    attn_norm, mlp_norm = NORMS[_norm_layout(c)]
    layer = dict(LAYER)
    for ours, theirs in (("attn_norm", attn_norm), ("mlp_norm", mlp_norm)):
        if theirs:
            layer[f"{ours}.weight"] = f"{theirs}.weight"
            layer[f"{ours}.bias"] = f"{theirs}.bias"
    return {"global": GLOBAL, "layer": layer, "layer_prefix": LAYER_PREFIX}


def parse(r: ConfigReader) -> ModelConfig:
    legacy = r.get("model_type")
    hidden = r.get("hidden_size", required=True, type_=int, ge=1)
    heads = r.first("num_attention_heads", "n_head", required=True, type_=int, ge=1)
    if hidden % heads:
        raise MiniLLMError(f"{r.where}: hidden_size={hidden} is not a multiple of the {heads} heads")
    if legacy == "RefinedWeb":  # Falcon-40B's original config: always the new decoder layout
        new_decoder = True
        r.ignore("new_decoder_architecture")
        kv = r.first("n_head_kv", "num_kv_heads", required=True, type_=int, ge=1)
        multi_query = False
        r.ignore("multi_query")
    else:
        default_mq = legacy == "falcon"  # transformers' FalconConfig defaults to multi_query=True
        new_decoder = r.get("new_decoder_architecture", False, type_=bool)
        multi_query = r.get("multi_query", default_mq, type_=bool)
        kv_key = r.first("num_kv_heads", "n_head_kv", default=heads, type_=int, ge=1)
        kv = kv_key if new_decoder else (1 if multi_query else heads)
    parallel = r.get("parallel_attn", True, type_=bool)
    n_ln = r.get("num_ln_in_parallel_attn", None, type_=int)
    if new_decoder:
        if not parallel:
            raise MiniLLMError(f"{r.where}: unsupported option parallel_attn=false with "
                               "new_decoder_architecture=true")
        n_ln = 2 if n_ln is None else n_ln
        if n_ln not in (1, 2):
            raise MiniLLMError(f"{r.where}: unsupported option num_ln_in_parallel_attn={n_ln}")
        shared = n_ln == 1
    else:
        shared = parallel  # the old layout: one norm feeds both branches
    r.refuse_unless("apply_residual_connection_post_layernorm", False)
    act = r.get("activation", "gelu")
    if act != "gelu":
        raise MiniLLMError(f"{r.where}: unsupported option activation={act!r} for falcon")
    alibi = r.get("alibi", False, type_=bool)
    theta, factor = rope_settings(r)
    if factor not in (None, 1.0):
        raise MiniLLMError(f"{r.where}: unsupported option partial_rotary_factor={factor} for falcon")
    if not alibi and (hidden // heads) % 2:
        raise MiniLLMError(f"{r.where}: hidden_size={hidden} / {heads} heads gives an odd head size, "
                           f"{hidden // heads}; RoPE rotates pairs of dimensions")
    if heads % kv:
        raise MiniLLMError(f"{r.where}: the {heads} attention heads are not a multiple of the {kv} KV heads")
    bias = r.get("bias", False, type_=bool)
    return ModelConfig(
        family="falcon",
        vocab_size=r.get("vocab_size", required=True, type_=int, ge=1),
        hidden_size=hidden,
        num_layers=r.first("num_hidden_layers", "n_layer", required=True, type_=int, ge=1),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        intermediate_size=r.get("ffn_hidden_size", 4 * hidden, type_=int, ge=1),
        max_position_embeddings=r.get("max_position_embeddings", 2048, type_=int, ge=1),
        norm="layernorm",
        norm_eps=r.get("layer_norm_epsilon", 1e-5, type_=float, gt=0),
        activation="gelu",
        parallel_residual=parallel,
        shared_norm=shared,
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=r.get("tie_word_embeddings", True, type_=bool),
        qkv_layout="grouped" if new_decoder else ("split" if multi_query else "interleaved"),
        positions="alibi" if alibi else "rope",
        alibi="bloom" if alibi else "",
        rope_theta=theta,
        **minillm_extensions(r),
    )


def to_hf(c: ModelConfig) -> dict:
    new_decoder = c.qkv_layout == "grouped"
    multi_query = c.qkv_layout == "split"
    if (multi_query and c.num_kv_heads != 1) or (c.qkv_layout == "interleaved" and c.num_kv_heads != c.num_heads):
        raise MiniLLMError(f"falcon: {c.num_kv_heads} KV heads cannot be stored in the "
                           f"'{c.qkv_layout}' layout")
    if not (c.qkv_bias == c.out_bias == c.mlp_bias):
        raise MiniLLMError("falcon: one 'bias' flag covers every linear layer")
    out = {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "new_decoder_architecture": new_decoder,
        "multi_query": multi_query,
        "parallel_attn": c.parallel_residual,
        "bias": c.qkv_bias,
        "alibi": c.positions == "alibi",
        "ffn_hidden_size": c.intermediate_size,
        "activation": "gelu",
        "layer_norm_epsilon": c.norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        **extensions_to_hf(c),
    }
    if new_decoder:
        out["num_ln_in_parallel_attn"] = 1 if c.shared_norm else 2
    return out
