"""GGUF files (llama.cpp's format): a config, dequantized tensors under Hugging Face names, a tokenizer.

A GGUF file holds everything a checkpoint directory holds, in one file: the hyper-parameters and
the tokenizer as metadata under llama.cpp's key names, and the weights, often quantized. minillm
turns each part into what the rest of the engine already reads, so nothing downstream knows the
file was a GGUF:
- the metadata becomes a `config.json`-shaped dict, parsed by the family's own parser (same range
  checks, same refusals, unknown keys warned about);
- each tensor is dequantized by ggml's own reference code (the `gguf` package's `dequantize`) into
  the requested dtype, renamed to its Hugging Face name, and llama.cpp's Q/K row permutation is
  undone; the strict loader in `checkpoint.py` then checks every name and shape as for safetensors;
- the vocabulary, merges, token types and special ids become a `tokenizers` tokenizer.

The file is read with the `gguf` package (`pip install gguf`, the `minillm-sinks[gguf]` extra), never by hand. All the
name and key mappings below are data.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import MiniLLMError, first_line
from .config import ConfigWarning

# ----------------------------------------------------------------------------------------------
# The mappings, per GGUF architecture (`general.architecture`).

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        # "{arch}.<key>" metadata -> config.json key
        "config": {
            "block_count": "num_hidden_layers",
            "context_length": "max_position_embeddings",
            "embedding_length": "hidden_size",
            "feed_forward_length": "intermediate_size",
            "attention.head_count": "num_attention_heads",
            "attention.head_count_kv": "num_key_value_heads",
            "attention.key_length": "head_dim",
            "rope.freq_base": "rope_theta",
            "attention.layer_norm_rms_epsilon": "rms_norm_eps",
            "vocab_size": "vocab_size",
        },
        # Metadata that cannot change the forward pass once the above is read.
        "neutral": {"attention.value_length", "rope.dimension_count"},
        # Metadata that changes it and is refused unless it holds one of these values.
        "refused": {
            "rope.scaling.type": ("none",),
            "rope.scaling.factor": (1.0, 0.0),
            "expert_count": (0,),
            "expert_used_count": (0,),
            "attention.sliding_window": (0,),
        },
        # GGUF tensor name -> Hugging Face name ({i}: the block)
        "tensors": {
            "token_embd.weight": "model.embed_tokens.weight",
            "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight",
            "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
            "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
            "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
            "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
            "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
            "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
            "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
            "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
            "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
        },
        # Tensors whose rows llama.cpp's converter permuted, and the config key of their head count.
        "permuted": {
            "blk.{i}.attn_q.weight": "num_attention_heads",
            "blk.{i}.attn_k.weight": "num_key_value_heads",
        },
        # Tensors read only to check that they change nothing: llama.cpp stores Llama-3.1's rope
        # scaling as per-dimension divisors in rope_freqs.weight (with no rope.scaling metadata).
        "neutral_tensors": {"rope_freqs.weight": 1.0},
        "ignored": (),
    },
}

# llama.cpp's `tokenizer.ggml.pre` names the pre-tokenizer its merges were learned with.
# Each entry is a `tokenizers` pre_tokenizer description (JSON), as a tokenizer.json would hold.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, dict] = {
    "default": _BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
    # SmolLM, StarCoder: every digit on its own, then GPT-2's split (llama.cpp groups them so).
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "starcoder": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]},
}
PRE_TOKENIZERS["llama3"] = PRE_TOKENIZERS["llama-bpe"]
# Llama-3's tokenizer.json (and llama.cpp for these) looks a whole pre-token up in the vocabulary
# before merging, which can give a different split than the merges alone.
IGNORE_MERGES = {"llama-bpe", "llama3"}

# Whether llama.cpp adds a BOS when a file has no `tokenizer.ggml.add_bos_token`: for a byte-level
# BPE vocabulary (tokenizer.ggml.model "gpt2") it depends on the pre-tokenizer. llama.cpp's
# src/llama-vocab.cpp, `llama_vocab::impl::load`, starts from add_bos = false and sets it true only
# for the Llama-3 group ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", ...),
# "tekken" and "chameleon"; of the pre-tokenizers minillm reads, only these two are in that group.
# ("gpt2" here is minillm's alias of GPT-2's split; llama.cpp spells it "gpt-2", also false.)
ADD_BOS_DEFAULT: dict[str, bool] = {"default": False, "gpt2": False, "smollm": False, "starcoder": False,
                                    "llama-bpe": True, "llama3": True}

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


# ----------------------------------------------------------------------------------------------
# Reading the file.


_READER = None


def _reader_class():
    """The gguf package's GGUFReader, reading the header through a plain ndarray view of its
    memory map. The reader slices its `np.memmap` once per value (SmolLM2's 49k tokens and merges
    are ~250k slices), and each slice of a memmap subclass runs numpy's `__array_finalize__`
    hook: 8-10 s of a 12 s load. A plain view of the same mapping reads the same bytes in
    1.5-3 s; the tensors' data stays in the file's read-only mapping either way."""
    global _READER
    if _READER is None:
        import numpy as np
        from gguf import GGUFReader

        class Reader(GGUFReader):
            def _get(self, offset, dtype, count=1, override_order=None):
                plain = self.__dict__.get("_plain")
                if plain is None:
                    plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
                count = int(count)
                arr = plain[offset: offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
                return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

        _READER = Reader
    return _READER


class GGUFFile:
    """One open GGUF file: its metadata (`meta`, plain Python values) and its tensors."""

    def __init__(self, path: str | Path):
        from .reading import check_input, is_present

        self.path = Path(path)
        if not is_present(self.path):
            raise MiniLLMError(f"GGUF file not found: {self.path}")
        check_input(self.path, what="GGUF file")  # a FIFO would block the memory map forever
        try:
            reader = _reader_class()
        except ImportError:
            raise MiniLLMError('reading GGUF files needs the gguf package: pip install gguf (the "minillm-sinks[gguf]" extra)') from None
        try:
            self.reader = reader(str(self.path), "r")
        except Exception as e:  # truncated or corrupt: numpy/struct errors, an unknown tensor type, ...
            raise MiniLLMError(f"{self.path.name}: not a readable GGUF file ({first_line(e)})") from None
        self.meta: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.meta[key] = field.contents()
            except Exception as e:
                raise MiniLLMError(f"{self.path.name}: unreadable metadata {key} ({first_line(e)})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.architecture = self.meta.get("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise MiniLLMError(f"{self.path.name}: unsupported GGUF architecture {self.architecture!r} "
                               f"(minillm reads: {', '.join(sorted(ARCHITECTURES))})")
        self.spec = ARCHITECTURES[self.architecture]

    def hf_config(self) -> dict:
        """The metadata as a config.json dict for the family's parser (which range-checks it)."""
        arch, spec = self.architecture, self.spec
        prefix = f"{arch}."
        config: dict[str, Any] = {"model_type": spec["model_type"]}
        unknown = []
        for key, value in self.meta.items():
            if not key.startswith(prefix):
                continue  # general.* is bookkeeping; tokenizer.* is read by the tokenizer
            name = key[len(prefix):]
            if name in spec["config"]:
                config[spec["config"][name]] = value
            elif name in spec["refused"]:
                if value not in spec["refused"][name]:
                    raise MiniLLMError(f"{self.path.name}: unsupported option {key}={value!r} (it changes "
                                       "the forward pass; minillm does not implement it)")
            elif name not in spec["neutral"]:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{self.path.name}: ignoring unknown GGUF metadata {', '.join(map(repr, sorted(unknown)))}",
                          ConfigWarning, stacklevel=3)
        # Sizes the metadata states and the tensors show must agree, before anything is sized by them
        # (a lying embedding_length would otherwise be blamed on the rotary or head settings).
        for key, tensor, axis in (("embedding_length", "token_embd.weight", 0),
                                  ("feed_forward_length", "blk.0.ffn_up.weight", 1)):
            stated, t = self.meta.get(f"{arch}.{key}"), self.tensors.get(tensor)
            if isinstance(stated, int) and t is not None and len(t.shape) == 2 and int(t.shape[axis]) != stated:
                raise MiniLLMError(f"{self.path.name}: {arch}.{key} is {stated}, but {tensor} is "
                                   f"{' x '.join(str(int(n)) for n in reversed(t.shape.tolist()))}")
        tokens = self.meta.get("tokenizer.ggml.tokens")
        if "vocab_size" not in config and tokens is not None:
            config["vocab_size"] = len(tokens)
        hd = config.get("head_dim") or _div(config.get("hidden_size"), config.get("num_attention_heads"))
        rot = self.meta.get(f"{arch}.rope.dimension_count")
        if rot is not None and hd is not None and rot != hd:
            raise MiniLLMError(f"{self.path.name}: unsupported option {arch}.rope.dimension_count={rot} "
                               f"(partial rotary; head_dim is {hd})")
        config["tie_word_embeddings"] = "output.weight" not in self.tensors
        for ours, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
            if key in self.meta:
                config[ours] = self.meta[key]
        return config

    def tensor_names(self) -> dict[str, str]:
        """Hugging Face name -> GGUF name, for every tensor in the file (unknown ones refused)."""
        out = {}
        for name, value in self.spec["neutral_tensors"].items():
            if name in self.tensors:
                self._check_neutral_tensor(name, value)
        ignored = [re.compile(p) for p in self.spec["ignored"]] + [re.compile(re.escape(n)) for n in
                                                                  self.spec["neutral_tensors"]]
        patterns = [(re.compile(re.escape(g).replace(r"\{i\}", r"(\d+)") + "$"), g, h)
                    for g, h in self.spec["tensors"].items()]
        for name in self.tensors:
            if any(p.fullmatch(name) for p in ignored):
                continue
            for pattern, _, hf in patterns:
                m = pattern.match(name)
                if m:
                    out[hf.format(i=m.group(1)) if m.groups() else hf] = name
                    break
            else:
                raise MiniLLMError(f"{self.path.name}: unexpected tensor {name} (not part of a "
                                   f"{self.architecture} model minillm knows)")
        return out


    def _check_neutral_tensor(self, name: str, value: float) -> None:
        from gguf import GGMLQuantizationType, quants

        t = self.tensors[name]
        try:
            data = quants.dequantize(t.data, GGMLQuantizationType(int(t.tensor_type)))
        except (ValueError, NotImplementedError, KeyError) as e:
            raise MiniLLMError(f"{self.path.name}: cannot read tensor {name} ({first_line(e)})") from None
        if not (data == value).all():
            raise MiniLLMError(f"{self.path.name}: unsupported tensor {name} (per-dimension RoPE frequency "
                               "factors: Llama-3.1-style rope scaling, which minillm does not implement)")


