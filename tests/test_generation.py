"""Sampling, streaming generation (prefill + decode through the fixed cache), and the chat loop."""

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

import minillm
from minillm.errors import MiniLLMError
from minillm.apps.chat import ChatSession, encode_continuation, render_chat_template
from minillm.apps.generation import generate, stream_tensor
from minillm.apps.sampling import sample
from minillm.reference import reference_stream
from tiny_ckpt import tiny_checkpoint  # noqa: F401  (fixture)
from util import Scripted, random_model, tiny_config


# ------------------------------------------------------------------------------------------------
# sample


def test_greedy_and_degenerate_filters_are_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    best = int(logits.argmax())
    assert sample(logits, temperature=0) == best
    for _ in range(5):
        assert sample(logits, temperature=1.0, top_k=1, top_p=None, generator=g) == best
        assert sample(logits, temperature=1.0, top_p=1e-6, generator=g) == best


def test_top_k_top_p_and_vocab_limit():
    g = torch.Generator().manual_seed(1)
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, 9.0])  # id 5 is padding past the tokenizer
    draws = [sample(logits, temperature=1.0, top_k=2, top_p=None, generator=g, vocab_size=5) for _ in range(200)]
    assert set(draws) == {0, 1}
    assert sample(logits, temperature=0, vocab_size=5) == 0
    # top_p: p = softmax([5, 4, 3, 0, -1]) = .66, .24, .09, ...: 0.8 keeps {0, 1}, 0.95 keeps {0, 1, 2}
    assert {sample(logits, top_p=0.8, temperature=1.0, generator=g, vocab_size=5) for _ in range(200)} == {0, 1}
    assert {sample(logits, top_p=0.95, temperature=1.0, generator=g, vocab_size=5) for _ in range(300)} == {0, 1, 2}


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    draws = [sample(logits, temperature=1.0, top_p=None, generator=torch.Generator().manual_seed(3)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    g = torch.Generator().manual_seed(4)
    counts = torch.bincount(torch.tensor([sample(logits, temperature=1.0, top_p=None, generator=g)
                                          for _ in range(3000)]), minlength=3) / 3000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)


@pytest.mark.parametrize("kw, message", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
])
def test_bad_sampling_arguments(kw, message):
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32)
    with pytest.raises(MiniLLMError, match=message):
        next(generate(model, [1, 2], **kw))


# ------------------------------------------------------------------------------------------------
# generate


@pytest.mark.parametrize("variant", ["llama_gqa", "mpt"])
def test_greedy_generation_follows_the_reference_stream(variant):
    """Every greedy token is the argmax of the paper's reference at that point, far past the cache."""
    model = random_model(tiny_config(variant), dtype=torch.float64, seed=2)
    prompt = torch.randint(0, 61, (25,), generator=torch.Generator().manual_seed(2)).tolist()
    out = list(generate(model, prompt, max_new_tokens=40, temperature=0, sinks=2, window=10))
    assert len(out) == 40
    ref = reference_stream(model, torch.tensor([prompt + out]), 2, 10)[0]
    assert ref[len(prompt) - 1 : -1].argmax(-1).tolist() == out


def test_stops_at_eos_unless_ignored():
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32, seed=3)
    free = list(generate(model, [1, 2, 3], max_new_tokens=30, temperature=0))
    eos = free[4]
    stopped = list(generate(model, [1, 2, 3], max_new_tokens=30, temperature=0, eos_ids={eos}))
    assert stopped == free[: free.index(eos) + 1]  # the EOS id is yielded, then it stops
    assert list(generate(model, [1, 2, 3], max_new_tokens=30, temperature=0, eos_ids={eos}, ignore_eos=True)) == free
    assert list(generate(model, [1, 2, 3], max_new_tokens=0)) == []


def test_endless_generation_has_constant_memory():
    model = random_model(tiny_config("falcon_40b"), dtype=torch.float32, seed=4)
    cache = model.new_cache(sinks=4, window=12)
    ptr, shape = cache.k.data_ptr(), cache.k.shape
    gen = generate(model, [5, 6, 7], max_new_tokens=None, cache=cache, seed=1)
    assert len(list(itertools.islice(gen, 300))) == 300
    assert cache.tokens_seen == 3 + 299  # the last yielded token is not fed yet
    assert cache.k.data_ptr() == ptr and cache.k.shape == shape


def test_prompt_longer_than_the_cache_and_sink_token():
    model = random_model(tiny_config("gpt_neox_parallel", sink_token_id=9), dtype=torch.float64, seed=5)
    prompt = list(range(10, 60))  # 50 tokens through a cache of 8
    out = list(generate(model, prompt, max_new_tokens=10, temperature=0, sinks=2, window=6))
    ref = reference_stream(model, torch.tensor([[9] + prompt + out]), 2, 6)[0]
    assert ref[len(prompt) : -1].argmax(-1).tolist() == out
    ids, n = stream_tensor(model, prompt)
    assert n == 1 and ids[0, 0].item() == 9


def test_empty_prompt_is_an_error():
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32)
    with pytest.raises(MiniLLMError, match="prompt is empty"):
        next(generate(model, []))
    with pytest.raises(MiniLLMError, match="out of range"):
        next(generate(model, [61]))


