"""Batched generation (issue 13): `generate_batch`, `ChatSessions` and `minillm batch`.

The oracle is always the same prompt (or conversation) run alone: each prompt's tokens from
`generate_batch` must be `generate`'s for it, with its own seed, and each conversation's fed ids
and replies in `ChatSessions` must be a lone `ChatSession`'s.

- greedy, float64: exact token equality (random tiny models of RoPE and ALiBi families, prompts
  longer than the cache, a sink-token checkpoint, more prompts than rows, EOS mid-way);
- greedy, float32: equality at every step whose top-2 margin (in the lone run) exceeds 1e-4, up to
  the first step that is closer (after it the two streams may rightly differ);
- sampling, float64: each prompt's seeded generator draws what `generate(seed=...)` draws;
- continuous batching: a finished row takes the next prompt at the next step, while the other rows
  go on; prefill calls feed only the admitted rows, decode calls one token per active row;
- the CLI end to end, with a malformed line reported by its line number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minillm
from minillm.apps.batching import Request, generate_batch, row_seed
from minillm.apps.chat import ChatSessions
from minillm.errors import MiniLLMError
from minillm.apps.chat import ChatSession
from minillm.apps.generation import generate
from minillm.apps.sampling import NonFiniteError
from tiny_ckpt import tiny_checkpoint  # noqa: F401  (fixture)
from util import random_model, tiny_config

REPO = Path(__file__).resolve().parents[1]
VOCAB = 61


def prompts_of(lengths, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def run_batch(model, prompts, **kw) -> tuple[dict[int, list[int]], dict[int, str], list]:
    """Tokens and stop reason per prompt index, and the events in order."""
    tokens, stops, events = {}, {}, []
    for ev in generate_batch(model, prompts, **kw):
        events.append(ev)
        assert ev.index not in stops, "an event after the prompt's last one"
        if ev.token is not None:
            tokens.setdefault(ev.index, []).append(ev.token)
        if ev.stop is not None:
            stops[ev.index] = ev.stop
    return tokens, stops, events


class Meter:
    """Wraps a model; records each streaming call's (width, lengths, logits shape), and the last
    row-0 logits it returned (what a lone run samples its next token from)."""

    def __init__(self, model):
        self.model, self.calls, self.last = model, [], None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, cache=None, lengths=None, **kw):
        out = self.model(ids, cache=cache, lengths=lengths, **kw)
        self.calls.append((ids.shape[1], None if lengths is None else list(lengths), tuple(out.shape)))
        self.last = out[0, -1].double()
        return out


# ------------------------------------------------------------------------------------------------
# generate_batch == generate, prompt by prompt


@pytest.mark.parametrize("variant", ["llama_gqa", "mpt", "falcon_rw", "gpt_neox_parallel"])
def test_batched_greedy_equals_generate_float64(variant):
    """7 prompts through 3 rows (refilled), lengths 1..40 through S = 12 (windowed prefill, in
    ragged chunks of 16 columns), different max_new_tokens, EOS mid-way for some."""
    model = random_model(tiny_config(variant), dtype=torch.float64, seed=1)
    model.max_chunk = 16
    prompts = prompts_of([5, 40, 1, 17, 9, 33, 3], seed=1)
    limits = [6, 14, 3, 20, 9, 11, 12]
    kw = dict(temperature=0, sinks=2, window=10)
    free = [list(generate(model, p, max_new_tokens=n, **kw)) for p, n in zip(prompts, limits)]
    eos = max(range(VOCAB), key=lambda t: sum(t in f[1:-1] for f in free))  # common mid-stream
    want = [list(generate(model, p, max_new_tokens=n, eos_ids={eos}, **kw)) for p, n in zip(prompts, limits)]
    meter = Meter(model)
    got, stops, _ = run_batch(meter, [Request(p, max_new_tokens=n) for p, n in zip(prompts, limits)],
                              batch_size=3, eos_ids={eos}, **kw)
    assert [got[i] for i in range(len(prompts))] == want
    assert [stops[i] for i in range(len(prompts))] == ["eos" if w[-1] == eos else "length" for w in want]
    assert "eos" in stops.values() and "length" in stops.values()
    assert max(c[2][1] for c in meter.calls) == 1  # never more than one position's logits
    assert max(c[0] for c in meter.calls) <= 16  # the prefill went in chunks


def test_sink_token_prefix_and_more_rows_than_prompts():
    model = random_model(tiny_config("llama_mha", sink_token_id=9), dtype=torch.float64, seed=2)
    prompts = prompts_of([4, 25, 2], seed=2)
    kw = dict(temperature=0, sinks=2, window=6, max_new_tokens=8)
    got, _, _ = run_batch(model, prompts, batch_size=16, **kw)  # 3 rows are enough: 3 are made
    assert [got[i] for i in range(3)] == [list(generate(model, p, **kw)) for p in prompts]


def test_batched_greedy_float32_margin_rule():
    """float32: batched and lone rows round differently, so equality is asked only where the
    lone run's top-2 margin exceeds 1e-4, up to the first step that is not (then they may part)."""
    model = random_model(tiny_config("llama_gqa", layers=3), dtype=torch.float32, seed=3)
    prompts = prompts_of([3, 30, 12, 7, 21, 50], seed=3)
    kw = dict(temperature=0, sinks=4, window=20, max_new_tokens=25)
    got, _, _ = run_batch(model, prompts, batch_size=4, **kw)
    compared = 0
    for i, p in enumerate(prompts):
        meter = Meter(model)
        for k, token in enumerate(generate(meter, p, **kw)):
            top = torch.topk(meter.last, 2).values
            if float(top[0] - top[1]) <= 1e-4:
                break
            assert got[i][k] == token, (i, k)
            compared += 1
        else:
            assert len(got[i]) == len(list(generate(model, p, **kw)))
    assert compared > 0.8 * len(prompts) * 25


