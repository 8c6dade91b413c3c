"""MPT: LayerNorm (optionally without bias), GELU MLP, ALiBi, tied embeddings.

Options follow MosaicML's own definitions: `alibi_bias_max`, `clip_qkv`, `softmax_scale`,
`no_bias`, `expansion_ratio`, `logit_scale` and `norm_type`. transformers' port honours only some
of them; the tests check the rest against hand-computed references.
"""

from __future__ import annotations

from ...errors import MiniLLMError
from ...core.config import ModelConfig
from ..config import MAX_SIZE, NEUTRAL_KEYS, ConfigReader, extensions_to_hf, minillm_extensions

MODEL_TYPES = ("mpt",)

GLOBAL = {
    "embed.weight": "transformer.wte.weight",
    "wpe.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.norm_f.weight",
    "norm.bias": "transformer.norm_f.bias",
    "lm_head.weight": "lm_head.weight",
}
LAYER = {  # relative to transformer.blocks.{i}.
    "attn_norm.weight": "norm_1.weight",
    "attn_norm.bias": "norm_1.bias",
    "mlp_norm.weight": "norm_2.weight",
    "mlp_norm.bias": "norm_2.bias",
    "attn.wqkv.weight": "attn.Wqkv.weight",
    "attn.wqkv.bias": "attn.Wqkv.bias",
    "attn.wo.weight": "attn.out_proj.weight",
    "attn.wo.bias": "attn.out_proj.bias",
    "mlp.w_in.weight": "ffn.up_proj.weight",
    "mlp.w_in.bias": "ffn.up_proj.bias",
    "mlp.w_out.weight": "ffn.down_proj.weight",
    "mlp.w_out.bias": "ffn.down_proj.bias",
}
LAYER_PREFIX = "transformer.blocks.{i}."
IGNORED = ()
WPE = "transformer.wpe.weight"

# The config policy, as data (see minillm/formats/config.py); ATTN_* for the nested attn_config block.
PARSED = frozenset({
    "d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size",
    "layer_norm_epsilon", "learned_pos_emb", "attn_config", "logit_scale", "no_bias", "norm_type",
    "tie_word_embeddings", "ffn_config", "minillm",
})
REFUSED = frozenset({"use_pad_tok_in_ffn"})
# embedding_fraction scales only the gradient through the embedding; the forward value is unchanged.
NEUTRAL = frozenset({"embedding_fraction"})
ATTN_PARSED = frozenset({"alibi_bias_max", "clip_qkv", "softmax_scale"})
ATTN_REFUSED = frozenset({"qk_ln", "attn_type", "prefix_lm", "attn_uses_sequence_id", "rope",
                          "sliding_window_size", "alibi"})
ATTN_NEUTRAL = frozenset({"attn_impl", "attn_pdrop"})


def weight_map(c: ModelConfig | None = None) -> dict:  # one layout for every MPT config
    return {"global": GLOBAL, "layer": LAYER, "layer_prefix": LAYER_PREFIX}


def _attn_config(r: ConfigReader) -> dict:
    attn = r.get("attn_config", {})
    if not isinstance(attn, dict):
        raise MiniLLMError(f"{r.where}: 'attn_config' must be an object")
    # Unknown keys inside attn_config are refused even when not strict: every MosaicML attention
    # option changes the attention, so there is no neutral unknown.
    sub = ConfigReader(attn, "mpt", f"{r.where} attn_config", keys=ATTN_PARSED | ATTN_REFUSED,
                       neutral=ATTN_NEUTRAL, strict="every attn_config option changes the attention")
    sub.refuse_unless("qk_ln", False)
    sub.refuse_unless("attn_type", "multihead_attention")
    sub.refuse_unless("prefix_lm", False)
    sub.refuse_unless("attn_uses_sequence_id", False)
    sub.refuse_unless("rope", False)
    sub.refuse_unless("sliding_window_size", -1)
    sub.refuse_unless("alibi", True)
    out = {
        "alibi_bias_max": sub.get("alibi_bias_max", 8.0, type_=float, gt=0),
        "clip_qkv": sub.get("clip_qkv", None, type_=float, gt=0),
        "softmax_scale": sub.get("softmax_scale", None, type_=float, gt=0),
    }
    sub.finish()  # boilerplate that transformers nests in sub-configs is in NEUTRAL_KEYS
    return out