_OPEN: dict[tuple, GGUFFile] = {}


def open_gguf(path: str | Path) -> GGUFFile:
    """A GGUFFile, read once per (path, size, mtime): the CLI loads a model and its tokenizer from
    one file, and parsing SmolLM2's metadata (49k tokens, 49k merges) takes seconds."""
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return GGUFFile(p)  # GGUFFile names the problem
    if key not in _OPEN:
        _OPEN.clear()  # one file at a time: a memory map each
        _OPEN[key] = GGUFFile(p)
    return _OPEN[key]


def _div(a, b):
    """a / b when both are integers and it is a whole number (else the family's parser names the cause)."""
    return a // b if isinstance(a, int) and isinstance(b, int) and b and not a % b else None


class GGUFTensors:
    """The checkpoint-tensor source for `checkpoint.load_tensors`: HF names, dequantized on demand."""

    def __init__(self, f: GGUFFile, config: dict, dtype: torch.dtype):
        self.file = f
        self.dtype = dtype
        self.config = config
        self.hf_to_gguf = f.tensor_names()
        self.declared_layers = f"{f.path.name}: {f.architecture}.block_count declares"
        permuted = {}
        for pattern, key in f.spec["permuted"].items():
            rx = re.compile(re.escape(pattern).replace(r"\{i\}", r"\d+") + "$")
            permuted[rx] = config[key] if config.get(key) is not None else config["num_attention_heads"]
        self.permuted = permuted

    def names(self) -> set[str]:
        return set(self.hf_to_gguf)

    def describe(self, hf_name: str) -> str:
        g = self.hf_to_gguf.get(hf_name)
        return f"{g} ({hf_name})" if g else hf_name

    # Slices, for a tensor-parallel shard (minillm/parallel/): only the rows, or the quantized
    # blocks that cover the columns, are dequantized (a block that straddles the boundary is
    # dequantized whole and trimmed).
    def shape(self, hf_name: str) -> tuple[int, ...]:
        t = self.file.tensors[self.hf_to_gguf[hf_name]]
        return tuple(int(n) for n in reversed(t.shape.tolist()))

    def get_rows(self, hf_name: str, start: int, stop: int) -> torch.Tensor:
        name = self.hf_to_gguf[hf_name]
        shape = self.shape(hf_name)
        data = self._dequantize(name, self.file.tensors[name].data[start:stop])
        w = self._float(data.reshape((stop - start,) + shape[1:]))
        for rx, heads in self.permuted.items():
            if rx.match(name):
                per_head = shape[0] // heads
                if start % per_head or stop % per_head:
                    raise MiniLLMError(f"{self.file.path.name}: rows {start}:{stop} of {name} split a head")
                w = unpermute_qk(w, (stop - start) // per_head)
        return w

    def get_cols(self, hf_name: str, start: int, stop: int) -> torch.Tensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        name = self.hf_to_gguf[hf_name]
        t = self.file.tensors[name]
        rows = self.shape(hf_name)[0]
        data = t.data.reshape(rows, -1)
        if data.dtype.itemsize == 1 and data.dtype.kind == "u":  # quantized: (rows, bytes) of whole blocks
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(int(t.tensor_type))]
            b0, b1 = start // block, -(-stop // block)
            out = self._dequantize(name, data[:, b0 * size : b1 * size]).reshape(rows, -1)
            out = out[:, start - b0 * block : stop - b0 * block]
        else:
            out = self._dequantize(name, data[:, start:stop]).reshape(rows, -1)
        return self._float(out)

    def _dequantize(self, name, data):
        import numpy as np
        from gguf import GGMLQuantizationType, quants

        t = self.file.tensors[name]
        try:
            return quants.dequantize(np.ascontiguousarray(data), GGMLQuantizationType(int(t.tensor_type)))
        except (ValueError, NotImplementedError, KeyError) as e:
            raise MiniLLMError(f"{self.file.path.name}: cannot dequantize tensor {name} of type "
                               f"{getattr(t.tensor_type, 'name', t.tensor_type)} ({first_line(e)})") from None

    def _float(self, data) -> torch.Tensor:
        return torch.from_numpy(data.astype("float32", copy=True)).to(self.dtype)

    def get(self, hf_name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType, quants

        name = self.hf_to_gguf[hf_name]
        t = self.file.tensors[name]
        try:
            qtype = GGMLQuantizationType(int(t.tensor_type))
            data = quants.dequantize(t.data, qtype)
        except (ValueError, NotImplementedError, KeyError) as e:
            raise MiniLLMError(f"{self.file.path.name}: cannot dequantize tensor {name} of type "
                               f"{getattr(t.tensor_type, 'name', t.tensor_type)} ({first_line(e)})") from None
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists dims fastest first
        if data.size != int(t.n_elements):
            raise MiniLLMError(f"{self.file.path.name}: tensor {name} holds {data.size} values, "
                               f"its header says {int(t.n_elements)}")
        # float32 is exact for every ggml type (each stores at most float32 precision); float64 widens
        # it exactly, and lower precisions round once.
        w = torch.from_numpy(data.reshape(shape).astype("float32", copy=True)).to(self.dtype)  # a copy: the file is mapped read-only
        for rx, heads in self.permuted.items():
            if rx.match(name):
                w = unpermute_qk(w, heads)
        return w


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of a Q or K projection's rows.

    llama.cpp rotates interleaved pairs (GPT-J style); to get that from Hugging Face's rotate-half
    layout its converter reorders each head's rows from [first half; second half] into pairs,
    (n_head, 2, hd/2) -> (n_head, hd/2, 2). This is the inverse."""
    out = w.shape[0]
    if out % n_head or (out // n_head) % 2:
        raise MiniLLMError(f"a Q/K projection with {out} rows cannot hold {n_head} heads of even size")
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# The tokenizer.


def tokenizer_json(f: GGUFFile) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer settings) from the file's metadata.

    Settings: bos/eos ids, add_bos, chat_template. Only byte-level BPE (`tokenizer.ggml.model`
    "gpt2") is built; sentencepiece vocabularies are refused by name."""
    import json

    m = f.meta
    kind = m.get("tokenizer.ggml.model")
    if kind is None:
        raise MiniLLMError(f"{f.path.name}: has no tokenizer (no tokenizer.ggml.model metadata)")
    if kind != "gpt2":
        raise MiniLLMError(f"{f.path.name}: unsupported GGUF tokenizer tokenizer.ggml.model={kind!r} "
                           "(minillm builds byte-level BPE, 'gpt2'; use the checkpoint's own tokenizer files)")
    tokens = m.get("tokenizer.ggml.tokens")
    merges = m.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise MiniLLMError(f"{f.path.name}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = m.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise MiniLLMError(f"{f.path.name}: {len(types)} token types for {len(tokens)} tokens")
    pre = m.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise MiniLLMError(f"{f.path.name}: unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} "
                           f"(minillm knows: {', '.join(sorted(PRE_TOKENIZERS))})")
    n = len(tokens)

    def special_id(key):
        v = m.get(f"tokenizer.ggml.{key}")
        if v is None:
            return None
        if not isinstance(v, int) or not 0 <= v < n:
            raise MiniLLMError(f"{f.path.name}: tokenizer.ggml.{key}={v!r} is not in the vocabulary of {n}")
        return v

    bos, eos = special_id("bos_token_id"), special_id("eos_token_id")
    eot = special_id("eot_token_id")

    def flag(key: str, default: bool = False) -> bool:
        v = m.get(f"tokenizer.ggml.{key}", default)
        if not isinstance(v, bool):
            raise MiniLLMError(f"{f.path.name}: tokenizer.ggml.{key} must be a bool, got {v!r}")
        return v

    # Without the key, llama.cpp's default for this pre-tokenizer (llama.cpp would then fall back
    # to BOS id 11 for a file that names none; minillm adds no BOS it has to guess).
    add_bos = flag("add_bos_token", ADD_BOS_DEFAULT[pre] and bos is not None)
    add_eos = flag("add_eos_token")
    for want, ok in (("add_bos_token", bos), ("add_eos_token", eos)):
        if flag(want) and ok is None:
            raise MiniLLMError(f"{f.path.name}: tokenizer.ggml.{want} is true but there is no "
                               f"{want.split('_')[1]}_token_id")
    bad = sorted({t for t in types if t not in range(TOKEN_NORMAL, TOKEN_BYTE + 1)})
    if bad:
        raise MiniLLMError(f"{f.path.name}: tokenizer.ggml.token_type has unknown type(s) {bad[:5]} "
                           f"(llama.cpp's are {TOKEN_NORMAL}..{TOKEN_BYTE})")
    template = m.get("tokenizer.chat_template")
    if template is not None and not isinstance(template, str):
        raise MiniLLMError(f"{f.path.name}: tokenizer.chat_template must be a string, got {type(template).__name__}")
    added = [{"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": ty == TOKEN_CONTROL}
             for i, (tok, ty) in enumerate(zip(tokens, types)) if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]
    post = None
    if add_bos or add_eos:  # what llama.cpp adds around a text, as a tokenizer.json says it
        head = [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}] if add_bos else []
        tail = [{"SpecialToken": {"id": tokens[eos], "type_id": 0}}] if add_eos else []
        a, b = [{"Sequence": {"id": "A", "type_id": 0}}], [{"Sequence": {"id": "B", "type_id": 1}}]
        specials = {tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]}
                    for i, on in ((bos, add_bos), (eos, add_eos)) if on}
        post = {"type": "TemplateProcessing", "single": head + a + tail, "pair": head + a + b + tail,
                "special_tokens": specials}
    merges_list = []
    for mg in merges:
        parts = mg.split(" ") if isinstance(mg, str) else None
        if not parts or len(parts) != 2 or not all(parts):
            raise MiniLLMError(f"{f.path.name}: malformed merge {mg!r} in tokenizer.ggml.merges (expected 'a b')")
        merges_list.append(parts)
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if len(vocab) != n:
        raise MiniLLMError(f"{f.path.name}: the vocabulary lists {n - len(vocab)} token(s) twice")
    doc = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": PRE_TOKENIZERS[pre], "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in IGNORE_MERGES, "vocab": vocab, "merges": merges_list},
    }
    settings = {"bos_id": bos, "eos_ids": [i for i in (eos, eot) if i is not None], "add_bos": add_bos,
                "chat_template": template,
                "bos_token": tokens[bos] if bos is not None else None,
                "eos_token": tokens[eos] if eos is not None else None}
    return json.dumps(doc, ensure_ascii=False), settings


