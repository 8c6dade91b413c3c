"""Tests for minillm.formats.tokenizer, on tiny tokenizers trained here from seeded pseudo-English.

Tokenizer shapes, built in-process (well under a second):
- "bytelevel":  a GPT-NeoX-style byte-level BPE tokenizer.json (no post-processor: no BOS),
- "llama_json": a Llama-style tokenizer.json (▁ metaspace, byte fallback, Strip decoder, and a
                TemplateProcessing post-processor that adds <s>),
- "sp":         a sentencepiece tokenizer.model with byte fallback, as the original Llama ships,
                with `add_bos_token: true` in tokenizer_config.json ("sp_nobos": without it).
Every one is checked against transformers' AutoTokenizer on the same files (the oracle), and so
are the tokenizers shipped in weights/.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

from minillm.errors import MiniLLMError
from minillm.formats.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from tiny_ckpt import training_text

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"

# Characters the tokenizers have seen (é, —, “”) and ones they have not (emoji, CJK, Greek),
# so byte-level tokens and byte-fallback pieces split multi-byte UTF-8 across ids.
SAMPLES = [
    "Hello world",
    " leading space, and  two  spaces",
    "Café naïve — “quoted” text",
    "emoji 🙂👍🏽 and 🦀x",
    "日本語の文章と漢字 Ελληνικά",
    "line one\nline two\n\ttabbed",
    "",
]
TRAIN_EXTRA = "Café naïve — “quoted”"


@pytest.fixture(scope="module")
def lines() -> list[str]:
    text = training_text(50_000, seed=3)
    return [line for line in text.splitlines() if line.strip()] + [TRAIN_EXTRA] * 3


@pytest.fixture(scope="module")
def bytelevel(lines):
    """A byte-level BPE `tokenizers.Tokenizer` with <unk>=0, <s>=1, </s>=2 and no post-processor."""
    from tokenizers import Tokenizer as Tk
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = Tk(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(lines, trainer)
    return tk


def _train_sp(lines: list[str], model_type: str) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        vocab_size=400,
        model_type=model_type,
        byte_fallback=True,
        # Llama's settings: no normalization, keep repeated spaces, add the dummy "▁" prefix.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return buf.getvalue()


@pytest.fixture(scope="module")
def sp_model(lines) -> bytes:
    return _train_sp(lines, "bpe")


@pytest.fixture(scope="module")
def llama_json(lines):
    """A tokenizer.json shaped like Llama-2's, built from a sentencepiece unigram vocabulary."""
    import sentencepiece as spm
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Tk
    from tokenizers import decoders, models, normalizers, processors

    sp = spm.SentencePieceProcessor(model_proto=_train_sp(lines, "unigram"))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tk = Tk(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tk.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    tk.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    specials = ("<unk>", "<s>", "</s>")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tk


def _model_dir(path: Path, *, tk=None, sp: bytes | None = None, **configs) -> Path:
    """Write tokenizer.json (from a tokenizers.Tokenizer) / tokenizer.model and JSON configs."""
    path.mkdir(parents=True, exist_ok=True)
    if tk is not None:
        tk.save(str(path / "tokenizer.json"))
    if sp is not None:
        (path / "tokenizer.model").write_bytes(sp)
    for name, data in configs.items():
        (path / f"{name}.json").write_text(json.dumps(data))
    return path


TOK_CFG = {"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True,
                                             "lstrip": False, "rstrip": False, "normalized": False, "single_word": False}}
SP_CFG = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
ADDS_BOS = {"bytelevel": False, "llama_json": True, "sp": True, "sp_nobos": False}


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory, bytelevel, llama_json, sp_model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    return {
        "bytelevel": _model_dir(root / "bl", tk=bytelevel, tokenizer_config=TOK_CFG),
        "llama_json": _model_dir(root / "lj", tk=llama_json, tokenizer_config=TOK_CFG),
        "sp": _model_dir(root / "sp", sp=sp_model, tokenizer_config={**SP_CFG, "add_bos_token": True}),
        "sp_nobos": _model_dir(root / "spn", sp=sp_model, tokenizer_config=SP_CFG),
    }


