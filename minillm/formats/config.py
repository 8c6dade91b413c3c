"""Reading a checkpoint's `config.json`: the key policy, and the helpers every family shares.

Each family file in `minillm/formats/families/` turns its own `config.json` shapes into a
ModelConfig (minillm/core/config.py, the engine's dataclass), and back again for saving.

The policy for keys, checkable as data (tests/test_config.py enumerates transformers' own config
parameters against it):
- a key a family parses (its `PARSED`) is type- and range-checked where it is read;
- a key that changes the forward pass and is not implemented (`REFUSED_KEYS`, a family's
  `REFUSED`) is refused by name whenever it holds a non-neutral value, strict or not;
- a key that cannot change the forward pass (`NEUTRAL_KEYS`, a family's `NEUTRAL`) is read past;
- any other key gets one ConfigWarning naming it per load, and the load goes on; with
  `strict=True` (the CLI's --strict-config) it is an error instead.

The dispatch on `model_type` lives in `minillm/formats/families/__init__.py`; this module imports no family.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..errors import MiniLLMError
from ..core.config import ModelConfig


class ConfigWarning(UserWarning):
    """A config key minillm does not know: read past, and named once per load (an error if strict)."""


# Keys that cannot change the forward pass, in any family: ids, dtypes, dropout, bookkeeping, and
# what the tools that trained or converted a checkpoint write beside the model (nanotron's
# `is_llama_config`, transformers' GGUF conversion's `_model_name_or_path` and `unk_token_id`,
# transformers.js's block). They are read past, never refused and never warned about.
NEUTRAL_KEYS = frozenset({
    "_name_or_path", "_model_name_or_path", "architectures", "auto_map", "transformers_version",
    "torch_dtype", "dtype", "model_type", "bos_token_id", "eos_token_id", "pad_token_id",
    "unk_token_id", "sep_token_id", "decoder_start_token_id", "id2label", "label2id",
    "problem_type", "initializer_range", "use_cache", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "is_encoder_decoder", "is_decoder",
    "chunk_size_feed_forward", "tokenizer_class", "tokenizer_name", "task_specific_params",
    "finetuning_task", "prefix", "init_device", "init_config", "verbose", "attention_dropout",
    "hidden_dropout", "resid_pdrop", "emb_pdrop", "attn_pdrop", "embd_pdrop",
    "classifier_dropout", "attn_impl", "_attn_implementation", "_attn_implementation_autoset",
    "max_new_tokens", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "pruned_heads", "tf_legacy_loss", "use_bfloat16", "_commit_hash",
    "use_return_dict", "is_llama_config", "transformers.js_config",
    # Llama-1/2's tensor-parallel degree at pretraining: transformers <= 4.x split the same
    # matmuls into that many slices; the sum is the same function.
    "pretraining_tp",
})

# Keys that change the forward pass in a way minillm does not compute. Whenever one holds a value
# other than its neutral ones it is refused by name, strict or not: never ignored, never a warning.
REFUSED_KEYS: dict[str, tuple] = {
    "rope_scaling": (None,),  # scaled RoPE (linear, dynamic, YaRN, llama3): other angles
    "rope_interleaved": (None, False),  # nanotron's GPT-J-style pairs (2i, 2i+1); minillm rotates halves
    "quantization_config": (None,),  # quantized weights are read only from GGUF files, dequantized
    "sliding_window": (None,),  # a model trained with its own window mask
    "use_sliding_window": (None, False),
    "attention_chunk_size": (None,),  # chunked local attention (Llama-4)
    "layer_types": (),  # allowed only as a list of "full_attention" (see check_refused)
}


def _unscaled(scaling) -> bool:
    """A rope_scaling block that scales nothing: rope_type "default", or linear with factor 1."""
    if not isinstance(scaling, dict):
        return False
    kind = scaling.get("rope_type", scaling.get("type"))
    rest = {k: v for k, v in scaling.items() if k not in ("rope_type", "type", "rope_theta")}
    return (kind == "default" and not rest) or (kind == "linear" and rest == {"factor": 1.0})


# Sizes beyond this are not a model that fits anywhere; refusing them here keeps the error a
# sentence rather than an overflow deep inside torch.
MAX_SIZE = 2**31 - 1


class ConfigReader:
    """Reads a config dict, remembering which keys were consumed, so `finish` can name the rest.

    `keys` is the set of keys the family declares that it reads or refuses (its PARSED | REFUSED):
    reading any other key is a bug in minillm, caught here, so those declarations stay true and the
    test that enumerates transformers' config parameters checks the real policy.
    """

    def __init__(self, data: dict, family: str, where: str = "config.json", *,
                 keys: frozenset[str] | None = None, neutral: frozenset[str] = frozenset(),
                 strict: bool | str = False):
        # strict: True (the user asked), or a reason why unknown keys here are always errors.
        if not isinstance(data, dict):
            raise MiniLLMError(f"{where}: expected a JSON object, got {type(data).__name__}")
        self.data = data
        self.family = family
        self.where = where
        self.keys = keys
        self.neutral = NEUTRAL_KEYS | neutral
        self.strict = strict
        self.used: set[str] = set()

    def _use(self, key: str) -> None:
        if self.keys is not None and key not in self.keys:
            raise AssertionError(f"minillm bug: {self.family} reads {key!r} without declaring it")
        self.used.add(key)

    def get(self, key: str, default: Any = None, *, required: bool = False, type_=None,
            gt: float | None = None, ge: float | None = None, le: float | None = None) -> Any:
        """The value of `key` (or `default` when absent or null), type- and range-checked.

        Floats must be finite. `gt`/`ge`/`le` bound numbers; the error names the key and value."""
        self._use(key)
        value = self.data.get(key)
        if value is None:
            if required:
                raise MiniLLMError(f"{self.where}: missing required key '{key}' for model_type "
                                   f"'{self.family}'")
            return default
        return self._checked(key, value, type_, gt, ge, le)

    def _checked(self, key, value, type_, gt, ge, le):
        if type_ is not None:
            ok = isinstance(value, type_) and not (type_ in (int, float) and isinstance(value, bool))
            if type_ is float and isinstance(value, int) and not isinstance(value, bool):
                try:
                    ok, value = True, float(value)
                except OverflowError:
                    raise MiniLLMError(f"{self.where}: '{key}' must be a finite number, got an integer of "
                                       f"{len(str(value))} digits") from None
            if not ok:
                raise MiniLLMError(f"{self.where}: '{key}' must be {type_.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise MiniLLMError(f"{self.where}: '{key}' must be a finite number, got {value!r}")
        if type_ is int and abs(value) > MAX_SIZE:
            raise MiniLLMError(f"{self.where}: '{key}' = {value} is out of range (at most {MAX_SIZE})")
        for bound, holds, word in ((gt, lambda v, b: v > b, ">"), (ge, lambda v, b: v >= b, ">="),
                                   (le, lambda v, b: v <= b, "<=")):
            if bound is not None and not holds(value, bound):
                raise MiniLLMError(f"{self.where}: '{key}' must be {word} {bound:g}, got {value!r}")
        return value

    def first(self, *keys: str, default: Any = None, required: bool = False, type_=None,
              gt: float | None = None, ge: float | None = None) -> Any:
        """The first of several alias keys that is present (for example n_head / num_attention_heads)."""
        for key in keys:
            self._use(key)
        for key in keys:
            if self.data.get(key) is not None:
                return self.get(key, type_=type_, gt=gt, ge=ge)
        if required:
            raise MiniLLMError(f"{self.where}: missing required key '{keys[0]}' for model_type "
                               f"'{self.family}'")
        return default

    def refuse_unless(self, key: str, *allowed: Any) -> None:
        """Refuse an unsupported option by name when it has a non-default value."""
        self._use(key)
        if key in self.data and self.data[key] not in allowed:
            raise MiniLLMError(f"{self.where}: unsupported option {key}={self.data[key]!r} for "
                               f"model_type '{self.family}' (minillm supports {allowed[0]!r})")

    def ignore(self, *keys: str) -> None:
        """Mark declared keys as read when this config's layout makes them meaningless."""
        for key in keys:
            self._use(key)

    def check_refused(self) -> None:
        """Refuse, by name, every REFUSED_KEYS entry that would change the forward pass."""
        for key, neutral in REFUSED_KEYS.items():
            if key not in self.data:
                continue
            self.used.add(key)
            value = self.data[key]
            if key == "layer_types":
                if isinstance(value, list) and all(v == "full_attention" for v in value):
                    layers = self.data.get("num_hidden_layers", self.data.get("n_layer", self.data.get("n_layers")))
                    if isinstance(layers, int) and len(value) != layers:
                        raise MiniLLMError(f"{self.where}: layer_types lists {len(value)} layers, the model has "
                                           f"{layers}")
                    continue
                kinds = sorted({str(v) for v in value}) if isinstance(value, list) else [repr(value)]
                raise MiniLLMError(f"{self.where}: unsupported option layer_types with "
                                   f"{', '.join(kinds)} (minillm supports only full_attention layers)")
            if key == "rope_scaling" and _unscaled(value):
                continue
            if key == "quantization_config" and isinstance(value, dict) and value.get("quant_method") == "gguf":
                # transformers' conversion of a GGUF: the weights it wrote are dequantized floats
                # (a tensor of an integer dtype is still refused by the loader, by name).
                continue
            if value not in neutral:
                shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
                raise MiniLLMError(f"{self.where}: unsupported option {key}={shown} for model_type "
                                   f"'{self.family}' (it changes the forward pass; minillm does not "
                                   "implement it)")

    def finish(self) -> list[str]:
        """Name the keys nobody read: a one-line ConfigWarning, or an error when strict."""
        unknown = sorted(k for k in self.data if k not in self.used and k not in self.neutral)
        if unknown:
            names = ", ".join(repr(k) for k in unknown)
            if self.strict:
                why = self.strict if isinstance(self.strict, str) else "strict config checking is on"
                raise MiniLLMError(f"{self.where}: unknown config key{'s' if len(unknown) > 1 else ''} "
                                   f"{names} for model_type '{self.family}' ({why})")
            warnings.warn(f"{self.where}: ignoring unknown config key{'s' if len(unknown) > 1 else ''} "
                          f"{names} for model_type '{self.family}'", ConfigWarning, stacklevel=4)
        return unknown


