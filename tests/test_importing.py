"""The API as an importer meets it (issue 21): inference by default, stopping, chat templates,
text streaming, quantization twice, saved sessions and caches, packaging a model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import minillm
from minillm.errors import MiniLLMError
from util import random_model, tiny_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "weights" / "llama-tiny"


# ------------------------------------------------------------------------------------------------
# Inference by default: no autograd graph from a loaded model


@pytest.mark.parametrize("fast", [True, False])
def test_loaded_model_records_no_graph(fast):
    """The README's loop, without torch.no_grad(): no parameter asks for a gradient, so no step
    keeps a graph (which grew the process by ~390 MB per 1,000 decode steps)."""
    model = minillm.load(TINY, fast=fast)
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.is_grad_enabled()
    ids = torch.tensor([[1, 5, 9, 13]])
    assert model(ids).grad_fn is None
    cache = model.new_cache(1, sinks=2, window=6)
    logits = model(ids, cache=cache)
    for _ in range(3):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
        assert logits.grad_fn is None and not logits.requires_grad
    assert not cache.k.requires_grad and not cache.v.requires_grad


def test_random_models_are_for_inference_and_training_turns_gradients_on():
    model = random_model(tiny_config("llama_gqa"))
    assert not any(p.requires_grad for p in model.parameters())
    assert model(torch.tensor([[1, 2, 3]])).grad_fn is None
    model.requires_grad_(True)  # a trainer's explicit choice
    loss = model(torch.tensor([[1, 2, 3]])).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Stopping at the model's EOS and end-of-turn ids by default; stop strings

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _chatml_copy(tmp_path, name="pythia-tiny", eos=None) -> Path:
    """A shipped tiny model with <|im_start|>/<|im_end|> added and a ChatML template."""
    import json
    import shutil

    d = tmp_path / name
    shutil.copytree(ROOT / "weights" / name, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    # The vocabulary's last two tokens become the chat tokens (the embedding has no spare rows):
    # their strings, and the merges that make or use them, leave the BPE model.
    vocab = tj["model"]["vocab"]
    ids = sorted(vocab.values())[-2:]
    old = {t for t, i in vocab.items() if i in ids}
    for t in old:
        del vocab[t]
    merges = [m if isinstance(m, list) else m.split(" ") for m in tj["model"]["merges"]]
    tj["model"]["merges"] = [m for m in merges if "".join(m) not in old and not old & set(m)]
    for i, content in zip(ids, ["<|im_start|>", "<|im_end|>"]):
        tj["added_tokens"].append({"id": i, "content": content, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((d / "config.json").read_text())
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    if eos is not None:
        cfg["eos_token_id"] = eos
        (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_load_records_eos_and_end_of_turn_ids(tmp_path):
    assert minillm.load(TINY).eos_ids == {2}  # generation_config.json / config.json
    d = _chatml_copy(tmp_path, eos=[0, 7])
    tok = minillm.load_tokenizer(d)
    im_end = tok.token_to_id("<|im_end|>")
    model = minillm.load(d)
    assert im_end is not None and im_end in model.eos_ids and {0, 7} <= model.eos_ids
    assert im_end in tok.stop_ids


def test_gguf_stop_ids_from_metadata():
    from minillm.formats.stops import gguf_stop_ids

    meta = {"tokenizer.ggml.eos_token_id": 3, "tokenizer.ggml.eot_token_id": 5,
            "tokenizer.ggml.tokens": ["a", "b", "<|im_start|>", "</s>", "<|im_end|>", "<|eot_id|>"],
            "tokenizer.chat_template": CHATML}
    assert gguf_stop_ids(meta, 6) == {3, 4, 5}
    assert gguf_stop_ids({"tokenizer.ggml.eos_token_id": 99}, 6) == frozenset()  # not in the vocabulary


def test_generate_stops_at_the_models_eos_by_default():
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float64)
    free = list(minillm.generate(model, [1, 2, 3], max_new_tokens=12, temperature=0))
    assert len(free) == 12  # a bare Model states no EOS
    model.eos_ids = frozenset({free[4]})
    stopped = list(minillm.generate(model, [1, 2, 3], max_new_tokens=12, temperature=0))
    assert stopped == free[: free.index(free[4]) + 1]
    assert list(minillm.generate(model, [1, 2, 3], max_new_tokens=12, temperature=0, eos_ids=())) == free
    events = list(minillm.generate_batch(model, [[1, 2, 3]], max_new_tokens=12, temperature=0))
    assert [e.token for e in events] == stopped and events[-1].stop == "eos"


# ------------------------------------------------------------------------------------------------
# stream_generate


@pytest.fixture(scope="module")
def tiny64():
    return minillm.load(TINY, dtype=torch.float64), minillm.load_tokenizer(TINY)


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0.9, top_k=40, seed=3)])
def test_stream_generate_draws_generates_tokens(tiny64, settings):
    model, tok = tiny64
    prompt = "It was a dark and stormy night"
    want = list(minillm.generate(model, tok.encode(prompt), max_new_tokens=40, vocab_size=tok.vocab_size, **settings))
    for p in (prompt, tok.encode(prompt), torch.tensor([tok.encode(prompt)])):
        got = list(minillm.stream_generate(model, tok, p, max_new_tokens=40, **settings))
        assert [r.token for r in got] == want
    assert [r.finish_reason for r in got] == [None] * (len(got) - 1) + ["stop" if want[-1] in model.eos_ids else "length"]
    assert "".join(r.text for r in got) == tok._decode_mid_text(want[:-1] if want[-1] in model.eos_ids else want)
    assert all(r.logprob <= 0 for r in got) and got[-1].generation_tokens == len(want)
    if not settings.get("temperature"):  # greedy: the log-probability of the argmax, checked by hand
        cache = model.new_cache(1)
        logits = model(torch.tensor([tok.encode(prompt)]), cache=cache)[0, -1]
        assert abs(got[0].logprob - torch.log_softmax(logits[: tok.vocab_size], -1).max().item()) < 1e-12


def test_stop_strings_end_the_text_before_them_also_split_across_tokens(tiny64):
    model, tok = tiny64
    full = list(minillm.stream_generate(model, tok, "It was a dark and stormy night", max_new_tokens=40, temperature=0))
    text = "".join(r.text for r in full)
    pieces = [r.text for r in full]
    k = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and text.find(pieces[i][-2:] + pieces[i + 1][:2]) == len("".join(pieces[: i + 1])) - 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]  # split over tokens k and k + 1
    got = list(minillm.stream_generate(model, tok, "It was a dark and stormy night", max_new_tokens=40,
                                       temperature=0, stop=["never there", stop]))
    assert "".join(r.text for r in got) == text[: text.find(stop)]
    assert len(got) == k + 2 and got[-1].finish_reason == "stop"
    assert [r.token for r in got] == [r.token for r in full[: k + 2]]
    # a stop string that never comes: the whole text, held-back characters included
    none = list(minillm.stream_generate(model, tok, "It was a dark and stormy night", max_new_tokens=40,
                                        temperature=0, stop=text[-1] + "\x00"))
    assert "".join(r.text for r in none) == text and none[-1].finish_reason == full[-1].finish_reason
    with pytest.raises(MiniLLMError, match="stop"):
        list(minillm.stream_generate(model, tok, "x", stop=[""]))


def test_stop_text_semantics():
    from minillm.apps.stream import StopText

    s = StopText(["END", "xy"])
    assert [s.push(p) for p in ["ab", "cE", "N", "q", "E", "ND tail"]] == ["ab", "c", "", "ENq", "", ""]
    assert s.stopped


# ------------------------------------------------------------------------------------------------
# Chat templates in public, skip_special_tokens, ChatSession with messages and per-turn settings


def test_apply_chat_template_equals_transformers_on_a_shipped_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    d = _chatml_copy(tmp_path)
    tok, hf = minillm.load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for messages in ([{"role": "user", "content": "Hello there!"}],
                     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "  Why?  "}]):
        for gen in (True, False):
            want = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            want = want["input_ids"] if hasattr(want, "keys") else want  # a BatchEncoding in transformers 5
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == list(want)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == \
                hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    ids = tok.apply_chat_template(messages)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids) == hf.decode(ids)
    with pytest.raises(MiniLLMError, match="no chat template"):
        minillm.load_tokenizer(TINY).apply_chat_template(messages)


def test_apply_chat_template_equals_transformers_on_smollm2():
    transformers = pytest.importorskip("transformers")
    from test_smollm2 import _gguf_path

    gguf = _gguf_path()
    tok = minillm.load_tokenizer(gguf)
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want  # a BatchEncoding in transformers 5
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) == list(want)
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(want, skip_special_tokens=True) == hf.decode(want, skip_special_tokens=True)
    assert tok.token_to_id("<|im_end|>") in tok.stop_ids


def test_decode_skip_special_tokens_sentencepiece():
    tok = minillm.load_tokenizer(TINY)
    ids = tok.encode("It was a dark night") + [tok.eos_id]
    assert tok.decode(ids, skip_special_tokens=True) == "It was a dark night"
    with pytest.raises(MiniLLMError, match="skip_special_tokens"):
        tok.decode(ids, skip_special_tokens="yes")


def test_chat_session_takes_messages_and_per_turn_settings(tmp_path):
    d = _chatml_copy(tmp_path)
    model, tok = minillm.load(d), minillm.load_tokenizer(d)
    a = minillm.ChatSession(model, tok, temperature=0, max_new_tokens=30)
    b = minillm.ChatSession(model, tok, temperature=0, max_new_tokens=30, system="Be brief.")
    ra = "".join(a.turn("Hello!", max_new_tokens=3))
    rb = "".join(b.turn("Hello!", max_new_tokens=3))
    c = minillm.ChatSession(model, tok, temperature=0, max_new_tokens=30)
    rc = "".join(c.turn([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
                        max_new_tokens=3))
    assert rc == rb and c.messages == b.messages and c.prompt_text == b.prompt_text
    assert a.sampling["max_new_tokens"] == 30  # the constructor's setting stays
    assert len(tok.encode(ra, add_bos=False)) <= 3
    more = "".join(c.turn([*c.messages, {"role": "user", "content": "More?"}], temperature=0))
    assert more == "".join(b.turn("More?"))
    with pytest.raises(MiniLLMError, match="conversation so far"):
        list(c.turn([{"role": "user", "content": "not the history"}]))
    with pytest.raises(MiniLLMError, match="temperature"):
        list(c.turn("x", temperature=-1))


# ------------------------------------------------------------------------------------------------
# Quantization: once, is_quantized, load(quantize=, compile=)


def test_quantize_twice_is_refused_and_is_quantized():
    model = minillm.load(TINY)
    assert model.is_quantized is False
    minillm.quantize_int8(model)
    assert model.is_quantized is True
    with pytest.raises(MiniLLMError, match="already quantized"):
        minillm.quantize_int8(model)


def test_load_quantize_and_compile():
    model = minillm.load(TINY, quantize="int8", compile=True)
    assert model.is_quantized and model.fast.compiled_step is not None
    ref = minillm.load(TINY, quantize="int8")
    ids = [1, 5, 9, 13]
    assert list(minillm.generate(model, ids, max_new_tokens=4, temperature=0)) == \
        list(minillm.generate(ref, ids, max_new_tokens=4, temperature=0))
    for bad in (dict(quantize="int4"), dict(compile="yes"), dict(fast=False, quantize="int8")):
        with pytest.raises(MiniLLMError):
            minillm.load(TINY, **bad)


# ------------------------------------------------------------------------------------------------
# Which model a stream belongs to; saving caches and chats

SAVE_AND_CONTINUE = r"""
import sys, torch, minillm
mode, model_dir, path = sys.argv[1:4]
model = minillm.load(model_dir)
if mode == "save":
    cache = model.new_cache(2, sinks=2, window=10)
    model(torch.tensor([[1, 7, 9, 11, 13], [1, 8, 10, 12, 14]]), cache=cache)
    cache.save(path, rows=[1])
    alone = model.new_cache(1, sinks=2, window=10)  # the same stream in a cache of one row, never saved
    alone.import_row(0, cache.export_row(1))
    step = model(torch.tensor([[6]]), cache=alone)[0, -1]