@pytest.fixture(scope="module")
def toks(tok_dirs) -> dict[str, Tokenizer]:
    return {name: load_tokenizer(d) for name, d in tok_dirs.items()}


# --- BOS: as the tokenizer's own files say ------------------------------------------------------


@pytest.mark.parametrize("name", ["bytelevel", "llama_json", "sp", "sp_nobos"])
def test_bos_follows_the_tokenizer_files(toks, name):
    tok = toks[name]
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, frozenset({2}))
    assert tok.adds_bos is ADDS_BOS[name]
    for text in SAMPLES:
        plain = tok.encode(text, add_bos=False)
        assert 1 not in plain, (name, text)
        assert tok.encode(text) == ([1] if ADDS_BOS[name] else []) + plain, (name, text)
        assert tok.encode(text, add_bos=True) == [1, *plain]  # exactly one, whoever adds it
    assert tok.encode("", add_bos=False) == [] and tok.encode("", add_bos=True) == [1]


def test_post_processor_bos_is_not_doubled(toks, llama_json):
    # The Llama-style file adds <s> itself; add_bos=True does not add a second one.
    assert llama_json.encode("Hello").ids[0] == 1
    assert toks["llama_json"].encode("Hello", add_bos=True).count(1) == 1


def test_no_bos_anywhere(tmp_path, bytelevel):
    tok = load_tokenizer(_model_dir(tmp_path, tk=bytelevel))  # no configs: no BOS/EOS known
    assert tok.bos_id is None and tok.eos_ids == frozenset() and tok.eos_id is None
    raw = bytelevel.encode("Hello").ids
    assert tok.encode("Hello") == tok.encode("Hello", add_bos=False) == tok.encode("Hello", add_bos=True) == raw


def test_add_bos_must_be_a_bool_or_none(toks):
    with pytest.raises(MiniLLMError, match="add_bos must be True, False or None"):
        toks["sp"].encode("x", add_bos=1)


# --- parity with transformers' AutoTokenizer ----------------------------------------------------

SPECIAL_TEXTS = ["<s>hi</s> there", "hi</s>there", "a <s> b", "<unk>x", "x</s>", "</s> y",
                 "foo\n</s>\nbar", "<s><s>", "</s>", "line <sink> one"]