def rope_settings(r: ConfigReader, *, theta_keys=("rope_theta",), default_theta: float = 10000.0):
    """(rope_theta, partial_rotary_factor or None) from the classic keys or transformers 5's rope_parameters.

    Any rope_type other than 'default' changes the positions and is refused (a rope_scaling block
    is refused before, with the other REFUSED_KEYS).
    """
    theta = r.first(*theta_keys, default=None, type_=float, gt=0)
    factor = None
    params = r.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise MiniLLMError(f"{r.where}: 'rope_parameters' must be an object, got {params!r}")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "linear" and params.get("factor") == 1.0:  # scales nothing
            params = {k: v for k, v in params.items() if k != "factor"}
            rope_type = "default"
        if rope_type != "default":
            raise MiniLLMError(f"{r.where}: unsupported option rope_type={rope_type!r} (minillm supports "
                               "only 'default')")
        for key in params:
            if key not in ("rope_type", "type", "rope_theta", "partial_rotary_factor"):
                raise MiniLLMError(f"{r.where}: unsupported key rope_parameters.{key}")
        if params.get("rope_theta") is not None:
            theta = r._checked("rope_parameters.rope_theta", params["rope_theta"], float, 0, None, None)
        if params.get("partial_rotary_factor") is not None:
            factor = r._checked("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"],
                                float, 0, None, 1)
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