# ------------------------------------------------------------------------------------------------
# chat (Scripted, the stand-in model, is in tests/util.py)


TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_chat_template_feeds_exactly_the_rendered_conversation(tiny_checkpoint, tmp_path):
    d = tmp_path / "chat"
    shutil.copytree(tiny_checkpoint, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                        "chat_template": TEMPLATE}))
    tok = minillm.load_tokenizer(d)
    reply1 = tok.encode(" the sea", add_bos=False) + [tok.eos_id]  # ends with EOS
    reply2 = tok.encode(" a whale and", add_bos=False)  # cut by max_new_tokens
    model = Scripted(tok.vocab_size, reply1 + reply2 + [tok.eos_id])
    chat = ChatSession(model, tok, max_new_tokens=len(reply2), temperature=0)
    assert "".join(chat.turn("Hello")) == " the sea"
    assert "".join(chat.turn("More?")) == " a whale and"
    list(chat.turn("Bye"))
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": " the sea"},
                {"role": "user", "content": "More?"}, {"role": "assistant", "content": " a whale and"},
                {"role": "user", "content": "Bye"}]
    want = render_chat_template(TEMPLATE, messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert tok.decode(model.fed) == want
    assert model.fed[0] == tok.bos_id and model.fed.count(tok.bos_id) == 1
    assert chat.cache.tokens_seen == len(model.fed)


def test_chat_template_that_does_not_extend_itself_is_rendered_per_turn(tiny_checkpoint, tmp_path):
    d = tmp_path / "last-only"
    shutil.copytree(tiny_checkpoint, d)
    last_only = "{{ bos_token }}[{{ messages[-1].content }}]{% if add_generation_prompt %} =>{% endif %}"
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                        "chat_template": last_only}))
    tok = minillm.load_tokenizer(d)
    model = Scripted(tok.vocab_size, tok.encode(" yes", add_bos=False) + [tok.eos_id] * 2)
    chat = ChatSession(model, tok, temperature=0)
    assert "".join(chat.turn("one")) == " yes"
    list(chat.turn("two"))
    # The turn on its own, as the template renders it (its own BOS included: the template writes it).
    assert tok.decode(model.fed) == "<s>[one] => yes</s><s>[two] =>"


def test_plain_chat_format(tiny_checkpoint):
    tok = minillm.load_tokenizer(tiny_checkpoint)
    model = Scripted(tok.vocab_size, tok.encode(" hi", add_bos=False) + [tok.eos_id] * 2)
    chat = ChatSession(model, tok, temperature=0)
    assert "".join(chat.turn("a")) == " hi"
    list(chat.turn("b"))
    assert tok.decode(model.fed) == "<s>USER: a\nASSISTANT: hi</s>\nUSER: b\nASSISTANT:"


def test_sentencepiece_turns_get_no_spurious_space():
    """A later turn is encoded as a continuation: SentencePiece must not add its word space."""
    d = Path(__file__).resolve().parents[1] / "weights" / "llama-tiny"
    if not (d / "tokenizer.model").is_file():
        pytest.skip("weights/llama-tiny (a sentencepiece tokenizer) is not present")
    tok = minillm.load_tokenizer(d)
    assert tok.backend == "sentencepiece"
    model = Scripted(4096, encode_continuation(tok, " hi") + [tok.eos_id] * 2)
    chat = ChatSession(model, tok, temperature=0)
    list(chat.turn("a"))
    list(chat.turn("b"))
    assert tok.decode(model.fed) == "USER: a\nASSISTANT: hi\nUSER: b\nASSISTANT:"  # control ids decode to ""
    assert model.fed.count(tok.eos_id) == 1 and model.fed[0] == tok.bos_id


def test_long_conversation_over_a_small_cache(tiny_checkpoint):
    """One turn longer than S, and many turns: the cache keeps its shape and nothing fails."""
    model = minillm.load(tiny_checkpoint)
    tok = minillm.load_tokenizer(tiny_checkpoint)
    chat = ChatSession(model, tok, sinks=2, window=30, max_new_tokens=8, seed=1)
    ptr = chat.cache.k.data_ptr()
    long_turn = "the whale and the sea " * 20
    assert len(tok.encode(long_turn)) > 3 * chat.cache.capacity
    list(chat.turn(long_turn))
    for i in range(5):
        list(chat.turn(f"turn {i}"))
    assert chat.turns == 6 and chat.cache.tokens_seen > 5 * chat.cache.capacity
    assert chat.cache.k.data_ptr() == ptr


# ------------------------------------------------------------------------------------------------
# Long prompts, non-finite numbers, tiny temperatures (issue 11)