def _hf(d: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _random_texts(seed: int, n: int, specials: bool = True) -> list[str]:
    rng = random.Random(seed)
    pool = ALPHABET + [" the", "ship"] + (["<s>", "</s>"] if specials else [])
    return ["".join(rng.choice(pool) for _ in range(rng.randrange(1, 40))) for _ in range(n)]


@pytest.mark.parametrize("name", ["bytelevel", "llama_json", "sp", "sp_nobos"])
def test_encode_equals_transformers(toks, tok_dirs, name):
    tok, hf = toks[name], _hf(tok_dirs[name])
    texts = SAMPLES + SPECIAL_TEXTS + _random_texts(0, 150)
    if name.startswith("sp"):
        # The one known difference: transformers converts tokenizer.model into a `tokenizers` BPE
        # (merges rebuilt from the scores), which can split a text that *starts* with whitespace
        # differently from sentencepiece itself (see the next test). minillm keeps sentencepiece,
        # the model's own tokenizer.
        texts = [t for t in texts if t and not t[0].isspace()]
    for text in texts:
        assert tok.encode(text) == hf(text).input_ids, (name, text)
        assert tok.encode(text, add_bos=False) == hf(text, add_special_tokens=False).input_ids, (name, text)


def test_sentencepiece_leading_whitespace_is_sentencepiece(toks, tok_dirs):
    # Where the two disagree, minillm's ids are sentencepiece's own.
    tok = toks["sp_nobos"]
    sp = tok._backend.sp
    for text in [" leading space", "   ", "\tx", "  two"]:
        assert tok.encode(text) == sp.encode(text), text


@pytest.mark.parametrize("name", ["bytelevel", "llama_json", "sp"])
def test_decode_equals_transformers(toks, tok_dirs, name):
    tok, hf = toks[name], _hf(tok_dirs[name])
    for text in SAMPLES + _random_texts(1, 60, specials=False):
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == hf.decode(ids) == text, (name, text)
        with_bos = [1, *ids, 2]
        if name == "sp":  # sentencepiece renders control tokens as "": transformers' skip_special_tokens
            assert tok.decode(with_bos) == hf.decode(with_bos, skip_special_tokens=True), text
        else:
            assert tok.decode(with_bos) == hf.decode(with_bos), (name, text)


SHIPPED = sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("model", SHIPPED)
def test_shipped_tokenizers_equal_transformers_and_add_bos(model):
    # The shipped models were trained with BOS at position 0; their tokenizer files say so, and
    # transformers reads them the same way.
    tok, hf = load_tokenizer(WEIGHTS / model), _hf(WEIGHTS / model)
    assert tok.adds_bos and tok.bos_id is not None
    for text in SAMPLES[:-1] + _random_texts(2, 60) + ["It was a dark and stormy night; the rain fell."]:
        if tok.backend == "sentencepiece" and text[0].isspace():
            continue  # see test_encode_equals_transformers
        ids = tok.encode(text)
        assert ids == hf(text).input_ids, (model, text)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 + text.count("<s>"), (model, text)


# --- round trips and sentencepiece spaces -----------------------------------------------------


@pytest.mark.parametrize("name", ["bytelevel", "llama_json", "sp"])
def test_round_trip(toks, name):
    tok = toks[name]
    for text in SAMPLES:
        assert tok.decode(tok.encode(text, add_bos=False)) == text, (name, text)


def test_sentencepiece_word_boundaries(toks):
    import sentencepiece as spm

    tok = toks["sp"]
    ids = tok.encode("the cat sat", add_bos=False)
    pieces = [tok._backend.sp.id_to_piece(i) for i in ids]
    assert "".join(pieces).replace("▁", " ") == " the cat sat"  # dummy prefix, as Llama
    assert tok.decode(ids) == "the cat sat"  # ... which decode strips again
    # A word mid-text keeps its space when streamed as a continuation of a prompt.
    d = tok.decoder(start_of_text=False)
    cat = tok.encode("cat", add_bos=False)  # "▁cat": the dummy prefix is the word boundary
    assert "".join(d.push(i) for i in cat) + d.flush() == " cat"
    assert tok.decode([tok.bos_id, *ids]) == "the cat sat"  # control ids render as ""
    assert isinstance(tok._backend.sp, spm.SentencePieceProcessor)


# --- streaming detokenization -----------------------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int]) -> str:
    d = StreamDecoder(tok)
    out = []
    for i in ids:
        out.append(d.push(i))
        assert len(d.pending) < d.MAX_PENDING  # bounded work per token
    return "".join(out) + d.flush()


@pytest.mark.parametrize("name", ["bytelevel", "llama_json", "sp"])
def test_stream_decoder_matches_decode(toks, name):
    tok = toks[name]
    text = "\n".join(SAMPLES)
    ids = tok.encode(text)
    assert _stream(tok, ids) == tok.decode(ids)
    for t in SAMPLES:
        ids = tok.encode(t, add_bos=False)
        assert _stream(tok, ids) == tok.decode(ids) == t, (name, t)


ALPHABET = [*"abcdefgh ABC.,'\n\t", "  ", "é", "—", "“", "”", "🙂", "🦀", "👍🏽", "日", "本", "Ω"]


@pytest.mark.parametrize("name", ["bytelevel", "llama_json", "sp"])
def test_stream_decoder_random_texts(toks, name):
    # Random valid text (repeated spaces, split multi-byte characters) with BOS/EOS ids dropped
    # in anywhere: streaming reproduces decode exactly.
    tok = toks[name]
    rng = random.Random(0)
    for _ in range(40):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 30)))
        ids = tok.encode(text, add_bos=rng.random() < 0.5)
        # Specials go between characters (inside one, the bytes would be invalid UTF-8).
        cuts = [k for k in range(len(ids) + 1) if "\ufffd" not in tok.decode(ids[:k])]
        for k in sorted(rng.sample(cuts, min(len(cuts), rng.randrange(3))), reverse=True):
            ids.insert(k, rng.choice([1, 2]))
        assert _stream(tok, ids) == tok.decode(ids), (name, text, ids)


