"""MPT options, checked against a hand-written float64 transcription of MosaicML's MPT forward.

transformers' MPT port hard-codes no biases, expansion_ratio 4, alibi_bias_max 8 and no
logit_scale, so it cannot be the oracle for those options. `reference_logits` below is a direct,
unoptimised transcription of MosaicML's `modeling_mpt.py` / `attention.py` / `ffn.py`:
LayerNorm (+bias unless no_bias), Wqkv, clamp (clip_qkv), split heads, q.k * softmax_scale +
ALiBi bias, causal mask, softmax, out_proj, residual, LayerNorm, GELU MLP (expansion_ratio),
residual, final LayerNorm, tied head, logit_scale. Where transformers does honour an option
(softmax_scale, clip_qkv) minillm, the reference and transformers are all compared.

`learned_pos_emb` follows the tensors: a checkpoint holding `transformer.wpe.weight` gets
absolute positions in the dense forward and refuses to stream; one without it is ALiBi-only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import minillm
from minillm.errors import MiniLLMError
from util import rel_err


# --- the reference: MosaicML's MPT, transcribed ------------------------------------------------

def gen_slopes(n_heads: int, alibi_bias_max: float) -> torch.Tensor:
    """MosaicML attention.gen_slopes, in float32 as there."""
    _n_heads = 2 ** math.ceil(math.log2(n_heads))
    m = torch.arange(1, _n_heads + 1, dtype=torch.float32) * (alibi_bias_max / _n_heads)
    slopes = 1.0 / torch.pow(2, m)
    if _n_heads != n_heads:
        slopes = torch.concat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def reference_logits(sd: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """float64 MPT forward from a state dict with MosaicML's tensor names."""
    sd = {k: v.double() for k, v in sd.items()}
    attn = cfg.get("attn_config", {})
    d, H, eps = cfg["d_model"], cfg["n_heads"], 1e-5
    hd = d // H
    scale = attn.get("softmax_scale") or 1 / math.sqrt(hd)
    clip = attn.get("clip_qkv")
    B, T = ids.shape

    def ln(x, prefix):
        return F.layer_norm(x, (d,), sd[prefix + ".weight"], sd.get(prefix + ".bias"), eps)

    def linear(x, prefix):
        return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))

    x = sd["transformer.wte.weight"][ids]
    if "transformer.wpe.weight" in sd:
        x = x + sd["transformer.wpe.weight"][torch.arange(T)]
    # ALiBi as MosaicML's build_alibi_bias(full=True): -|query - key| (int32) times the float32
    # slopes, in float32. Its causal form, slope * (key - (T-1)), differs by a constant per query
    # row, which softmax ignores (up to float32 rounding of the product, ~1e-8 when the slopes are
    # not powers of two).
    i = torch.arange(T, dtype=torch.int32)
    dist = (i[None, :] - i[:, None]).abs().mul(-1)
    slopes = gen_slopes(H, attn.get("alibi_bias_max", 8))
    alibi = (dist[None] * slopes[:, None, None]).double()  # (H, T, T)
    causal = i[None, :] <= i[:, None]
    for layer in range(cfg["n_layers"]):
        p = f"transformer.blocks.{layer}"
        qkv = linear(ln(x, p + ".norm_1"), p + ".attn.Wqkv")
        if clip:
            qkv = qkv.clamp(min=-clip, max=clip)
        q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))  # (B, H, T, hd)
        scores = q @ k.transpose(-1, -2) * scale + alibi
        scores = scores.masked_fill(~causal, float("-inf"))
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, d)
        x = x + linear(out, p + ".attn.out_proj")
        x = x + linear(F.gelu(linear(ln(x, p + ".norm_2"), p + ".ffn.up_proj")), p + ".ffn.down_proj")
    logits = ln(x, "transformer.norm_f") @ sd["transformer.wte.weight"].T
    ls = cfg.get("logit_scale")
    if ls is not None:
        logits = logits * (1 / math.sqrt(d) if ls == "inv_sqrt_d_model" else ls)
    return logits


# --- MosaicML-style checkpoints ---------------------------------------------------------------