def test_sampling_with_seeds_equals_generate_with_those_seeds():
    model = random_model(tiny_config("falcon_40b"), dtype=torch.float64, seed=4)
    prompts = prompts_of([6, 19, 2, 11, 30], seed=4)
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, sinks=1, window=9)
    reqs = list(prompts)
    reqs[3] = Request(prompts[3], seed=12345, temperature=1.3)  # its own seed and temperature
    got, _, _ = run_batch(model, reqs, batch_size=2, seed=7, max_new_tokens=15, **kw)
    for i, p in enumerate(prompts):
        seed, extra = (12345, dict(kw, temperature=1.3)) if i == 3 else (7 + i, kw)
        assert got[i] == list(generate(model, p, seed=seed, max_new_tokens=15, **extra)), i
    assert row_seed(2**64 - 1, 2) == 1  # seeds wrap past torch's largest


def test_continuous_batching_refills_a_row_at_once():
    """2 rows: prompt 0 stops after 2 tokens, prompt 1 runs 12; prompts 2, 3, 4 (3 tokens each)
    take row 0 one after another while prompt 1 is still generating in row 1."""
    model = Meter(random_model(tiny_config("llama_gqa"), dtype=torch.float64, seed=5))
    prompts = prompts_of([4, 6, 3, 8, 2], seed=5)
    limits = [2, 12, 3, 3, 3]
    _, stops, events = run_batch(model, [Request(p, max_new_tokens=n) for p, n in zip(prompts, limits)],
                                 batch_size=2, temperature=0, sinks=2, window=8)
    order = [ev.index for ev in events]
    last = {i: len(order) - 1 - order[::-1].index(i) for i in range(5)}
    first = {i: order.index(i) for i in range(5)}
    assert first[2] > last[0] and first[3] > last[2] and first[4] > last[3]  # row 0, refilled in turn
    assert first[4] < last[1]  # ... while row 1 still works on prompt 1
    assert stops == {i: "length" for i in range(5)}
    # Calls: one prefill per admission (only the admitted rows fed), decode steps of <= 1 per row.
    prefills = [c for c in model.calls if c[1] is not None and max(c[1]) > 1]
    decodes = [c for c in model.calls if c[1] is not None and max(c[1]) <= 1]
    assert [c[1] for c in prefills] == [[4, 6], [3, 0], [8, 0], [2, 0]]
    # Prompts 0, 2, 3, 4 all run inside prompt 1's 11 decode steps: no step is added for them,
    # and a row is idle (length 0) only for the step in which its prompt finished.
    assert [c[1] for c in decodes] == [[1, 1], [0, 1]] + [[1, 1], [1, 1], [0, 1]] * 3
    assert all(c[2] == (2, 1, VOCAB) for c in model.calls)