@pytest.mark.parametrize("name", ["bytelevel", "llama_json", "sp"])
def test_stream_decoder_garbage_is_bounded(toks, name):
    # Arbitrary ids (invalid UTF-8 byte runs): pending work stays bounded and text still flows.
    # (Exactness is only promised for valid UTF-8: invalid runs may get a different U+FFFD count.)
    tok = toks[name]
    rng = random.Random(1)
    byte_ids = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    assert byte_ids  # the vocabularies do split characters into bytes
    ids = [rng.choice(byte_ids) for _ in range(200)]
    assert _stream(tok, ids).count("\ufffd") > 0


def test_stream_decoder_emits_whole_characters(toks):
    tok = toks["bytelevel"]
    ids = tok.encode("🦀🦀", add_bos=False)
    assert len(ids) > 2  # the crab is split into byte tokens
    d = tok.decoder()
    outs = [d.push(i) for i in ids]
    assert all("\ufffd" not in o for o in outs) and "".join(outs) == "🦀🦀" and d.flush() == ""


# --- errors and special-id sources ------------------------------------------------------------


def test_missing_and_corrupt_files(tmp_path, sp_model):
    with pytest.raises(MiniLLMError, match="no tokenizer.json or tokenizer.model in"):
        load_tokenizer(_model_dir(tmp_path / "empty"))
    bad = _model_dir(tmp_path / "badjson")
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    with pytest.raises(MiniLLMError, match=r"cannot read tokenizer .*badjson.*\.json"):
        load_tokenizer(bad)
    bad_sp = _model_dir(tmp_path / "badsp")
    (bad_sp / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model")
    with pytest.raises(MiniLLMError, match=r"cannot read tokenizer .*tokenizer\.model"):
        load_tokenizer(bad_sp)
    with pytest.raises(MiniLLMError, match="model directory not found"):
        load_tokenizer(tmp_path / "nope")
    cfg = _model_dir(tmp_path / "badcfg", sp=sp_model)
    (cfg / "generation_config.json").write_text("{oops")
    with pytest.raises(MiniLLMError, match="generation_config.json"):
        load_tokenizer(cfg)


def test_special_id_sources(tmp_path, bytelevel, sp_model):
    # generation_config.json wins, and may list several EOS ids.
    d = _model_dir(
        tmp_path / "a",
        tk=bytelevel,
        generation_config={"bos_token_id": 2, "eos_token_id": [1, 0, 1]},
        tokenizer_config=TOK_CFG,
        config={"bos_token_id": 0, "eos_token_id": 0},
    )
    tok = load_tokenizer(d)
    assert tok.bos_id == 2 and tok.eos_id == 1 and tok.eos_ids == frozenset({0, 1})
    # config.json is the last resort before the sentencepiece model; a token string that is not
    # in the vocabulary is skipped.
    d = _model_dir(
        tmp_path / "b",
        sp=sp_model,
        tokenizer_config={"bos_token": "<nope>"},
        config={"bos_token_id": 5},
    )
    assert (load_tokenizer(d).bos_id, load_tokenizer(d).eos_id) == (5, 2)
    d = _model_dir(tmp_path / "c", tk=bytelevel, generation_config={"eos_token_id": 10**6})
    with pytest.raises(MiniLLMError, match="special token id 1000000 is not in the vocabulary"):
        load_tokenizer(d)


def test_prefers_tokenizer_json_and_reads_chat_template(tmp_path, bytelevel, sp_model):
    cfg = {**TOK_CFG, "chat_template": "{{ x }}"}
    d = _model_dir(tmp_path, tk=bytelevel, sp=sp_model, tokenizer_config=cfg)
    tok = load_tokenizer(d)
    assert tok.backend == "tokenizers" and tok.vocab_size == 600 and tok.chat_template == "{{ x }}"


def test_decode_rejects_bad_ids(toks):
    tok = toks["sp"]
    with pytest.raises(MiniLLMError, match="token id 400 is out of range"):
        tok.decode([5, 400])
    with pytest.raises(MiniLLMError, match="token id -1 is out of range"):
        toks["bytelevel"].decode([-1])
    with pytest.raises(MiniLLMError, match="encode expects a str"):
        tok.encode(b"bytes")