else:
    try:
        cache = minillm.SinkCache.load(path, model)
    except minillm.MiniLLMError as e:
        print("refused:", e)
        raise SystemExit(0)
    step = model(torch.tensor([[6]]), cache=cache)[0, -1]
print("logits", step.double().sum().item().hex(), step.argmax().item())
"""


def _run(*args) -> str:
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", SAVE_AND_CONTINUE, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_same_weights_loaded_twice_are_one_model_and_other_weights_are_not():
    a, b = minillm.load(TINY), minillm.load(TINY)
    cache = a.new_cache(1, sinks=2, window=8)
    a(torch.tensor([[1, 5, 9]]), cache=cache)
    b(torch.tensor([[4]]), cache=cache)  # a twin may use it
    other = b.new_cache(1, sinks=2, window=8)
    other.import_row(0, cache.export_row(0))
    with torch.no_grad():
        b.norm.weight[0] += 1e-3  # an in-place change: now another model
    with pytest.raises(MiniLLMError, match="different model"):
        b(torch.tensor([[4]]), cache=cache)
    with pytest.raises(MiniLLMError, match="different model"):
        b.new_cache(1, sinks=2, window=8).import_row(0, cache.export_row(0))


def test_saved_cache_continues_bit_identically_in_a_new_process_and_only_for_its_model(tmp_path):
    path = tmp_path / "cache.safetensors"
    want = _run("save", TINY, path)
    assert _run("load", TINY, path) == want  # a new process, the same weights: the same next logits
    other = tmp_path / "other"
    model = minillm.load(TINY)
    with torch.no_grad():
        model.layers[0].mlp.w_out.weight[0, 0] += 0.5
    minillm.save_pretrained(model, other)
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        (other / name).write_bytes((TINY / name).read_bytes())
    refused = _run("load", other, path)
    assert refused.startswith("refused: load:") and "different model" in refused
    # no pickle: a plain safetensors file, its settings JSON in the header
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"k", "v", "raw_sink_k"} and '"tokens_seen": [5]' in f.metadata()["minillm"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_chat_session_save_and_load_continue_bit_identically(tmp_path):
    model, tok = minillm.load(TINY), minillm.load_tokenizer(TINY)
    chat = minillm.ChatSession(model, tok, window=30, seed=5, max_new_tokens=20)
    "".join(chat.turn("Hello"))
    chat.save(tmp_path / "chat.safetensors")
    want = "".join(chat.turn("And then?")), chat.messages, chat.prompt_text
    again = minillm.ChatSession.load(tmp_path / "chat.safetensors", minillm.load(TINY), tok)
    assert ("".join(again.turn("And then?")), again.messages, again.prompt_text) == want
    assert again.sampling == chat.sampling
    with pytest.raises(MiniLLMError, match="not a minillm.ChatSession file"):
        minillm.ChatSession.load(_saved_cache(tmp_path, model), model, tok)


def _saved_cache(tmp_path, model) -> Path:
    cache = model.new_cache(1, sinks=2, window=8)
    model(torch.tensor([[1, 5]]), cache=cache)
    cache.save(tmp_path / "c.safetensors")
    return tmp_path / "c.safetensors"


def test_row_state_is_public_and_frozen():
    import dataclasses

    assert dataclasses.is_dataclass(minillm.RowState) and minillm.RowState.__dataclass_params__.frozen


def test_a_directory_transformers_converted_from_a_gguf_loads(tmp_path):
    import json
    import shutil

    d = tmp_path / "converted"
    shutil.copytree(TINY, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gguf"}
    (d / "config.json").write_text(json.dumps(cfg))
    ids = torch.tensor([[1, 5, 9, 13]])
    assert torch.equal(minillm.load(d)(ids), minillm.load(TINY)(ids))
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MiniLLMError, match="quantization_config"):
        minillm.load(d)


# ------------------------------------------------------------------------------------------------
# Packaging a model with its tokenizer

TEXTS = ["It was a dark and stormy night", "  two spaces, <s> and </s> inside", "Ünïcödé ✓ 𝔘", "x\n\ny", ""]


def _same_tokenizer(a, b):
    for text in TEXTS:
        for bos in (None, True, False):
            assert a.encode(text, add_bos=bos) == b.encode(text, add_bos=bos), (text, bos)
        ids = a.encode(text)
        assert a.decode(ids) == b.decode(ids) and a.decode(ids, skip_special_tokens=True) == \
            b.decode(ids, skip_special_tokens=True)
    assert (a.bos_id, a.eos_ids, a.stop_ids, a.chat_template, a.template_tokens, a.vocab_size, a.adds_bos) == \
        (b.bos_id, b.eos_ids, b.stop_ids, b.chat_template, b.template_tokens, b.vocab_size, b.adds_bos)
    if a.chat_template:
        messages = [{"role": "user", "content": "Hello there!"}]
        assert a.apply_chat_template(messages, add_generation_prompt=True) == \
            b.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["llama-tiny", "pythia-tiny", "chatml"])
def test_save_pretrained_with_the_tokenizer_round_trips(tmp_path, name):
    src = _chatml_copy(tmp_path) if name == "chatml" else ROOT / "weights" / name
    model, tok = minillm.load(src), minillm.load_tokenizer(src)
    out = minillm.save_pretrained(model, tmp_path / "out", tokenizer=tok)
    _same_tokenizer(tok, minillm.load_tokenizer(out))
    again = minillm.load(out)
    assert again.eos_ids == model.eos_ids
    ids = torch.tensor([tok.encode("It was a dark and stormy night")])
    assert torch.equal(again(ids), model(ids))
    _same_tokenizer(tok, minillm.load_tokenizer(tok.save_pretrained(tmp_path / "tok-only")))
    with pytest.raises(MiniLLMError, match="tokenizer must be"):
        minillm.save_pretrained(model, tmp_path / "bad", tokenizer="weights/llama-tiny")


def test_a_gguf_tokenizer_saves_as_a_directory(tmp_path):
    from test_smollm2 import _gguf_path

    tok = minillm.load_tokenizer(_gguf_path())
    _same_tokenizer(tok, minillm.load_tokenizer(tok.save_pretrained(tmp_path / "smollm2-tok")))


# ------------------------------------------------------------------------------------------------
# A long conversation keeps a bounded history

NUMBERED = ("{% for m in messages %}{{ loop.index }}:{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}{{ messages | length + 1 }}:assistant:{% endif %}")


@pytest.mark.parametrize("template", ["chatml", "numbered"])
def test_history_is_trimmed_to_what_the_next_turn_needs(tmp_path, monkeypatch, template):
    import json

    d = _chatml_copy(tmp_path)
    if template == "numbered":  # every turn's rendering depends on the whole history: nothing may go
        tc = json.loads((d / "tokenizer_config.json").read_text())
        tc["chat_template"] = NUMBERED
        (d / "tokenizer_config.json").write_text(json.dumps(tc))
    model, tok = minillm.load(d), minillm.load_tokenizer(d)

    def run(trim: bool):
        if not trim:
            monkeypatch.setattr(minillm.ChatSession, "_trim", lambda self: None)
        chat = minillm.ChatSession(model, tok, temperature=0, max_new_tokens=3, window=60, system="Be brief.")
        replies, sizes = [], []
        for i in range(50):
            replies.append("".join(chat.turn(f"Turn {i}: tell me more.")))
            sizes.append(len(chat.prompt_text))
        monkeypatch.undo()
        return chat, replies, sizes

    trimmed, replies, sizes = run(True)
    full, want, full_sizes = run(False)
    assert replies == want  # the same conversation, token for token
    assert torch.equal(trimmed.cache.k, full.cache.k) and torch.equal(trimmed.cache.tokens_seen, full.cache.tokens_seen)
    if template == "chatml":
        assert len(trimmed.messages) == 3 and max(sizes[2:]) <= 2 * sizes[1] < full_sizes[-1] / 10
    else:
        assert len(trimmed.messages) == 101 and sizes == full_sizes
    # the whole conversation still continues it, as transformers users pass it
    conversation = [{"role": "system", "content": "Be brief."}]
    for i, r in enumerate(replies):
        conversation += [{"role": "user", "content": f"Turn {i}: tell me more."}, {"role": "assistant", "content": r}]
    assert "".join(trimmed.turn(conversation + [{"role": "user", "content": "Last."}])) == \
        "".join(full.turn("Last."))


# ------------------------------------------------------------------------------------------------
# torch.compile(model), as transformers users write it


def test_torch_compile_of_the_model_traces_the_dense_forward_whole_and_gives_the_same_logits():
    import torch._dynamo

    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(ids).graph_break_count == 0  # the validation no longer breaks it
    want = model(ids)
    got = torch.compile(model)(ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # streaming through a compiled model works too (with graph breaks; compile_decode is the fast path)
    compiled = torch.compile(model, backend="eager")
    caches = model.new_cache(1, sinks=2, window=6), model.new_cache(1, sinks=2, window=6)
    a, b = model(ids, cache=caches[0]), compiled(ids, cache=caches[1])
    for _ in range(6):
        assert torch.equal(a, b)
        step = a[:, -1:].argmax(-1)
        a, b = model(step, cache=caches[0]), compiled(step, cache=caches[1])
    with pytest.raises(MiniLLMError, match="out of range"):  # outside tracing, the check still runs
        model(torch.tensor([[10**6]]))
    torch._dynamo.reset()


def test_stream_generate_takes_chat_messages(tmp_path):
    d = _chatml_copy(tmp_path)
    model, tok = minillm.load(d), minillm.load_tokenizer(d)
    messages = [{"role": "user", "content": "Hello there!"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    got = [r.token for r in minillm.stream_generate(model, tok, messages, max_new_tokens=12, temperature=0)]
    assert got == list(minillm.generate(model, ids, max_new_tokens=12, temperature=0, vocab_size=tok.vocab_size))
    with pytest.raises(MiniLLMError, match="no chat template"):
        list(minillm.stream_generate(minillm.load(TINY), minillm.load_tokenizer(TINY), messages))