def test_lazy_prompts_zero_tokens_and_errors():
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float64, seed=6)
    seen = []

    def source():
        for i, p in enumerate(prompts_of([3, 4, 5, 6], seed=6)):
            seen.append(i)
            yield Request(p, max_new_tokens=0) if i == 1 else p

    gen = generate_batch(model, source(), batch_size=2, max_new_tokens=3, temperature=0)
    first = next(gen)
    # Read only as rows free up. Prompt 1 asks for no token: prefilled (as generate does), its
    # one event comes first, and its row is free for prompt 2 at the next step.
    assert seen == [0, 1] and first == (1, None, "length")
    events = [first] + list(gen)
    assert seen == [0, 1, 2, 3] and [e for e in events if e.index == 1] == [first]
    assert sorted({e.index for e in events}) == [0, 1, 2, 3]
    assert list(generate_batch(model, [], batch_size=4)) == []
    with pytest.raises(MiniLLMError, match="prompt 1: the prompt is empty"):
        list(generate_batch(model, [[1, 2], []], batch_size=1))
    with pytest.raises(MiniLLMError, match="prompt 0: .*out of range"):
        list(generate_batch(model, [[VOCAB]]))
    with pytest.raises(MiniLLMError, match="prompt 0: temperature"):
        list(generate_batch(model, [Request([1], temperature=-1)]))
    with pytest.raises(MiniLLMError, match="unknown setting 'top_q'"):
        Request([1], top_q=0.5)
    with pytest.raises(MiniLLMError, match="batch_size"):
        list(generate_batch(model, [[1]], batch_size=0))
    with pytest.raises(MiniLLMError, match="encode text"):
        list(generate_batch(model, "some text"))
    with pytest.raises(MiniLLMError, match="generate_batch runs many"):
        list(generate(model, [1], cache=model.new_cache(batch_size=2)))


def test_nonfinite_logits_name_the_prompt():
    model = random_model(tiny_config("llama_gqa"), dtype=torch.float32, seed=7)
    with torch.no_grad():
        model.embed.weight[50] = float("inf")  # only prompt 1 feeds token 50
    with pytest.raises(NonFiniteError, match=r"prompt 1: .*the prompt's last token .*the embedding"):
        list(generate_batch(model, [[1, 2, 3], [4, 50, 6]], temperature=0))


# ------------------------------------------------------------------------------------------------
# Chat sessions sharing one cache == each session alone

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class RowRecorder:
    """Wraps a model; records the ids every row of every cache is fed, per (cache, row)."""

    def __init__(self, model):
        self.model, self.fed = model, {}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, cache=None, lengths=None, **kw):
        for b in range(ids.shape[0]):
            n = ids.shape[1] if lengths is None else int(lengths[b])
            self.fed.setdefault((id(cache), b), []).extend(ids[b, :n].tolist())
        return self.model(ids, cache=cache, lengths=lengths, **kw)


def _chat_tokenizer(tiny_checkpoint, tmp_path, template: bool):
    if not template:
        return minillm.load_tokenizer(tiny_checkpoint)
    d = tmp_path / "chat"
    import shutil

    shutil.copytree(tiny_checkpoint, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                        "chat_template": TEMPLATE}))
    return minillm.load_tokenizer(d)


