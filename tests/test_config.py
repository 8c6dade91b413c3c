"""Config parsing: the published hub configs, the configs transformers 5.x writes, refusals by name.

Three kinds of checks:
- every file in tests/data/hub-configs/ (published configs, and ones real tools wrote) parses to
  the architecture the published model really has;
- the dicts that transformers' own config classes write (`.to_dict()`, the shape `save_pretrained`
  produces, with `rope_parameters`, nested `attn_config` boilerplate, ...) parse to the same fields;
- options that would change the forward pass and are not supported are refused with a
  MiniLLMError that names the key, and `to_hf_config` round-trips every test variant.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest

from minillm.core.config import ModelConfig
from minillm.formats.families import from_hf_config, to_hf_config
import minillm
from minillm.errors import MiniLLMError
from util import VARIANTS, tiny_config

HUB_CONFIGS = Path(__file__).resolve().parent / "data" / "hub-configs"


def _tf():
    """transformers, for the tests that use its config classes (the rest run without it)."""
    return pytest.importorskip("transformers")


def hub_config(name: str) -> dict:
    return json.loads((HUB_CONFIGS / name).read_text(encoding="utf-8"))


def parse(d: dict) -> ModelConfig:
    return from_hf_config(copy.deepcopy(d))


def refused(d: dict, *needles: str) -> str:
    """Assert that parsing `d` raises a one-line MiniLLMError containing every needle."""
    with pytest.raises(MiniLLMError) as info:
        from_hf_config(d)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


# --- the published configs -------------------------------------------------------------------

def test_every_hub_config_parses_without_a_warning():
    files = sorted(HUB_CONFIGS.rglob("*.json"))
    assert len(files) >= 9, files
    for f in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every key in these files is known
            c = from_hf_config(json.loads(f.read_text(encoding="utf-8")), where=f.name, strict=True)
        assert c.hidden_size == c.num_heads * c.head_dim, f.name


@pytest.mark.parametrize("name", ["falcon-7b-refinedwebmodel.json", "falcon-7b-falcon.json"])
def test_falcon_7b(name):
    c = parse(hub_config(name))
    assert c.family == "falcon"
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (71, 1, 64)  # multi-query
    assert c.parallel_residual and c.shared_norm  # parallel attention reading one LayerNorm
    assert c.qkv_layout == "split"
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (32, 4544, 4 * 4544)
    assert c.positions == "rope" and c.rope_theta == 10000.0 and c.rotary_dim == 64
    assert c.norm == "layernorm" and c.norm_bias and c.activation == "gelu"
    assert not (c.qkv_bias or c.out_bias or c.mlp_bias)
    assert c.tie_word_embeddings and c.vocab_size == 65024


def test_falcon_7b_legacy_and_in_library_agree():
    legacy = parse(hub_config("falcon-7b-refinedwebmodel.json"))
    in_library = parse(hub_config("falcon-7b-falcon.json"))
    assert legacy == in_library


def test_falcon_40b():
    c = parse(hub_config("falcon-40b-refinedweb.json"))
    assert c.family == "falcon"
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (128, 8, 64)
    assert c.qkv_layout == "grouped"  # the new decoder layout
    assert c.parallel_residual and not c.shared_norm  # two LayerNorms: ln_attn and ln_mlp
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (60, 8192, 4 * 8192)
    assert c.positions == "rope" and not c.qkv_bias


def test_llama_2_70b():
    c = parse(hub_config("llama-2-70b-hf.json"))
    assert c.family == "llama"
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (64, 8, 128)  # GQA
    assert c.rope_theta == 10000.0 and c.rotary_dim == 128  # no rope_theta key: the default
    assert (c.num_layers, c.intermediate_size, c.max_position_embeddings) == (80, 28672, 4096)
    assert c.norm == "rmsnorm" and c.norm_eps == 1e-5 and c.activation == "swiglu"
    assert not c.tie_word_embeddings and not c.parallel_residual


def test_llama_2_7b():
    c = parse(hub_config("llama-2-7b-hf.json"))
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (32, 32, 128)  # MHA
    assert (c.num_layers, c.hidden_size, c.intermediate_size) == (32, 4096, 11008)
    assert c.rope_theta == 10000.0 and not (c.qkv_bias or c.mlp_bias)


def test_mpt_7b():
    c = parse(hub_config("mpt-7b.json"))
    assert c.family == "mpt"
    assert c.positions == "alibi" and c.alibi == "mpt" and c.alibi_bias_max == 8.0
    assert not (c.qkv_bias or c.out_bias or c.mlp_bias or c.norm_bias)  # no_bias
    assert c.intermediate_size == 4 * c.hidden_size == 4 * 4096
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (32, 32, 128, 32)
    assert c.tie_word_embeddings and c.max_position_embeddings == 2048
    assert c.softmax_scale is None and c.clip_qkv is None and c.logit_scale is None
    # learned_pos_emb is true in the file; whether `wpe` is used is decided by the tensors at load.
    assert c.learned_pos_emb


def test_pythia_160m():
    c = parse(hub_config("pythia-160m.json"))
    assert c.family == "gpt_neox"
    assert (c.head_dim, c.rotary_dim) == (64, 16)  # rotary on 25% of each head
    assert c.parallel_residual and not c.tie_word_embeddings
    assert (c.num_heads, c.num_layers, c.intermediate_size) == (12, 12, 3072)
    assert c.qkv_layout == "interleaved" and c.qkv_bias and c.mlp_bias


@pytest.mark.parametrize("name", ["falcon-7b-refinedwebmodel.json", "falcon-7b-falcon.json",
                                  "falcon-40b-refinedweb.json", "llama-2-70b-hf.json",
                                  "llama-2-7b-hf.json", "mpt-7b.json", "pythia-160m.json"])
def test_hub_config_round_trips_through_to_hf(name):
    c = parse(hub_config(name))
    assert from_hf_config(to_hf_config(c)) == c


# --- the configs transformers 5.x writes -------------------------------------------------------

def written(cfg) -> dict:
    """What transformers itself writes to config.json (a plain JSON round trip of `to_dict`)."""
    return json.loads(json.dumps(cfg.to_dict()))


def test_transformers_llama_gqa():
    d = written(_tf().LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         rms_norm_eps=1e-5, rope_theta=500000.0, attention_bias=True,
                                         tie_word_embeddings=True))
    assert d["rope_parameters"]["rope_theta"] == 500000.0  # transformers 5 moved it here
    c = parse(d)
    assert (c.family, c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == ("llama", 4, 2, 8, 3)
    assert c.rope_theta == 500000.0 and c.norm_eps == 1e-5
    assert c.qkv_bias and c.out_bias and not c.mlp_bias and c.tie_word_embeddings


def test_transformers_llama_explicit_head_dim_and_mqa():
    c = parse(written(_tf().LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                                               head_dim=16, mlp_bias=True)))
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (24, 4, 1, 16)
    assert c.mlp_bias and c.rotary_dim == 16


def test_transformers_falcon_default_is_7b_style():
    d = written(_tf().FalconConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                          num_hidden_layers=2))
    c = parse(d)
    assert d["multi_query"] is True and d["num_ln_in_parallel_attn"] is None
    assert (c.num_kv_heads, c.qkv_layout, c.parallel_residual, c.shared_norm) == (1, "split", True, True)
    assert c.intermediate_size == d["ffn_hidden_size"] == 128 and c.tie_word_embeddings


@pytest.mark.parametrize("n_ln", [None, 1, 2])
def test_transformers_falcon_new_decoder(n_ln):
    d = written(_tf().FalconConfig(vocab_size=64, hidden_size=48, num_attention_heads=6, num_kv_heads=2,
                                          new_decoder_architecture=True, num_ln_in_parallel_attn=n_ln,
                                          ffn_hidden_size=50, num_hidden_layers=2, bias=True, rope_theta=20000.0))
    c = parse(d)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_layout) == (6, 2, 8, "grouped")
    assert c.parallel_residual and c.shared_norm == (n_ln == 1)  # None means 2, as in transformers
    assert c.intermediate_size == 50 and c.rope_theta == 20000.0
    assert c.qkv_bias and c.out_bias and c.mlp_bias


def test_transformers_falcon_rw_alibi():
    c = parse(written(_tf().FalconConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                                num_hidden_layers=2, alibi=True, parallel_attn=False,
                                                multi_query=False, bias=True)))
    assert c.positions == "alibi" and c.alibi == "bloom"
    assert (c.num_kv_heads, c.qkv_layout, c.parallel_residual, c.shared_norm) == (4, "interleaved", False, False)
    assert c.qkv_bias and c.mlp_bias


def test_transformers_falcon_mha_parallel_rope():
    c = parse(written(_tf().FalconConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                                num_hidden_layers=1, multi_query=False, parallel_attn=True)))
    assert (c.num_kv_heads, c.qkv_layout, c.parallel_residual, c.shared_norm) == (4, "interleaved", True, True)
    assert c.positions == "rope"


def test_transformers_mpt_nested_attn_config():
    d = written(_tf().MptConfig(d_model=48, n_heads=6, n_layers=2, vocab_size=64, max_seq_len=128,
                                       attn_config={"clip_qkv": 3.0, "softmax_scale": 0.25}))
    assert isinstance(d["attn_config"], dict) and "id2label" in d["attn_config"]  # the boilerplate
    c = parse(d)
    assert (c.family, c.num_heads, c.head_dim, c.max_position_embeddings) == ("mpt", 6, 8, 128)
    assert c.alibi == "mpt" and c.alibi_bias_max == 8.0
    assert c.clip_qkv == 3.0 and c.softmax_scale == 0.25 and c.scale == 0.25
    assert c.intermediate_size == 4 * 48 and not c.norm_bias and c.tie_word_embeddings


@pytest.mark.parametrize("parallel", [True, False])
def test_transformers_gpt_neox_partial_rotary(parallel):
    d = written(_tf().GPTNeoXConfig(vocab_size=64, hidden_size=64, num_attention_heads=4,
                                           num_hidden_layers=2, intermediate_size=100, rotary_pct=0.25,
                                           rotary_emb_base=20000, use_parallel_residual=parallel,
                                           attention_bias=False))
    assert d["rope_parameters"]["partial_rotary_factor"] == 0.25
    c = parse(d)
    assert (c.head_dim, c.rotary_dim, c.rope_theta) == (16, 4, 20000.0)
    assert c.parallel_residual == parallel and not c.tie_word_embeddings
    assert not c.qkv_bias and not c.out_bias and c.mlp_bias and c.intermediate_size == 100


def test_gpt_neox_rope_parameters_win_over_classic_keys():
    d = written(_tf().GPTNeoXConfig(vocab_size=64, hidden_size=64, num_attention_heads=4,
                                           num_hidden_layers=1, rotary_pct=0.5))
    d["rotary_pct"] = 0.25  # a stale classic key beside the transformers 5 block
    assert parse(d).rotary_dim == 8


# --- refusals by name ---------------------------------------------------------------------------

def llama_dict() -> dict:
    return written(_tf().LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40,
                                            num_hidden_layers=1, num_attention_heads=4))


def mpt_dict(**attn) -> dict:
    d = written(_tf().MptConfig(d_model=32, n_heads=4, n_layers=1, vocab_size=64))
    d["attn_config"].update(attn)
    return d


def test_refuses_rope_scaling():
    d = hub_config("llama-2-7b-hf.json")
    d["rope_scaling"] = {"type": "linear", "factor": 2.0}
    refused(d, "rope_scaling")


def test_refuses_rope_type_linear():
    d = llama_dict()
    d["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    refused(d, "rope_type", "linear")


def test_refuses_unknown_rope_parameters_key():
    d = llama_dict()
    d["rope_parameters"]["factor"] = 4.0
    refused(d, "factor")


@pytest.mark.parametrize("key,value", [("qk_ln", True), ("attn_type", "grouped_query_attention"),
                                       ("prefix_lm", True), ("attn_uses_sequence_id", True)])
def test_refuses_mpt_attention_options(key, value):
    msg = refused(mpt_dict(**{key: value}), key)
    if isinstance(value, str):
        assert value in msg


def test_refuses_sliding_window():
    d = llama_dict()
    d["sliding_window"] = 128
    refused(d, "sliding_window")


def test_refuses_unknown_model_type():
    d = llama_dict()
    d["model_type"] = "gpt_bigcode"
    refused(d, "gpt_bigcode", "model_type")


def test_refuses_falcon_post_layernorm_residual():
    d = hub_config("falcon-7b-falcon.json")
    d["apply_residual_connection_post_layernorm"] = True
    refused(d, "apply_residual_connection_post_layernorm")


def test_refuses_llama_gelu():
    d = hub_config("llama-2-7b-hf.json")
    d["hidden_act"] = "gelu"
    refused(d, "hidden_act", "gelu")


def test_ignores_keys_that_cannot_change_the_forward():
    d = hub_config("llama-2-7b-hf.json")
    base = parse(d)
    d.update(attention_dropout=0.1, pad_token_id=0, transformers_version="9.9", dtype="bfloat16",
             auto_map={"AutoModel": "x.Y"}, architectures=["Whatever"])
    assert parse(d) == base


# --- round trip of every test variant ----------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_round_trip(variant):
    c = tiny_config(variant)
    d = json.loads(json.dumps(to_hf_config(c)))  # exactly what lands in config.json
    assert from_hf_config(d) == c


@pytest.mark.parametrize("variant", ["llama_gqa", "falcon_7b", "mpt", "gpt_neox_parallel"])
def test_variant_round_trip_with_extensions(variant):
    c = tiny_config(variant, sink_token_id=3, zero_sink=True)
    d = json.loads(json.dumps(to_hf_config(c)))
    assert d["minillm"]["sink_token_id"] == 3 and d["minillm"]["zero_sink"] is True
    assert from_hf_config(d) == c


# --- the policy for real files: neutral, refused by name, unknown warned ---------------------

def _tf_params(cls) -> set[str]:
    import inspect

    return {p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs")}


@pytest.mark.parametrize("cls_name,model_type", [("LlamaConfig", "llama"), ("FalconConfig", "falcon"),
                                                 ("MptConfig", "mpt"), ("GPTNeoXConfig", "gpt_neox")])
def test_every_transformers_config_parameter_has_a_policy(cls_name, model_type):
    # Each __init__ parameter of transformers' config class is parsed, known-neutral or refused by
    # name: a new transformers option shows up here instead of being dropped or warned about.
    from minillm.formats.config import NEUTRAL_KEYS, REFUSED_KEYS
    from minillm.formats.families import family_for_model_type

    fam = family_for_model_type(model_type)
    policy = fam.PARSED | fam.REFUSED | fam.NEUTRAL | NEUTRAL_KEYS | set(REFUSED_KEYS)
    params = _tf_params(getattr(_tf(), cls_name))
    assert params, cls_name
    assert sorted(params - policy) == [], cls_name
    if model_type == "mpt":
        from transformers.models.mpt.configuration_mpt import MptAttentionConfig

        attn = fam.ATTN_PARSED | fam.ATTN_REFUSED | fam.ATTN_NEUTRAL | NEUTRAL_KEYS
        assert sorted(_tf_params(MptAttentionConfig) - attn) == []


def test_policy_sets_are_disjoint():
    from minillm.formats.config import NEUTRAL_KEYS, REFUSED_KEYS
    from minillm.formats.families import FAMILIES

    for name, fam in FAMILIES.items():
        groups = [fam.PARSED, fam.REFUSED, fam.NEUTRAL | NEUTRAL_KEYS - {"model_type"}, set(REFUSED_KEYS)]
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                assert not (set(a) & set(b)) - {"model_type"}, (name, set(a) & set(b))


def test_smollm2_real_keys_load_quietly():
    # nanotron's is_llama_config and rope_interleaved=false, transformers' GGUF conversion's
    # _model_name_or_path and unk_token_id, and transformers.js's block: none changes the forward.
    for name in ["real-keys/smollm2-135m.json", "real-keys/smollm2-135m-instruct-gguf-converted.json"]:
        d = hub_config(name)
        d["transformers.js_config"] = {"kv_cache_dtype": {"q4f16": "float16"}, "use_external_data_format": False}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            c = from_hf_config(d, strict=True)
        assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta) == (30, 9, 3, 64, 100000.0)
        assert c.tie_word_embeddings and c.max_position_embeddings == 8192


def test_unknown_keys_warn_once_and_strict_refuses():
    d = llama_dict()
    d.update(zz_future_option=1, another_one="x")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        c = from_hf_config(copy.deepcopy(d))
    assert c == parse(llama_dict())  # the load goes on, same model
    ours = [w for w in caught if issubclass(w.category, minillm.ConfigWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]  # once per load, naming both
    msg = str(ours[0].message)
    assert "\n" not in msg and "'another_one'" in msg and "'zz_future_option'" in msg
    with pytest.raises(MiniLLMError, match="unknown config keys 'another_one', 'zz_future_option'"):
        from_hf_config(d, strict=True)


def test_load_warns_and_strict_load_refuses(tmp_path):
    d = tmp_path / "m"
    minillm.save_pretrained(minillm.Model(tiny_config("llama_gqa")), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["zz_new"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(minillm.ConfigWarning, match="zz_new"):
        minillm.load(d)
    with pytest.raises(MiniLLMError, match="zz_new"):
        minillm.load(d, strict=True)


@pytest.mark.parametrize("key,value", [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ("rope_interleaved", True),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}),
    ("sliding_window", 4096),
    ("use_sliding_window", True),
    ("attention_chunk_size", 8192),
    ("layer_types", ["full_attention", "sliding_attention"]),
    ("layer_types", "full_attention"),
])
def test_forward_changing_keys_are_refused_even_when_not_strict(key, value):
    d = hub_config("real-keys/smollm2-135m.json")
    d[key] = value
    refused(d, key)


def test_full_attention_layer_types_are_neutral():
    d = hub_config("real-keys/smollm2-135m.json")
    d["layer_types"] = ["full_attention"] * 30
    assert parse(d) == parse(hub_config("real-keys/smollm2-135m.json"))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("file,key,value,needle", [
    ("llama-2-7b-hf.json", "rope_theta", 0, "'rope_theta' must be > 0"),
    ("llama-2-7b-hf.json", "rope_theta", -5.0, "'rope_theta' must be > 0"),
    ("llama-2-7b-hf.json", "rope_theta", NAN, "'rope_theta' must be a finite number"),
    ("llama-2-7b-hf.json", "rope_theta", INF, "'rope_theta' must be a finite number"),
    ("llama-2-7b-hf.json", "rms_norm_eps", -1e-6, "'rms_norm_eps' must be > 0"),
    ("llama-2-7b-hf.json", "rms_norm_eps", NAN, "'rms_norm_eps' must be a finite number"),
    ("llama-2-7b-hf.json", "rms_norm_eps", 0, "'rms_norm_eps' must be > 0"),
    ("llama-2-7b-hf.json", "max_position_embeddings", 0, "'max_position_embeddings' must be >= 1"),
    ("llama-2-7b-hf.json", "num_key_value_heads", 0, "'num_key_value_heads' must be >= 1"),
    ("llama-2-7b-hf.json", "vocab_size", -3, "'vocab_size' must be >= 1"),
    ("llama-2-7b-hf.json", "head_dim", 0, "'head_dim' must be >= 1"),
    ("pythia-160m.json", "rotary_pct", 0, "'rotary_pct' must be > 0"),
    ("pythia-160m.json", "rotary_pct", -0.25, "'rotary_pct' must be > 0"),
    ("pythia-160m.json", "rotary_pct", 1.5, "'rotary_pct' must be <= 1"),
    ("pythia-160m.json", "rotary_pct", 0.001, "rotary_pct=0.001"),
    ("pythia-160m.json", "rotary_pct", NAN, "'rotary_pct' must be a finite number"),
    ("pythia-160m.json", "layer_norm_eps", INF, "'layer_norm_eps' must be a finite number"),
    ("pythia-160m.json", "rotary_emb_base", 0, "'rotary_emb_base' must be > 0"),
    ("falcon-7b-falcon.json", "layer_norm_epsilon", 0.0, "'layer_norm_epsilon' must be > 0"),
    ("falcon-7b-falcon.json", "rope_theta", NAN, "'rope_theta' must be a finite number"),
    ("mpt-7b.json", "layer_norm_epsilon", -1.0, "'layer_norm_epsilon' must be > 0"),
    ("mpt-7b.json", "expansion_ratio", 0, "'expansion_ratio' must be > 0"),
    ("mpt-7b.json", "max_seq_len", 0, "'max_seq_len' must be >= 1"),
    ("mpt-7b.json", "logit_scale", -2.0, "'logit_scale' must be > 0"),
    ("mpt-7b.json", "logit_scale", INF, "'logit_scale' must be a finite number"),
])
def test_numeric_fields_are_range_checked_where_parsed(file, key, value, needle):
    d = hub_config(file)
    d[key] = value
    refused(d, needle)


@pytest.mark.parametrize("key,value,needle", [
    ("alibi_bias_max", 0, "'alibi_bias_max' must be > 0"),
    ("clip_qkv", -1.0, "'clip_qkv' must be > 0"),
    ("softmax_scale", NAN, "'softmax_scale' must be a finite number"),
    ("softmax_scale", 0.0, "'softmax_scale' must be > 0"),
    ("zz_unknown", 1, "'zz_unknown'"),  # every attn_config option changes the attention
])
def test_mpt_attn_config_fields_are_range_checked(key, value, needle):
    d = hub_config("mpt-7b.json")
    d["attn_config"][key] = value
    refused(d, needle)


def test_rope_parameters_are_range_checked():
    d = llama_dict()
    d["rope_parameters"]["rope_theta"] = -1.0
    refused(d, "rope_parameters.rope_theta", "> 0")
    d = hub_config("pythia-160m.json")
    del d["rotary_pct"]
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.0}
    refused(d, "partial_rotary_factor")


def test_model_config_itself_refuses_out_of_range_values():
    base = tiny_config("llama_gqa")
    for field, value in [("norm_eps", -1.0), ("rope_theta", math.nan), ("rotary_dim", 0),
                         ("max_position_embeddings", 0), ("softmax_scale", 0.0), ("clip_qkv", math.inf)]:
        with pytest.raises(MiniLLMError, match=field):
            base.replace(**{field: value})


def test_cli_warns_in_one_line_and_strict_config_refuses(tmp_path, capsys):
    from minillm.cli import main

    d = tmp_path / "m"
    minillm.save_pretrained(minillm.Model(tiny_config("llama_gqa")), d)
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).save(str(d / "tokenizer.json"))
    cfg = json.loads((d / "config.json").read_text())
    cfg["zz_new"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    argv = ["generate", str(d), "--prompt", "a", "--max-new-tokens", "1", "--temperature", "0"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "minillm: warning:" in err and "'zz_new'" in err and "Traceback" not in err
    assert main(argv + ["--strict-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minillm: error:") and "'zz_new'" in err and len(err.strip().splitlines()) == 1
