"""GGUF files written here with the gguf package (as llama.cpp's converter writes them), then read back.

A tiny random Llama and its byte-level tokenizer (tests/tiny_ckpt.py) are written as a GGUF:
F32 or Q8_0 tensors, Q/K rows permuted as llama.cpp's `convert_hf_to_gguf.py` permutes them,
the tokenizer as vocab + merges + token types. Reading it back must give the same weights
(exactly for F32; Q8_0 exactly what ggml's dequantizer gives) and the same tokens, and every
broken variant gets a one-line MiniLLMError (the CLI: exit 2, no traceback).
The real checkpoint (SmolLM2's Q4_1 GGUF) is tests/test_smollm2.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import minillm
from minillm.formats.checkpoint import hf_state_dict
from minillm.errors import MiniLLMError
from minillm.formats.gguf import ARCHITECTURES
from tiny_ckpt import tiny_checkpoint  # noqa: F401  (fixture)

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `permute` (Q and K rows into interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, ckpt: Path, *, qtype=Q.F32, arch="llama", drop=(), extra_tensor=None,
               drop_token=False, meta=None, tokenizer_model="gpt2", add_bos=True, extra_values=None,
               raw_meta=None, types_patch=None, pre="default", lie=None,
               chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}") -> Path:
    """A GGUF of the checkpoint at `ckpt`; `add_bos=None` writes no tokenizer.ggml.add_bos_token key;
    `lie` replaces hyper-parameters with values its tensors do not have ({"block_count": 10**9})."""
    model = minillm.load(ckpt)
    c = model.config
    tj = json.loads((ckpt / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    added = {t["id"]: t["content"] for t in tj["added_tokens"]}
    for i, t in added.items():
        if i < len(tokens):
            tokens[i] = t
    types = [3 if i in added else 1 for i in range(len(tokens))]
    if types_patch:
        types[types_patch[0]] = types_patch[1]
    if drop_token:
        tokens, types = tokens[:-1], types[:-1]
    w = gguf.GGUFWriter(str(path), arch)
    lie = lie or {}
    w.add_block_count(lie.get("block_count", c.num_layers))
    w.add_context_length(lie.get("context_length", c.max_position_embeddings))
    w.add_embedding_length(lie.get("embedding_length", c.hidden_size))
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(lie.get("head_count", c.num_heads))
    w.add_head_count_kv(lie.get("head_count_kv", c.num_kv_heads))
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    if "rope_dimension_count" not in lie or lie["rope_dimension_count"] is not None:
        w.add_rope_dimension_count(lie.get("rope_dimension_count", c.head_dim))
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template(chat_template)
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, value)
    for key, (value, kind) in (raw_meta or {}).items():  # any metadata type, e.g. ("7", "string")
        getattr(w, f"add_{kind}")(key, value)
    hf_to_gguf = {}
    spec = ARCHITECTURES["llama"]
    for g, h in spec["tensors"].items():
        for i in range(c.num_layers) if "{i}" in g else [None]:
            hf_to_gguf[h.format(i=i)] = g.format(i=i)
    for name, t in hf_state_dict(model).items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        gname = hf_to_gguf[name]
        if gname in drop:
            continue
        a = t.float().numpy()
        if gname.endswith("attn_q.weight"):
            a = llama_cpp_permute(a, c.num_heads)
        elif gname.endswith("attn_k.weight"):
            a = llama_cpp_permute(a, c.num_kv_heads)
        if a.ndim == 2 and qtype != Q.F32 and a.shape[1] % 32 == 0:  # ggml blocks run along rows
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    if extra_tensor:
        w.add_tensor(extra_tensor, np.zeros(4, dtype=np.float32) if extra_values is None else
                     np.asarray(extra_values, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def f32_file(ckpt, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", ckpt)


def test_f32_gguf_reads_back_the_same_weights_and_logits(ckpt, f32_file):
    want, got = minillm.load(ckpt), minillm.load(f32_file)
    # GGUF stores the epsilon as float32: 1e-5 comes back as 9.99999975e-06, as in every GGUF reader.
    assert got.config == want.config.replace(norm_eps=float(np.float32(want.config.norm_eps)))
    for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
        assert torch.equal(a, b), name  # the un-permute is the exact inverse of llama.cpp's permute
    ids = torch.tensor([[0, 5, 9, 44, 7, 100, 3]])
    with torch.no_grad():
        a, b = got(ids), want(ids)
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-6


def test_q8_0_gguf_dequantizes_as_ggml_does(ckpt, tmp_path):
    path = write_gguf(tmp_path / "tiny-q8.gguf", ckpt, qtype=Q.Q8_0)
    want = {k: v.float().numpy() for k, v in hf_state_dict(minillm.load(ckpt)).items()}
    got = hf_state_dict(minillm.load(path))
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors} == {"Q8_0", "F32"}
    w = want["model.layers.0.mlp.up_proj.weight"]
    ref = gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0)
    assert np.array_equal(got["model.layers.0.mlp.up_proj.weight"].numpy(), ref)
    assert np.abs(ref - w).max() <= np.abs(w).max() / 100  # 8-bit blocks: within 1% of the scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gguf_dequantizes_into_the_requested_dtype(ckpt, f32_file, dtype):
    model = minillm.load(f32_file, dtype=dtype)
    ref = minillm.load(ckpt, dtype=dtype)
    assert model.embed.weight.dtype == dtype
    assert torch.equal(model.embed.weight, ref.embed.weight)


def test_gguf_tokenizer_equals_the_checkpoints(ckpt, f32_file):
    from tiny_ckpt import training_text

    ours, want = minillm.load_tokenizer(f32_file), minillm.load_tokenizer(ckpt)
    assert ours.backend == "gguf" and ours.adds_bos and (ours.bos_id, ours.eos_id) == (0, 1)
    assert ours.chat_template.startswith("{% for m in messages %}")
    for text in training_text(3000, seed=5).splitlines() + ["<s>x</s>", "Café 日本 🙂", ""]:
        assert ours.encode(text) == want.encode(text), text
        assert ours.decode(want.encode(text, add_bos=False)) == text


def test_gguf_without_bos_flag_adds_none(ckpt, tmp_path):
    tok = minillm.load_tokenizer(write_gguf(tmp_path / "nobos.gguf", ckpt, add_bos=False))
    assert not tok.adds_bos and tok.encode("the sea")[0] != 0


@pytest.mark.parametrize("pre, adds", [("default", False), ("smollm", False), ("starcoder", False),
                                       ("llama-bpe", True), ("llama3", True)])
def test_gguf_without_the_bos_key_follows_llama_cpp(ckpt, tmp_path, pre, adds):
    """No tokenizer.ggml.add_bos_token: llama.cpp's default for the pre-tokenizer (true for the
    Llama-3 group, false for the others, src/llama-vocab.cpp), not always false."""
    tok = minillm.load_tokenizer(write_gguf(tmp_path / f"{pre}.gguf", ckpt, add_bos=None, pre=pre))
    assert tok.adds_bos == adds
    assert (tok.encode("the sea")[0] == 0) == adds
    # The key, when present, wins over the default either way.
    for flag in (True, False):
        tok = minillm.load_tokenizer(write_gguf(tmp_path / f"{pre}-{flag}.gguf", ckpt, add_bos=flag, pre=pre))
        assert tok.adds_bos == flag


def test_transformers_reads_our_gguf_the_same(ckpt, f32_file):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(f32_file.parent), gguf_file=f32_file.name,
                                                           dtype=torch.float32)
    ids = torch.tensor([[0, 5, 9, 44, 7, 100, 3, 12, 13]])
    with torch.no_grad():
        want = hf(ids).logits
    with torch.no_grad():
        got = minillm.load(f32_file)(ids)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-5


# --- bad files -----------------------------------------------------------------------------------


def _patch_tensor_type(path: Path, value: int) -> None:
    r = gguf.GGUFReader(str(path))
    t = r.tensors[0]
    # The info's parts: name length, name, n_dims, dims, type, offset; the type is the one before the offset.
    part = t.field.parts[-2]
    offset = part.ctypes.data - r.data.ctypes.data
    del r, t
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.uint32(value).tobytes())


def _one_line(fn, *needles):
    with pytest.raises(MiniLLMError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def test_unsupported_architecture(ckpt, tmp_path):
    path = write_gguf(tmp_path / "mamba.gguf", ckpt, arch="mamba")
    _one_line(lambda: minillm.load(path), "unsupported GGUF architecture 'mamba'")


def test_unknown_tensor_type(ckpt, tmp_path):
    path = write_gguf(tmp_path / "badtype.gguf", ckpt)
    _patch_tensor_type(path, 250)
    _one_line(lambda: minillm.load(path), "badtype.gguf", "250")


def test_missing_tensor(ckpt, tmp_path):
    path = write_gguf(tmp_path / "missing.gguf", ckpt, drop=("blk.1.ffn_up.weight",))
    _one_line(lambda: minillm.load(path), "missing tensor model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(ckpt, tmp_path):
    path = write_gguf(tmp_path / "extra.gguf", ckpt, extra_tensor="blk.0.attn_sinks.weight")
    _one_line(lambda: minillm.load(path), "unexpected tensor blk.0.attn_sinks.weight")


@pytest.mark.parametrize("keep", [1000, 50_000, -100])
def test_truncated_file(f32_file, tmp_path, keep):
    data = f32_file.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:keep] if keep > 0 else data[:keep])
    _one_line(lambda: minillm.load(path), "cut.gguf")


def test_not_a_gguf_at_all(tmp_path):
    path = tmp_path / "text.gguf"
    path.write_text("hello, I am not a GGUF file\n" * 20)
    _one_line(lambda: minillm.load(path), "text.gguf", "not a readable GGUF file")
    _one_line(lambda: minillm.load(tmp_path / "nope.gguf"), "GGUF file not found")


def test_vocabulary_that_disagrees_with_the_embedding(ckpt, tmp_path):
    path = write_gguf(tmp_path / "vocab.gguf", ckpt, drop_token=True)
    _one_line(lambda: minillm.load(path), "the vocabulary has", "token_embd.weight")


def test_sentencepiece_gguf_tokenizer_is_refused_by_name(ckpt, tmp_path):
    path = write_gguf(tmp_path / "sp.gguf", ckpt, tokenizer_model="llama")
    _one_line(lambda: minillm.load_tokenizer(path), "tokenizer.ggml.model='llama'")


def test_metadata_policy(ckpt, tmp_path):
    path = write_gguf(tmp_path / "scaled.gguf", ckpt, meta={"llama.rope.scaling.type": "linear"})
    _one_line(lambda: minillm.load(path), "llama.rope.scaling.type='linear'")
    path = write_gguf(tmp_path / "unknown.gguf", ckpt, meta={"llama.zz_future": 1.0})
    with pytest.warns(minillm.ConfigWarning, match="llama.zz_future"):
        minillm.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _one_line(lambda: minillm.load(path, strict=True), "llama.zz_future", "strict")


def test_cli_on_bad_gguf_is_exit_2_without_traceback(ckpt, tmp_path, capsys):
    from minillm.cli import main

    path = write_gguf(tmp_path / "mamba.gguf", ckpt, arch="mamba")
    for argv in (["generate", str(path), "--prompt", "x"], ["ppl", str(path), "--text", str(ckpt / "config.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "unsupported GGUF architecture" in err
        assert len(err.strip().splitlines()) == 1, err


def test_cli_generates_from_a_gguf(f32_file, capsys):
    from minillm.cli import main

    assert main(["generate", str(f32_file), "--prompt", "the sea", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.strip()


# --- review fixes: what a real converter writes, and what a hostile file holds --------------------


def test_rope_frequency_factors_are_refused_unless_neutral(ckpt, tmp_path):
    # llama.cpp stores Llama-3.1's rope scaling as per-dimension divisors in rope_freqs.weight, with
    # no rope.scaling metadata: honouring nothing there would be silently wrong.
    hd = minillm.load(ckpt).config.head_dim
    path = write_gguf(tmp_path / "llama31.gguf", ckpt, extra_tensor="rope_freqs.weight",
                      extra_values=[1.0] * (hd // 4) + [8.0] * (hd // 4))
    _one_line(lambda: minillm.load(path), "unsupported tensor rope_freqs.weight", "rope scaling")
    ones = write_gguf(tmp_path / "ones.gguf", ckpt, extra_tensor="rope_freqs.weight", extra_values=[1.0] * (hd // 2))
    assert torch.equal(minillm.load(ones).embed.weight, minillm.load(ckpt).embed.weight)


def test_add_eos_token_is_honoured_and_flags_must_be_bools(ckpt, tmp_path):
    path = write_gguf(tmp_path / "eos.gguf", ckpt, raw_meta={"tokenizer.ggml.add_eos_token": (True, "bool")})
    tok = minillm.load_tokenizer(path)
    ids = tok.encode("the sea")
    assert ids[0] == 0 and ids[-1] == 1 and tok.encode("the sea", add_bos=False)[-1] != 1
    bad = write_gguf(tmp_path / "strflag.gguf", ckpt, add_bos=False,
                     raw_meta={"tokenizer.ggml.add_bos_token": ("false", "string")})
    _one_line(lambda: minillm.load_tokenizer(bad), "tokenizer.ggml.add_bos_token must be a bool")


def test_bad_tokenizer_metadata_is_refused(ckpt, tmp_path):
    path = write_gguf(tmp_path / "types.gguf", ckpt, types_patch=(5, 99))
    _one_line(lambda: minillm.load_tokenizer(path), "token_type has unknown type(s) [99]")
    path = write_gguf(tmp_path / "tmpl.gguf", ckpt, raw_meta={"tokenizer.chat_template": (3, "uint32")})
    # the writer refuses a second chat_template key, so this one replaces nothing: read it raw
    import gguf as g

    r = g.GGUFReader(str(path))
    if isinstance(r.fields["tokenizer.chat_template"].contents(), str):
        pytest.skip("the gguf writer kept the string template")  # pragma: no cover
    _one_line(lambda: minillm.load_tokenizer(path), "tokenizer.chat_template must be a string")


def test_metadata_errors_name_the_gguf_key(ckpt, tmp_path):
    path = write_gguf(tmp_path / "heads.gguf", ckpt, raw_meta={"llama.attention.head_count_kv": (0, "uint32")})
    _one_line(lambda: minillm.load(path), "'llama.attention.head_count_kv' must be >= 1")


# --- issue 20: metadata that lies about the tensors, special files, the real cause ---------------


def test_a_lying_block_count_is_refused_before_anything_is_built(ckpt, tmp_path):
    # Before: a 147 KB file with block_count 10^9 grew past 4 GB (every layer's names were built first).
    import tracemalloc

    for n in (200_000, 10**9, 2**31 - 1):
        path = write_gguf(tmp_path / f"layers{n}.gguf", ckpt, lie={"block_count": n})
        tracemalloc.start()
        try:
            msg = _one_line(lambda: minillm.load(path), f"llama.block_count declares {n} layers",
                            "holds tensors for 2")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20 << 20, (n, peak, msg)


def test_a_gguf_directory_is_named_by_kind(tmp_path):
    # Before: "GGUF file not found" for a directory that is there.
    (tmp_path / "model.gguf").mkdir()
    _one_line(lambda: minillm.load(tmp_path / "model.gguf"), f"{tmp_path / 'model.gguf'} is a directory, "
              "not a regular file")
    _one_line(lambda: minillm.load_tokenizer(tmp_path / "model.gguf"), "is a directory, not a regular file")


def test_sizes_the_tensors_contradict_are_named(ckpt, tmp_path):
    # Before: "rotary_dim=7 must be even" (or a partial-rotary refusal), neither of which the file says.
    path = write_gguf(tmp_path / "h30.gguf", ckpt, lie={"embedding_length": 30, "rope_dimension_count": None})
    _one_line(lambda: minillm.load(path), "h30.gguf: llama.embedding_length is 30, but token_embd.weight is "
              "300 x 32")
    path = write_gguf(tmp_path / "h30r.gguf", ckpt, lie={"embedding_length": 30})
    _one_line(lambda: minillm.load(path), "llama.embedding_length is 30, but token_embd.weight is 300 x 32")


def test_heads_that_do_not_divide_name_the_gguf_keys(ckpt, tmp_path):
    path = write_gguf(tmp_path / "kv3.gguf", ckpt, lie={"head_count_kv": 3})
    _one_line(lambda: minillm.load(path), "'llama.attention.head_count' = 4 is not a multiple of "
              "'llama.attention.head_count_kv' = 3")


def test_a_short_context_length_is_named_as_the_cause(ckpt, tmp_path, capsys):
    # Before: "--cache-size must exceed --sinks (got --cache-size 1, ...)" though no --cache-size was given.
    from minillm.cli import main

    path = write_gguf(tmp_path / "ctx1.gguf", ckpt, lie={"context_length": 1})
    assert main(["generate", str(path), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ctx1.gguf's llama.context_length = 1" in err, err
    assert "got --cache-size" not in err
    # An explicit --cache-size is the user's own: then the flag is named.
    assert main(["generate", str(path), "--prompt", "x", "--cache-size", "3"]) == 2
    assert "--cache-size must exceed --sinks (got --cache-size 3" in capsys.readouterr().err


def test_the_header_is_read_from_a_plain_view_of_the_mapping_with_the_same_values(ckpt, tmp_path):
    """minillm reads the header through a plain ndarray (numpy's memmap subclass cost SmolLM2's
    load 8-10 s in per-slice hooks); every field and tensor must be what gguf's own reader reads."""
    from minillm.formats.gguf import GGUFFile

    path = write_gguf(tmp_path / "q8.gguf", ckpt, qtype=Q.Q8_0, meta={"general.name": "tiny"})
    ours, theirs = GGUFFile(path).reader, gguf.GGUFReader(str(path), "r")
    assert all(type(p) is np.ndarray for f in ours.fields.values() for p in f.parts)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert [bytes(p.tobytes()) for p in ours.fields[key].parts] == [bytes(p.tobytes()) for p in field.parts], key
        assert ours.fields[key].contents() == field.contents(), key
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.name, a.tensor_type, a.shape.tolist()) == (b.name, b.tensor_type, b.shape.tolist())
        assert np.array_equal(a.data, b.data) and not a.data.flags.writeable
def test_a_gguf_chat_template_runs_within_the_budget(ckpt, tmp_path, monkeypatch):
    """Issue 20, category 2: a GGUF's tokenizer.chat_template is rendered within the same time and
    size limits as one from chat_template.jinja (tests/test_template.py)."""
    from minillm.apps.chat import ChatSession

    monkeypatch.setenv("MINILLM_TEMPLATE_SECONDS", "1")
    for template, match in (("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                             "time limit of 1 s"),
                            ("{% for i in range(100000) %}{{ 'y' * 100000 }}{% endfor %}", "10,000,000 characters")):
        path = write_gguf(tmp_path / f"t{len(match)}.gguf", ckpt, chat_template=template)
        tok = minillm.load_tokenizer(path)
        assert tok.chat_template == template
        session = ChatSession(minillm.load(path), tok, max_new_tokens=2)
        with pytest.raises(MiniLLMError, match=match):
            list(session.turn("hi"))