SCRIPT = [{0: "Hello there", 1: "the whale and the sea " * 6, 2: "Who are you?"},
          {1: "And then?", 2: "Tell me more about the ship"},
          {0: "What next", 2: "ok"},
          {0: "Bye", 1: "Bye now", 2: "the captain and the night " * 4}]


@pytest.mark.parametrize("template, temperature", [(False, 0), (True, 0), (True, 0.9)])
def test_chat_sessions_equal_sessions_alone(tiny_checkpoint, tmp_path, template, temperature):
    """3 conversations in one cache of 3 rows (S = 24: turns and histories far past it); each
    round some of them speak. Every session's replies and fed ids are those of the same
    conversation through a lone ChatSession (seed + i), greedy and sampled, float64."""
    tok = _chat_tokenizer(tiny_checkpoint, tmp_path, template)
    model = random_model(tiny_config("mpt", vocab=tok.vocab_size), dtype=torch.float64, seed=8)
    with torch.no_grad():  # make EOS likely enough that some replies end on it, others on the limit
        (model.embed if model.lm_head is None else model.lm_head).weight[tok.eos_id] *= 1.7
    rec = RowRecorder(model)
    kw = dict(sinks=2, window=22, max_new_tokens=7, temperature=temperature)
    chats = ChatSessions(rec, tok, 3, seed=5, **kw)
    got = {i: [] for i in range(3)}
    for texts in SCRIPT:
        replies = {i: "" for i in texts}
        for i, piece in chats.turns(texts):
            replies[i] += piece
        for i, r in replies.items():
            got[i].append(r)
    ended_on_eos = []
    for i in range(3):
        alone_rec = RowRecorder(model)
        alone = ChatSession(alone_rec, tok, seed=5 + i, **kw)
        want = []
        for texts in SCRIPT:
            if i in texts:
                want.append("".join(alone.turn(texts[i])))
                ended_on_eos.append(alone.unfed in alone.stop_ids)
        assert got[i] == want, i
        assert rec.fed[(id(chats.cache), i)] == alone_rec.fed[(id(alone.cache), 0)], i
        assert chats[i].messages == alone.messages and chats[i].turns == alone.turns
        assert int(chats.cache.tokens_seen[i]) == int(alone.cache.tokens_seen[0]) > 2 * 24
        # A session of the shared cache can also take a turn on its own, in its row.
        assert "".join(chats[i].turn("one more")) == "".join(alone.turn("one more"))
    assert any(ended_on_eos) and not all(ended_on_eos)  # replies ended on EOS and on max_new_tokens


def test_chat_sessions_errors_feed_nothing(tiny_checkpoint, tmp_path):
    tok = _chat_tokenizer(tiny_checkpoint, tmp_path, True)
    model = random_model(tiny_config("llama_gqa", vocab=tok.vocab_size), dtype=torch.float64, seed=9)
    chats = ChatSessions(model, tok, 2, window=30, max_new_tokens=3)
    list(chats.turns({0: "hi"}))
    before = chats.cache.tokens_seen.clone(), chats[0].prompt_text, chats[0].messages[:]
    with pytest.raises(MiniLLMError, match="a chat turn must be a string"):
        list(chats.turns({0: "fine", 1: 5}))
    assert torch.equal(chats.cache.tokens_seen, before[0])
    assert (chats[0].prompt_text, chats[0].messages) == before[1:]
    with pytest.raises(MiniLLMError, match="session index"):
        list(chats.turns({2: "x"}))
    other = ChatSession(model, tok, window=30)
    from minillm.apps.chat import chat_turns

    with pytest.raises(MiniLLMError, match="share one cache"):
        list(chat_turns({chats[0]: "a", other: "b"}))
    with pytest.raises(MiniLLMError, match="row"):
        ChatSession(model, tok, cache=chats.cache, row=2)