def parse(r: ConfigReader) -> ModelConfig:
    d_model = r.get("d_model", required=True, type_=int, ge=1)
    heads = r.get("n_heads", required=True, type_=int, ge=1)
    if d_model % heads:
        raise MiniLLMError(f"{r.where}: d_model={d_model} is not a multiple of n_heads={heads}")
    attn = _attn_config(r)
    ratio = r.get("expansion_ratio", 4, type_=float, gt=0)
    norm_type = r.get("norm_type", "low_precision_layernorm")
    if norm_type not in ("low_precision_layernorm", "layernorm"):
        raise MiniLLMError(f"{r.where}: unsupported option norm_type={norm_type!r} for mpt")
    logit_scale = r.get("logit_scale")
    if logit_scale == "inv_sqrt_d_model":
        logit_scale = d_model ** -0.5
    elif logit_scale is not None and (isinstance(logit_scale, bool) or not isinstance(logit_scale, (int, float))):
        raise MiniLLMError(f"{r.where}: unsupported option logit_scale={logit_scale!r} for mpt")
    elif logit_scale is not None:
        r._checked("logit_scale", logit_scale, float, 0, None, None)
    ffn = r.get("ffn_config")
    if ffn is not None and (not isinstance(ffn, dict) or ffn.get("ffn_type", "mptmlp") != "mptmlp"
                            or set(ffn) - {"ffn_type", "fc_type"} - NEUTRAL_KEYS):
        raise MiniLLMError(f"{r.where}: unsupported option ffn_config={ffn!r} for mpt")
    r.refuse_unless("use_pad_tok_in_ffn", True, False)
    no_bias = r.get("no_bias", True, type_=bool)
    if ratio * d_model > MAX_SIZE:
        raise MiniLLMError(f"{r.where}: expansion_ratio={ratio:g} x d_model={d_model} is out of range (at most "
                           f"{MAX_SIZE})")
    return ModelConfig(
        family="mpt",
        vocab_size=r.get("vocab_size", required=True, type_=int, ge=1),
        hidden_size=d_model,
        num_layers=r.get("n_layers", required=True, type_=int, ge=1),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d_model // heads,
        intermediate_size=int(ratio * d_model),
        max_position_embeddings=r.get("max_seq_len", 2048, type_=int, ge=1),
        norm="layernorm",
        norm_eps=r.get("layer_norm_epsilon", 1e-5, type_=float, gt=0),
        norm_bias=not no_bias,
        activation="gelu",
        qkv_bias=not no_bias,
        out_bias=not no_bias,
        mlp_bias=not no_bias,
        tie_word_embeddings=r.get("tie_word_embeddings", True, type_=bool),
        positions="alibi",
        alibi="mpt",
        alibi_bias_max=attn["alibi_bias_max"],
        # Whether `wpe` exists is decided by the checkpoint's tensors, not this flag (see the loader).
        learned_pos_emb=r.get("learned_pos_emb", True, type_=bool),
        softmax_scale=attn["softmax_scale"],
        clip_qkv=attn["clip_qkv"],
        logit_scale=None if logit_scale is None else float(logit_scale),
        **minillm_extensions(r),
    )


def adjust_to_checkpoint(c: ModelConfig, tensor_names: set[str]) -> ModelConfig:
    """MosaicML adds `wpe` when learned_pos_emb is true; transformers' port never does. The tensors decide."""
    return c.replace(learned_pos_emb=WPE in tensor_names)


def to_hf(c: ModelConfig) -> dict:
    if not (c.qkv_bias == c.out_bias == c.mlp_bias == c.norm_bias):
        raise MiniLLMError("mpt: one 'no_bias' flag covers every layer")
    ratio = c.intermediate_size / c.hidden_size
    return {
        "architectures": ["MPTForCausalLM"],
        "model_type": "mpt",
        "vocab_size": c.vocab_size,
        "d_model": c.hidden_size,
        "n_heads": c.num_heads,
        "n_layers": c.num_layers,
        "expansion_ratio": int(ratio) if ratio == int(ratio) else ratio,
        "max_seq_len": c.max_position_embeddings,
        "layer_norm_epsilon": c.norm_eps,
        "learned_pos_emb": c.learned_pos_emb,
        "no_bias": not c.qkv_bias,
        "norm_type": "low_precision_layernorm",
        "logit_scale": c.logit_scale,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attn_config": {
            "alibi": True,
            # transformers' MptAttentionConfig insists on an int here
            "alibi_bias_max": int(c.alibi_bias_max) if c.alibi_bias_max == int(c.alibi_bias_max) else c.alibi_bias_max,
            "clip_qkv": c.clip_qkv,
            "softmax_scale": c.softmax_scale,
            "attn_type": "multihead_attention",
            "qk_ln": False,
            "prefix_lm": False,
            "attn_uses_sequence_id": False,
        },
        **extensions_to_hf(c),
    }
