"""ModelConfig: the engine's view of a checkpoint's `config.json`.

One small frozen dataclass describes every family. Its fields name what the forward pass does
(norm type, residual layout, positions, biases), not what a family's config happens to call it.
Each family file in `minillm/models/` turns its own `config.json` shapes into a ModelConfig, and
back again for saving.

Strictness: a key that could change the forward pass is either understood or refused by name.
Keys that cannot change the forward pass (ids, dtypes, dropout, bookkeeping) are ignored. Any
other key is refused too, so a new option is never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MiniLLMError


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
    rotary_dim: int = 0  # rotated dims per head (partial rotary); 0 means head_dim
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
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise MiniLLMError(f"config: {name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise MiniLLMError(f"config: num_heads={self.num_heads} is not a multiple of "
                               f"num_kv_heads={self.num_kv_heads}")
        if self.positions == "rope" and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise MiniLLMError(f"config: rotary_dim={self.rotary_dim} must be even and "
                               f"<= head_dim={self.head_dim}")

    @property
    def scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Keys that cannot change the forward pass, in any family. They are read past, never refused.
IGNORED_KEYS = frozenset({
    "_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype",
    "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id",
    "decoder_start_token_id", "id2label", "label2id", "problem_type", "initializer_range",
    "use_cache", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "is_encoder_decoder", "is_decoder", "chunk_size_feed_forward", "tokenizer_class",
    "tokenizer_name", "task_specific_params", "finetuning_task", "prefix", "init_device",
    "init_config", "verbose", "attention_dropout", "hidden_dropout", "resid_pdrop", "emb_pdrop",
    "attn_pdrop", "embd_pdrop", "classifier_dropout", "pretraining_tp", "attn_impl",
    "_attn_implementation", "_attn_implementation_autoset", "max_new_tokens", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "tf_legacy_loss",
    "use_bfloat16", "_commit_hash", "quantization_config_null", "layer_types", "use_return_dict",
})


class ConfigReader:
    """Reads a config dict, remembering which keys were consumed, so that `finish` can refuse the rest."""

    def __init__(self, data: dict, family: str, where: str = "config.json"):
        if not isinstance(data, dict):
            raise MiniLLMError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data = data
        self.family = family
        self.where = where
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, default: Any = None, *, required: bool = False, type_=None) -> Any:
        self.used.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                raise MiniLLMError(f"{self.where}: missing required key '{key}' for model_type "
                                   f"'{self.family}'")
            return default
        if type_ is not None:
            ok = isinstance(value, type_) and not (type_ in (int, float) and isinstance(value, bool))
            if type_ is float and isinstance(value, int) and not isinstance(value, bool):
                ok, value = True, float(value)
            if not ok:
                raise MiniLLMError(f"{self.where}: '{key}' must be {type_.__name__}, got {value!r}")
        return value

    def first(self, *keys: str, default: Any = None, required: bool = False, type_=None) -> Any:
        """The first of several alias keys that is present (for example n_head / num_attention_heads)."""
        for key in keys:
            self.used.add(key)
        for key in keys:
            if self.data.get(key) is not None:
                return self.get(key, type_=type_)
        if required:
            raise MiniLLMError(f"{self.where}: missing required key '{keys[0]}' for model_type "
                               f"'{self.family}'")
        return default

    def refuse_unless(self, key: str, *allowed: Any) -> None:
        """Refuse an unsupported option by name when it has a non-default value."""
        self.used.add(key)
        if key in self.data and self.data[key] not in allowed:
            raise MiniLLMError(f"{self.where}: unsupported option {key}={self.data[key]!r} for "
                               f"model_type '{self.family}' (minillm supports {allowed[0]!r})")

    def ignore(self, *keys: str) -> None:
        self.used.update(keys)

    def finish(self) -> None:
        unknown = sorted(k for k in self.data if k not in self.used and k not in IGNORED_KEYS)
        if unknown:
            raise MiniLLMError(f"{self.where}: unsupported config key '{unknown[0]}' for model_type "
                               f"'{self.family}'" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))


def rope_settings(r: ConfigReader, *, theta_keys=("rope_theta",), default_theta: float = 10000.0):
    """(rope_theta, partial_rotary_factor or None) from the classic keys or transformers 5's rope_parameters.

    A rope_scaling block, or any rope_type other than 'default', changes the positions and is refused.
    """
    scaling = r.get("rope_scaling")
    if scaling is not None:
        raise MiniLLMError(f"{r.where}: unsupported option rope_scaling={scaling!r} (minillm supports "
                           "only unscaled RoPE; positions are cache-relative instead)")
    theta = r.first(*theta_keys, default=None, type_=float)
    factor = None
    params = r.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise MiniLLMError(f"{r.where}: 'rope_parameters' must be an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise MiniLLMError(f"{r.where}: unsupported option rope_type={rope_type!r} (minillm supports "
                               "only 'default')")
        for key in params:
            if key not in ("rope_type", "type", "rope_theta", "partial_rotary_factor"):
                raise MiniLLMError(f"{r.where}: unsupported key rope_parameters.{key}")
        if params.get("rope_theta") is not None:
            theta = float(params["rope_theta"])
        if params.get("partial_rotary_factor") is not None:
            factor = float(params["partial_rotary_factor"])
    return (default_theta if theta is None else theta), factor


def minillm_extensions(r: ConfigReader) -> dict:
    """The `minillm` block: sink_token_id and zero_sink (SoftMax-off-by-one)."""
    ext = r.get("minillm", {})
    if not isinstance(ext, dict):
        raise MiniLLMError(f"{r.where}: 'minillm' must be an object, got {ext!r}")
    out = {}
    for key, value in ext.items():
        if key == "sink_token_id":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MiniLLMError(f"{r.where}: minillm.sink_token_id must be a token id, got {value!r}")
            out["sink_token_id"] = value
        elif key == "zero_sink":
            if not isinstance(value, bool):
                raise MiniLLMError(f"{r.where}: minillm.zero_sink must be true or false, got {value!r}")
            out["zero_sink"] = value
        elif key != "note":
            raise MiniLLMError(f"{r.where}: unsupported key minillm.{key}")
    return out


def extensions_to_hf(c: ModelConfig) -> dict:
    ext: dict[str, Any] = {}
    if c.sink_token_id is not None:
        ext["sink_token_id"] = c.sink_token_id
    if c.zero_sink:
        ext["zero_sink"] = True
        ext["note"] = ("minillm extension: SoftMax-off-by-one. Other engines ignore this flag and "
                       "will compute the wrong attention.")
    return {"minillm": ext} if ext else {}


def from_hf_config(data: dict, where: str = "config.json") -> ModelConfig:
    """Parse a `config.json` dict, dispatching on `model_type`."""
    from .models import FAMILIES, family_for_model_type

    if not isinstance(data, dict):
        raise MiniLLMError(f"{where}: expected a JSON object")
    model_type = data.get("model_type")
    if model_type is None:
        raise MiniLLMError(f"{where}: missing 'model_type'")
    family = family_for_model_type(model_type)
    if family is None:
        raise MiniLLMError(f"{where}: unknown model_type '{model_type}' (supported: "
                           f"{', '.join(sorted(FAMILIES))}, RefinedWeb, RefinedWebModel)")
    reader = ConfigReader(data, str(model_type), where)
    config = family.parse(reader)
    reader.finish()
    return config


def to_hf_config(config: ModelConfig) -> dict:
    """The `config.json` dict a family's own code (and transformers) would read."""
    from .models import FAMILIES

    return FAMILIES[config.family].to_hf(config)


def load_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise MiniLLMError(f"config.json not found in {directory}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MiniLLMError(f"{path}: invalid JSON ({e})") from None
    return from_hf_config(data, where=str(path))