# ------------------------------------------------------------------------------------------------
# minillm batch

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "minillm", *map(str, args)], capture_output=True, text=True,
                          env=ENV, input=input, timeout=180, encoding="utf-8")


LINES = [json.dumps({"prompt": "The whale and the sea", "id": "first"}),
         json.dumps({"prompt": "It was a dark night", "max_new_tokens": 4, "seed": 99}),
         '{"prompt": "unterminated',
         "",
         json.dumps({"prompt": "Once upon a time", "temperature": 0, "id": [1, 2]}),
         json.dumps({"prompt": 17}),
         json.dumps({"prompt": "The captain said", "max_new_tokens": 30}),
         json.dumps({"prompt": "A ship", "seed": -1}),
         json.dumps({"prompt": "Call me", "max_new_tokens": 0})]


def test_cli_batch_jsonl_end_to_end(tiny_checkpoint, tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    p = cli("batch", tiny_checkpoint, "--input", src, "--output", out, "--batch-size", 2, "--max-new-tokens", 12,
            "--seed", 3, "--dtype", "float64", "--cache-size", 40, "--sinks", 2, "--threads", 1)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr  # malformed lines: exit 2, after the rest
    errors = [line for line in p.stderr.splitlines() if line.startswith("minillm: error:")]
    assert errors == [f"minillm: error: {src}:3: not valid JSON (Unterminated string starting at)",
                      f'minillm: error: {src}:6: "prompt" must be a string, got int',
                      f'minillm: error: {src}:8: "seed" must be an integer in [0, 2**64-1], got -1']
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 5, 6, 7, 8, 9]  # input order, blank line skipped
    assert [("error" in r) for r in records] == [False, False, True, False, True, False, True, False]
    assert records[0]["id"] == "first" and records[3]["id"] == [1, 2] and records[1]["id"] is None
    model = minillm.load(tiny_checkpoint, dtype=torch.float64)
    tok = minillm.load_tokenizer(tiny_checkpoint)
    for r in records:
        if "error" in r:
            continue
        spec = json.loads(LINES[r["line"] - 1])
        assert r["prompt"] == spec["prompt"]
        n = spec.get("max_new_tokens", 12)
        tokens = list(generate(model, tok.encode(spec["prompt"]), max_new_tokens=n, sinks=2, window=38,
                               temperature=spec.get("temperature", 0.8), seed=spec.get("seed", 3 + r["line"] - 1),
                               eos_ids=tok.eos_ids, vocab_size=tok.vocab_size))
        stop = "eos" if tokens and tokens[-1] in tok.eos_ids else "length"
        tokens = tokens[:-1] if stop == "eos" else tokens
        dec = tok.decoder(start_of_text=False)
        assert r["text"] == "".join(dec.push(t) for t in tokens) + dec.flush(), r
        assert (r["tokens"], r["stop"]) == (len(tokens), stop)
    assert records[-1]["tokens"] == 0 and records[-1]["text"] == ""
    assert "minillm: 5 of 5 prompts" in p.stderr and "3 malformed line(s)" in p.stderr