# ----------------------------------------------------------------------------------------------
# The model.


def load_model(path: str | Path, dtype: torch.dtype, device: torch.device, *, strict: bool = False, build=None):
    """A GGUF file -> the model, dequantized into `dtype` and loaded as strictly as safetensors;
    `build` as in checkpoint.load_model (a tensor-parallel shard reads only its own slices)."""
    from .checkpoint import load_tensors
    from .families import from_hf_config

    f = open_gguf(path)
    with warnings.catch_warnings():
        if strict:
            warnings.simplefilter("error", ConfigWarning)
        try:
            hf = f.hf_config()
        except ConfigWarning as w:
            raise MiniLLMError(f"{w} (strict config checking is on)") from None
    try:
        config = from_hf_config(hf, where=f"{f.path.name} metadata", strict=strict)
    except MiniLLMError as e:  # name the file's own key, not the config.json key it was read into
        msg = str(e)
        for gguf_key, hf_key in f.spec["config"].items():
            msg = msg.replace(f"'{hf_key}'", f"'{f.architecture}.{gguf_key}'")
        raise MiniLLMError(msg) from None
    tokens = f.meta.get("tokenizer.ggml.tokens")
    embd = f.tensors.get("token_embd.weight")
    if tokens is not None and embd is not None and len(tokens) != int(embd.shape[-1]):
        raise MiniLLMError(f"{f.path.name}: the vocabulary has {len(tokens)} tokens but token_embd.weight "
                           f"has {int(embd.shape[-1])} rows")
    from .stops import gguf_stop_ids

    model = (build or load_tensors)(GGUFTensors(f, hf, dtype), config, dtype, device)
    model.eos_ids = gguf_stop_ids(f.meta, model.config.vocab_size)
    return model