def mosaic_config(*, d_model=32, n_heads=4, n_layers=2, vocab=50, expansion_ratio=4, no_bias=True,
                  learned_pos_emb=True, max_seq_len=64, logit_scale=None, **attn) -> dict:
    return {
        "architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": d_model, "n_heads": n_heads,
        "n_layers": n_layers, "vocab_size": vocab, "expansion_ratio": expansion_ratio, "no_bias": no_bias,
        "learned_pos_emb": learned_pos_emb, "max_seq_len": max_seq_len, "logit_scale": logit_scale,
        "norm_type": "low_precision_layernorm", "emb_pdrop": 0, "resid_pdrop": 0, "embedding_fraction": 1.0,
        "attn_config": {"alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
                        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None,
                        "prefix_lm": False, "qk_ln": False, "softmax_scale": None, **attn},
    }


def mosaic_state_dict(cfg: dict, *, wpe: bool = False, seed: int = 0, std: float = 0.3) -> dict:
    """Random weights under MosaicML's names; biases only when no_bias is false."""
    g = torch.Generator().manual_seed(seed)
    d, V = cfg["d_model"], cfg["vocab_size"]
    f = int(cfg["expansion_ratio"] * d)

    def rnd(*shape):
        return std * torch.randn(*shape, generator=g, dtype=torch.float64)

    def norm():
        return 1 + 0.1 * torch.randn(d, generator=g, dtype=torch.float64)

    sd = {"transformer.wte.weight": rnd(V, d), "transformer.norm_f.weight": norm()}
    if wpe:
        sd["transformer.wpe.weight"] = rnd(cfg["max_seq_len"], d)
    shapes = {"norm_1": None, "attn.Wqkv": (3 * d, d), "attn.out_proj": (d, d), "norm_2": None,
              "ffn.up_proj": (f, d), "ffn.down_proj": (d, f)}
    for i in range(cfg["n_layers"]):
        for name, shape in shapes.items():
            p = f"transformer.blocks.{i}.{name}"
            sd[p + ".weight"] = norm() if shape is None else rnd(*shape)
            if not cfg["no_bias"]:
                sd[p + ".bias"] = rnd(d if shape is None else shape[0])
    if not cfg["no_bias"]:
        sd["transformer.norm_f.bias"] = rnd(d)
    return sd


def write_checkpoint(directory: Path, cfg: dict, sd: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / "model.safetensors"))
    return directory


def ours_vs_reference(tmp_path, cfg, ids, *, wpe=False, seed=0):
    sd = mosaic_state_dict(cfg, wpe=wpe, seed=seed)
    model = minillm.load(write_checkpoint(tmp_path / "ckpt", cfg, sd), dtype=torch.float64)
    with torch.no_grad():
        got = model(ids)
    return got, reference_logits(sd, cfg, ids), model


IDS = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(0))


# --- each option on its own --------------------------------------------------------------------

OPTIONS = {
    "no_bias=False": dict(no_bias=False),
    "expansion_ratio=2": dict(expansion_ratio=2),
    "expansion_ratio=1.5": dict(expansion_ratio=1.5),
    "alibi_bias_max=4": dict(alibi_bias_max=4),
    "logit_scale=0.25": dict(logit_scale=0.25),
    "logit_scale=inv_sqrt_d_model": dict(logit_scale="inv_sqrt_d_model"),
    "softmax_scale=0.2": dict(softmax_scale=0.2),
    "clip_qkv=0.5": dict(clip_qkv=0.5),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_option_matches_reference(tmp_path, option):
    cfg = mosaic_config(n_heads=6, d_model=48, **OPTIONS[option])  # 6 heads: not a power of two
    got, want, model = ours_vs_reference(tmp_path, cfg, IDS)
    assert rel_err(got, want) <= 1e-12
    assert not model.config.learned_pos_emb  # no wpe tensor: ALiBi only, despite the flag


@pytest.mark.parametrize("option", ["alibi_bias_max=4", "logit_scale=0.25", "logit_scale=inv_sqrt_d_model",
                                    "softmax_scale=0.2", "clip_qkv=0.5"])
def test_option_changes_the_output(tmp_path, option):
    # Same weights with and without the option: the reference must see a real difference, or the
    # agreement above would prove nothing.
    cfg = mosaic_config(n_heads=6, d_model=48, **OPTIONS[option])
    sd = mosaic_state_dict(cfg)
    plain = reference_logits(sd, mosaic_config(n_heads=6, d_model=48), IDS)
    assert rel_err(reference_logits(sd, cfg, IDS), plain) > 1e-3


@given(heads=st.sampled_from([1, 2, 3, 4, 5, 6, 8, 12]), head_dim=st.sampled_from([2, 4, 8]),
       layers=st.integers(1, 2), seq=st.integers(1, 20), batch=st.integers(1, 2), no_bias=st.booleans(),
       ratio=st.sampled_from([1, 2, 4, 1.5]), bias_max=st.sampled_from([2, 4, 8, 16]),
       logit_scale=st.sampled_from([None, 0.5, 3.0, "inv_sqrt_d_model"]),
       softmax_scale=st.sampled_from([None, 0.1, 0.4]), clip=st.sampled_from([None, 0.3, 1.0]),
       wpe=st.booleans(), seed=st.integers(0, 1000))
def test_options_combined_match_reference(tmp_path_factory, heads, head_dim, layers, seq, batch, no_bias,
                                          ratio, bias_max, logit_scale, softmax_scale, clip, wpe, seed):
    cfg = mosaic_config(d_model=heads * head_dim, n_heads=heads, n_layers=layers, expansion_ratio=ratio,
                        no_bias=no_bias, logit_scale=logit_scale, alibi_bias_max=bias_max,
                        softmax_scale=softmax_scale, clip_qkv=clip, max_seq_len=32)
    ids = torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(seed))
    got, want, model = ours_vs_reference(tmp_path_factory.mktemp("mpt"), cfg, ids, wpe=wpe, seed=seed)
    assert model.config.learned_pos_emb == wpe
    assert rel_err(got, want) <= 1e-12