@pytest.mark.parametrize("line, message", [
    ("[1, 2]", "expected an object"), ('"text"', "expected an object"), ("{", "not valid JSON"),
    ('{"prompt": NaN}', "not valid JSON (NaN is not a JSON number)"), ('{"id": 1}', 'no "prompt"'),
    ('{"prompt": null}', '"prompt" must be a string, got NoneType'), ('{"prompt": ""}', "the prompt is empty"),
    ('{"prompt": "a\\ud800b"}', "lone surrogate U+D800 at character 1"),
    ('{"prompt": "a", "max_new_tokens": -2}', '"max_new_tokens" must be an integer >= -1, got -2'),
    ('{"prompt": "a", "max_new_tokens": true}', '"max_new_tokens" must be an integer >= -1, got true'),
    ('{"prompt": "a", "max_new_tokens": 1.5}', "got 1.5"),
    ('{"prompt": "a", "seed": 18446744073709551616}', '"seed" must be an integer in [0, 2**64-1]'),
    ('{"prompt": "a", "seed": "7"}', 'got "7"'),
    ('{"prompt": "a", "temperature": -1}', '"temperature" must be a number >= 0'),
    ('{"prompt": "a", "temperature": 1e999}', "got Infinity"),
    ('{"prompt": "a", "temperature": "hot"}', 'got "hot"'),
    # issue 20: deep nesting (RecursionError before), huge integers (advised set_int_max_str_digits), twice a key
    ("[" * 100_000, "JSON nested 100000 levels deep (at most 100)"),
    ('{"prompt": "a", "id": ' + "[" * 5000 + "]" * 5000 + "}", "JSON nested 5001 levels deep"),
    ('{"prompt": "a", "seed": ' + "9" * 5000 + "}", "the number at seed has 5000 digits"),
    ('{"prompt": "a", "prompt": "b"}', "the key 'prompt' appears twice"),
])
def test_malformed_lines_are_named(line, message):
    from minillm.cli.jsonl import parse_prompt_line

    with pytest.raises(MiniLLMError) as info:
        parse_prompt_line(line, "in.jsonl:4")
    assert str(info.value).startswith("in.jsonl:4: ") and message in str(info.value), str(info.value)


def test_well_formed_line():
    from minillm.cli.jsonl import parse_prompt_line

    got = parse_prompt_line('{"prompt": "caf\\u00e9", "max_new_tokens": -1, "seed": 5, "temperature": 0, '
                            '"id": {"k": 1}, "note": "x"}', "w")
    assert got == {"prompt": "café", "max_new_tokens": -1, "seed": 5, "temperature": 0, "id": {"k": 1},
                   "unknown": ["note"]}


def test_cli_batch_stdin_stdout_and_refusals(tiny_checkpoint, tmp_path, capsys):
    text = "\n".join(json.dumps({"prompt": w, "max_new_tokens": 3}) for w in ["a", "the sea", "b"]) + "\n"
    p = cli("batch", tiny_checkpoint, "--input", "-", "--batch-size", 2, "--temperature", 0, "--threads", 1,
            input=text)
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["line"] for line in p.stdout.splitlines()] == [1, 2, 3]
    src = tmp_path / "in.jsonl"
    src.write_text(text, encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text("\n \n", encoding="utf-8")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "café"}\n'.encode("latin-1"))
    from minillm import cli as cli_main

    for argv, message in [(["--output", src], "is an input of this run"),
                          (["--output", tmp_path], "is a directory"),
                          (["--batch-size", "0"], "--batch-size: must be >= 1"),
                          (["--batch-size", str(10**9), "--cache-size", str(10**9)],
                           "--batch-size 3 --cache-size 1000000000: a KV cache of 3 x 1000000000 keys needs"),
                          (["--input", tmp_path / "blank.jsonl"], "has no text"),
                          (["--input", tmp_path / "latin1.jsonl"], "is not UTF-8 text (byte 0xe9 at offset 15")]:
        code = cli_main.main(["batch", str(tiny_checkpoint), "--input", str(src), *map(str, argv)])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("minillm: error") == 1, (argv, err)


def test_batch_deeply_nested_line_is_an_error_record(tiny_checkpoint, tmp_path, capsys):
    # Issue 20: 100,000 nested '[' on one line raised RecursionError; it is that line's error record.
    from minillm import cli as cli_main

    src = tmp_path / "deep.jsonl"
    src.write_text('{"prompt": "a", "max_new_tokens": 1}\n' + "[" * 100_000 + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    code = cli_main.main(["batch", str(tiny_checkpoint), "--input", str(src), "--output", str(out), "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert f"minillm: error: {src}:2: JSON nested 100000 levels deep (at most 100)" in err.splitlines()
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records[0]["line"] == 1 and "error" not in records[0]
    assert records[1] == {"line": 2, "id": None, "error": f"{src}:2: JSON nested 100000 levels deep (at most 100)"}