class LogitsMeter:
    """Wraps a model and records the shape of every logits tensor its forward returns."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.shapes.append(tuple(out.shape))
        return out


def test_a_long_prompt_never_materialises_its_logits():
    """Memory on a long prompt is the cache plus one chunk: no forward returns more than one
    position's logits, and the chunks are at most max_chunk long. Without the chunked prefill
    the prompt's forward returns (1, T, V)."""
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32)
    model.max_chunk = 64
    meter = LogitsMeter(model)
    prompt = torch.randint(0, 61, (1000,), generator=torch.Generator().manual_seed(3)).tolist()
    got = list(generate(meter, prompt, max_new_tokens=3, temperature=0, sinks=2, window=30))
    assert max(s[1] for s in meter.shapes) == 1 and len(meter.shapes) == -(-1000 // 64) + 2
    cache = model.new_cache(1, 2, 30)
    logits = model(torch.tensor([prompt]), cache=cache)[0, -1]  # the one-shot prefill, for reference
    assert got[0] == int(logits.argmax())
    chat = ChatSession(meter, FakeTok(), sinks=2, window=30, max_new_tokens=2, temperature=0)
    meter.shapes.clear()
    list(chat.turn("x" * 500))
    assert max(s[1] for s in meter.shapes) == 1


class FakeTok:
    """Characters as ids (a-z -> 1..26), enough for a ChatSession over a random model."""
    bos_id, eos_id, eos_ids, vocab_size, chat_template = 0, None, frozenset(), 61, None

    def encode(self, text, add_bos=True):
        return ([0] if add_bos else []) + [1 + (ord(c) % 26) for c in text]

    def decode(self, ids):
        return "".join(chr(96 + i) for i in ids)

    def decoder(self, start_of_text=True):
        tok = self

        class D:
            def push(self, i):
                return tok.decode([i])

            def flush(self):
                return ""
        return D()


def test_nonfinite_logits_stop_generation_naming_the_step_and_layer():
    from minillm.apps.sampling import NonFiniteError

    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32)
    with torch.no_grad():
        model.layers[1].mlp.w_out.weight[0, 0] = float("nan")  # (NaN in q is zeroed by CPU SDPA)
    for temperature in (0, 0.8, 1e-300):
        with pytest.raises(NonFiniteError, match=r"NaN logits at the prompt's last token .*layer 1"):
            list(generate(model, [1, 2, 3], max_new_tokens=4, temperature=temperature))
    # Non-finite only from the k-th step on: the message names that generation step.
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32)
    with pytest.raises(NonFiniteError, match=r"generation step 2 .*first non-finite output: the embedding"):
        gen = generate(model, [1, 2, 3], max_new_tokens=4, temperature=0)
        next(gen)
        model.embed.weight.data[:] = float("inf")  # the next step's token embeds to inf
        next(gen)


def test_tiny_and_huge_temperatures_sample_validly():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 10
    g = torch.Generator().manual_seed(1)
    for t in (1e-300, 5e-324, 1e-40):
        assert sample(logits, temperature=t, generator=g) == int(logits.argmax())
        assert sample(logits, temperature=t, top_k=3, top_p=None, generator=g) == int(logits.argmax())
    draws = {sample(logits, temperature=float("inf"), top_p=None, generator=g) for _ in range(300)}
    assert len(draws) > 30  # infinite temperature: uniform
    with pytest.raises(MiniLLMError, match="not all finite"):
        sample(torch.tensor([0.0, float("nan")]), temperature=0)


def test_sampling_parameters_at_the_edges_of_float32_and_float64():
    """Issue 20, category 8: a top_p below float32's smallest number (1e-300, 5e-324) rounds to 0
    and used to drop every token (multinomial crashed); the most likely token is always kept. top_k
    ranks by the logits, so an infinite temperature is uniform over the k most likely, not over all.
    float64 logits past float32's range are sampled in float64, not refused as non-finite."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3)) * 4
    best = int(logits.argmax())
    g = torch.Generator().manual_seed(0)
    for p in (1e-300, 5e-324, 1e-45, 1e-39):
        for t in (1.0, 1e-300, 1e38, float("inf")):
            assert sample(logits, temperature=t, top_p=p, generator=g) == best
        assert sample(logits, temperature=1.0, top_k=3, top_p=p, generator=g) == best
    top3 = set(torch.topk(logits, 3).indices.tolist())
    for t in (float("inf"), 1e38, 10**400):
        draws = {sample(logits, temperature=t, top_k=3, top_p=None, generator=g) for _ in range(200)}
        assert draws == top3
    # top_p at an infinite temperature keeps the most likely by the logits (ties of equal probabilities)
    draws = {sample(logits, temperature=float("inf"), top_p=0.09, generator=g) for _ in range(200)}
    assert draws == set(torch.topk(logits, 5).indices.tolist())
    for k in (2**63, 10**30, 50, 51):
        assert 0 <= sample(logits, temperature=1.0, top_k=k, generator=g) < 50
    big = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 1e300
    assert sample(big, temperature=1.0, generator=g) == int(big.argmax())
    assert sample(big, temperature=0.5, top_k=2, top_p=1e-300, generator=g) == int(big.argmax())
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float64, seed=7)
    greedy = list(generate(model, [1, 2, 3], max_new_tokens=6, temperature=0))
    assert list(generate(model, [1, 2, 3], max_new_tokens=6, temperature=0.7, top_p=1e-300)) == greedy
    assert list(generate(model, [1, 2, 3], max_new_tokens=6, temperature=-0.0)) == greedy