# --- against transformers, where its port honours the option ------------------------------------

@pytest.mark.parametrize("attn", [dict(softmax_scale=0.2), dict(clip_qkv=0.5),
                                  dict(softmax_scale=0.5, clip_qkv=1.0)], ids=str)
def test_softmax_scale_and_clip_qkv_match_transformers(tmp_path, attn):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = transformers.MptConfig(d_model=48, n_heads=6, n_layers=2, vocab_size=50, max_seq_len=64,
                                 attn_config=attn)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1
                    else 0.3 * torch.randn(p.shape, generator=g))
    hf.save_pretrained(tmp_path)
    with torch.no_grad():
        want = hf(IDS).logits
        got = minillm.load(tmp_path)(IDS)
    assert rel_err(got, want) <= 1e-4  # minillm == transformers
    # ... and the hand-written reference agrees with transformers too, which checks the reference.
    ref = reference_logits(hf.state_dict(), json.loads((tmp_path / "config.json").read_text()), IDS)
    assert rel_err(ref, want) <= 1e-4


# --- learned_pos_emb follows the tensors ------------------------------------------------------

def test_wpe_checkpoint_has_absolute_positions(tmp_path):
    cfg = mosaic_config()
    got, want, model = ours_vs_reference(tmp_path, cfg, IDS, wpe=True)
    assert model.config.learned_pos_emb and model.wpe is not None
    assert rel_err(got, want) <= 1e-12
    # The positions matter: the same weights without wpe give other logits.
    sd = mosaic_state_dict(cfg, wpe=True)
    no_wpe = {k: v for k, v in sd.items() if k != "transformer.wpe.weight"}
    assert rel_err(reference_logits(no_wpe, cfg, IDS), want) > 1e-3


def test_wpe_checkpoint_refuses_to_stream(tmp_path):
    _, _, model = ours_vs_reference(tmp_path, mosaic_config(), IDS, wpe=True)
    cache = model.new_cache(batch_size=2, sinks=2, window=6)
    with pytest.raises(MiniLLMError, match="wpe"):
        model(IDS, cache=cache)


def test_wpe_checkpoint_refuses_dense_input_past_max_seq_len(tmp_path):
    _, _, model = ours_vs_reference(tmp_path, mosaic_config(max_seq_len=16), IDS, wpe=True)
    with pytest.raises(MiniLLMError, match="16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_checkpoint_without_wpe_is_alibi_only_and_streams(tmp_path):
    cfg = mosaic_config()  # learned_pos_emb: true in the config, as in mpt-7b's own file
    got, want, model = ours_vs_reference(tmp_path, cfg, IDS, wpe=False)
    assert not model.config.learned_pos_emb and model.wpe is None
    assert rel_err(got, want) <= 1e-12
    # Streaming with a cache large enough to hold everything equals the dense forward.
    cache = model.new_cache(batch_size=2, sinks=2, window=30)
    with torch.no_grad():
        streamed = torch.cat([model(IDS[:, :5], cache=cache), model(IDS[:, 5:], cache=cache)], dim=1)
    assert rel_err(streamed, got) <= 1e-12
