"""The serving engine (issue 25, part 0): `minillm.Engine`.

The oracle is always the request run alone: a prompt's tokens are `generate`'s for it (its text
`stream_generate`'s), and a conversation's replies are a lone `ChatSession`'s turn by turn, with
its generator seeded with the request's seed at the start of each turn. Models are float64 (a
random tiny llama with the shipped tokenizer's 4,096 ids), so that equal computations in
different batch shapes and chunkings cannot flip a token.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minillm
from minillm.apps.chat import ChatSession
from minillm.apps.engine import Engine, EngineClosed, QueueFull, SessionBusy
from minillm.apps.generation import generate
from minillm.apps.stream import stream_generate
from minillm.errors import MiniLLMError
from util import random_model, tiny_config

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
TEMPLATE = ("{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] + '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")
USERS = ["Hello there!", "Tell me about cats.", "And dogs?", "Why is the sky blue?", "Bye now."]


def make_model(seed: int = 0):
    return random_model(tiny_config("llama_gqa", vocab=4096, layers=2), seed=seed)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def tok():
    t = minillm.load_tokenizer(WEIGHTS / "llama-tiny")
    t.chat_template = TEMPLATE
    return t


def alone(model, tok, ids, *, max_tokens, temperature=0.0, seed=0, sinks=2, window=16):
    eos = frozenset(model.eos_ids) | tok.stop_ids
    return list(generate(model, ids, max_new_tokens=max_tokens, temperature=temperature, top_p=0.9, seed=seed,
                         sinks=sinks, window=window, eos_ids=eos, vocab_size=tok.vocab_size))


def run_clients(client, n: int, timeout: float) -> None:
    """client(0) .. client(n - 1), each in its own thread, all at once; joined (up to `timeout` s each)."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)


def run(eng, rid):
    evs = list(eng.stream(rid))
    return "".join(e.text for e in evs), evs


# ----------------------------------------------------------------------------------------------
# Requests: each equals itself alone


@settings(max_examples=6)
@given(st.data())
def test_each_request_equals_it_alone(model, tok, data):
    """Random prompts, arrival steps, max_tokens, sampling and cancels, through 2 or 3 rows with
    a small prefill budget: each request's tokens are those it draws alone (a cancelled one's are
    a prefix of them)."""
    B = data.draw(st.integers(2, 3), label="batch_size")
    eng = Engine(model, tok, batch_size=B, sinks=2, window=16, max_prefill_tokens=data.draw(st.integers(3, 12)),
                 max_queue=16)
    n = data.draw(st.integers(2, 5), label="requests")
    reqs = []
    for i in range(n):
        reqs.append(dict(ids=data.draw(st.lists(st.integers(3, 4095), min_size=1, max_size=30)),
                         max_tokens=data.draw(st.integers(0, 6)), temperature=data.draw(st.sampled_from([0.0, 0.9])),
                         seed=i, arrive=data.draw(st.integers(0, 4)),
                         cancel=data.draw(st.one_of(st.none(), st.integers(0, 6)))))
    rids, got, finish, step = {}, {}, {}, 0
    while step < 200 and (len(finish) < n):
        for i, r in enumerate(reqs):
            if r["arrive"] == step:
                rids[eng.add_request(r["ids"], max_tokens=r["max_tokens"], temperature=r["temperature"],
                                     top_p=0.9, seed=r["seed"], buffer=False)] = i
            if r["cancel"] is not None and r["arrive"] + r["cancel"] == step and i in rids.values():
                eng.cancel(next(k for k, v in rids.items() if v == i))
        for ev in eng.step():
            i = rids[ev.rid]
            assert i not in finish, "an event after the request's last one"
            if ev.token is not None:
                got.setdefault(i, []).append(ev.token)
            if ev.finish_reason is not None:
                finish[i] = ev.finish_reason
        step += 1
    assert len(finish) == n
    for i, r in enumerate(reqs):
        want = alone(model, tok, r["ids"], max_tokens=r["max_tokens"], temperature=r["temperature"], seed=r["seed"])
        if finish[i] == "cancelled":
            assert got.get(i, []) == want[: len(got.get(i, []))]
        else:
            assert finish[i] in ("stop", "length")
            assert got.get(i, []) == want, f"request {i}"
    assert eng.stats().active_rows == 0


def test_text_and_stop_strings_equal_stream_generate(model, tok):
    """Text events (incremental detokenization, a stop string cut across tokens) equal
    stream_generate's, with another request decoding beside it."""
    prompt = "Once upon a time"
    ref = [r for r in stream_generate(model, tok, prompt, max_new_tokens=12, temperature=0, sinks=2, window=16)]
    text = "".join(r.text for r in ref)
    assert len(text) > 4
    stop = text[3:5]  # a stop string inside the reply
    want = "".join(r.text for r in stream_generate(model, tok, prompt, max_new_tokens=12, temperature=0, sinks=2,
                                                   window=16, stop=stop))
    eng = Engine(model, tok, batch_size=2, sinks=2, window=16, max_prefill_tokens=4, temperature=0)
    other = eng.add_request("The sea", max_tokens=12)
    a = eng.add_request(prompt, max_tokens=12)
    b = eng.add_request(prompt, max_tokens=12, stop=stop)
    got_a, evs_a = run(eng, a)
    got_b, evs_b = run(eng, b)
    run(eng, other)
    assert got_a == text and evs_a[-1].finish_reason == ref[-1].finish_reason
    assert got_b == want and evs_b[-1].finish_reason == "stop"
    assert [e.token for e in evs_a] == [r.token for r in ref]


def test_a_prompt_continuing_a_kept_stream_feeds_only_its_new_tokens(model, tok):
    eng = Engine(model, tok, batch_size=2, sinks=2, window=16, max_prefill_tokens=8, temperature=0)
    p = list(range(100, 120))
    _, evs = run(eng, eng.add_request(p, max_tokens=5))
    tokens = [e.token for e in evs]
    longer = p + tokens + [7, 8, 9]
    _, evs2 = run(eng, eng.add_request(longer, max_tokens=5))
    assert evs2[-1].cached_tokens == len(p) + len(tokens) - 1  # the last drawn token was never fed
    assert evs2[-1].prompt_tokens == len(longer)
    assert [e.token for e in evs2] == alone(model, tok, longer, max_tokens=5)


# ----------------------------------------------------------------------------------------------
# Conversations


def chat_turns(eng, convs, turns, *, seeds=None, session=True, check=None, history=None, first=0):
    """Run turns first.. first+turns-1 of each conversation in `convs` ({name: ChatSession}) through
    the engine, interleaved; each reply must equal the lone ChatSession's. `history` ({name:
    messages}) is extended in place. Returns the last events per name."""
    history = {name: [] for name in convs} if history is None else history
    last = {}
    for t in range(first, first + turns):
        for k, (name, chat) in enumerate(convs.items()):
            user = USERS[(t + k) % len(USERS)]
            seed = None if seeds is None else seeds + 10 * t + k
            if seed is not None:
                chat.generator.manual_seed(seed)
            want = "".join(chat.turn(user))
            history[name].append({"role": "user", "content": user})
            kw = {} if seed is None else {"seed": seed}
            rid = eng.add_request(list(history[name]), session=name if session else None, **kw)
            got, evs = run(eng, rid)
            assert got == want, (name, t)
            history[name].append({"role": "assistant", "content": got})
            last[name] = evs[-1]
            if check:
                check(t, evs[-1])
    return last


def test_a_conversation_equals_chatsession_turn_by_turn(model, tok):
    """Greedy and seeded, named and unnamed, beside a prompt that decodes in the other row: each
    reply is the lone ChatSession's, and later turns feed only their new tokens."""
    for temperature, seeds in ((0.0, None), (0.9, 5)):
        eng = Engine(model, tok, batch_size=2, sinks=2, window=24, max_prefill_tokens=6, max_tokens=6,
                     temperature=temperature, top_p=0.9)
        busy = eng.add_request(list(range(50, 60)), max_tokens=None, ignore_eos=True, buffer=False)
        convs = {name: ChatSession(model, tok, sinks=2, window=24, max_new_tokens=6, temperature=temperature,
                                   top_p=0.9) for name in ("a", "b")}

        def check(t, ev):
            assert (ev.cached_tokens > 0) == (t > 0)
            assert ev.prompt_tokens > ev.cached_tokens

        chat_turns(eng, convs, 3, seeds=seeds, session=temperature == 0, check=check)
        assert eng.cancel(busy)
        eng.step()


def test_five_conversations_through_two_rows_and_two_parked_stay_exact(model, tok):
    """batch_size=2, max_sessions=2: five alternating conversations are parked, evicted to their
    logs and replayed, and every reply is still the lone ChatSession's."""
    eng = Engine(model, tok, batch_size=2, sinks=2, window=24, max_prefill_tokens=16, max_tokens=5, temperature=0,
                 max_sessions=2)
    convs = {f"s{i}": ChatSession(model, tok, sinks=2, window=24, max_new_tokens=5, temperature=0) for i in range(5)}
    seen = []
    chat_turns(eng, convs, 3, check=lambda t, ev: seen.append(eng.stats()))
    assert max(s.parked_sessions for s in seen) == 2 and max(s.logged_sessions for s in seen) >= 1
    assert all(s.kept_sessions == 5 for s in seen[5:])


def test_the_parking_bounds(model, tok):
    """max_parked_bytes=0 sends every parked conversation to its log, and it stays exact;
    max_logged_sessions=0 forgets it (its next turn starts fresh); a log longer than
    max_log_tokens is not kept, so the conversation is forgotten when it leaves the LRU."""
    kw = dict(batch_size=1, sinks=2, window=24, max_prefill_tokens=16, max_tokens=4, temperature=0)
    eng = Engine(model, tok, max_parked_bytes=0, **kw)
    convs = {f"s{i}": ChatSession(model, tok, sinks=2, window=24, max_new_tokens=4, temperature=0) for i in range(2)}
    chat_turns(eng, convs, 2, check=lambda t, ev: None)
    s = eng.stats()
    assert (s.parked_sessions, s.logged_sessions, s.parked_bytes) == (0, 1, 0)
    for bounds in (dict(max_sessions=0, max_logged_sessions=0), dict(max_sessions=0, max_log_tokens=10)):
        eng = Engine(model, tok, **kw, **bounds)
        a = [{"role": "user", "content": USERS[0]}]
        got, _ = run(eng, eng.add_request(a))
        run(eng, eng.add_request([{"role": "user", "content": USERS[1]}]))  # takes the only row
        assert eng.stats().kept_sessions == 1
        _, evs = run(eng, eng.add_request(a + [{"role": "assistant", "content": got},
                                               {"role": "user", "content": USERS[2]}]))
        assert evs[-1].cached_tokens == 0 and evs[-1].finish_reason == "length"


def test_a_restart_with_session_dir_continues_exactly_and_other_weights_are_refused(tok, tmp_path):
    m1 = make_model()
    kw = dict(batch_size=2, sinks=2, window=24, max_prefill_tokens=16, max_tokens=5, temperature=0,
              session_dir=tmp_path, max_sessions=1)
    eng = Engine(m1, tok, **kw)
    convs = {f"s{i}": ChatSession(m1, tok, sinks=2, window=24, max_new_tokens=5, temperature=0) for i in range(4)}
    history = {name: [] for name in convs}
    chat_turns(eng, convs, 1, history=history)  # two in rows, one parked, one logged
    eng.shutdown()
    assert len(list(tmp_path.iterdir())) == 4
    # a new engine over a twin of the model (built again: the same weights) continues each one
    eng2 = Engine(make_model(), tok, **kw)
    assert eng2.refused_files == [] and eng2.stats().kept_sessions == 4
    assert eng2.stats().parked_sessions == 1 and eng2.stats().logged_sessions == 3
    last = chat_turns(eng2, convs, 2, history=history, first=1)
    assert all(ev.finish_reason == "length" for ev in last.values())
    eng2.shutdown()


def test_restart_continues_a_conversation_exactly(tok, tmp_path):
    m1 = make_model()
    kw = dict(batch_size=1, sinks=2, window=24, max_prefill_tokens=16, max_tokens=5, temperature=0,
              session_dir=tmp_path)
    chat = ChatSession(m1, tok, sinks=2, window=24, max_new_tokens=5, temperature=0)
    history = []
    for t in range(3):
        eng = Engine(make_model(), tok, **kw)  # a new engine (and model object) every turn
        want = "".join(chat.turn(USERS[t]))
        history.append({"role": "user", "content": USERS[t]})
        got, evs = run(eng, eng.add_request(list(history), session="x"))
        assert got == want and (evs[-1].cached_tokens > 0) == (t > 0)
        history.append({"role": "assistant", "content": got})
        eng.shutdown()
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    before = files[0].read_bytes()
    other = Engine(make_model(seed=1), tok, **kw)  # other weights: the file is refused and left alone
    assert len(other.refused_files) == 1 and "different model" in other.refused_files[0]
    _, evs = run(other, other.add_request(history + [{"role": "user", "content": "More?"}], session="x"))
    assert evs[-1].cached_tokens == 0  # it starts fresh
    other.shutdown()
    assert files[0].read_bytes() == before
    # a damaged file, another cache shape and a file that is not ours are refused in one line each
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (tmp_path / "notes.txt").write_text("not a stream")
    eng = Engine(make_model(), tok, **{**kw, "window": 20})
    assert len(eng.refused_files) == 3 and all("\n" not in r for r in eng.refused_files)
    assert any("window" in r for r in eng.refused_files) and eng.stats().kept_sessions == 0


# ----------------------------------------------------------------------------------------------
# Cancel, chunked prefill, threads


def test_cancel_mid_prefill(model, tok):
    eng = Engine(model, tok, batch_size=1, sinks=2, window=16, max_prefill_tokens=8, temperature=0)
    long = list(range(200, 400))
    rid = eng.add_request(long, max_tokens=5)
    assert eng.step() == [] and eng.step() == []  # 16 of 200 tokens fed
    assert eng.stats().active_rows == 1
    eng.cancel(rid)
    (ev,) = eng.step()
    assert (ev.rid, ev.token, ev.finish_reason) == (rid, None, "cancelled")
    assert eng.stats().active_rows == 0 and list(eng.stream(rid)) == [ev]
    # the row serves the next request; a conversation cancelled mid-prefill is kept as it was
    chat = ChatSession(model, tok, sinks=2, window=16, max_new_tokens=5, temperature=0)
    want1 = "".join(chat.turn(USERS[0]))
    got1, _ = run(eng, eng.add_request([{"role": "user", "content": USERS[0]}], max_tokens=5))
    assert got1 == want1
    msgs = [{"role": "user", "content": USERS[0]}, {"role": "assistant", "content": got1},
            {"role": "user", "content": USERS[1] * 5}]
    rid = eng.add_request(msgs, max_tokens=5)
    eng.step()
    eng.cancel(rid)
    assert eng.step()[-1].finish_reason == "cancelled"
    assert eng.stats().logged_sessions == 1  # its row held part of the turn: the conversation is its log again
    want2 = "".join(chat.turn(USERS[1] * 5))
    got2, evs = run(eng, eng.add_request(msgs, max_tokens=5))
    assert got2 == want2 and evs[-1].cached_tokens == 0  # replayed from its log


def test_a_long_prefill_never_stalls_a_decoding_row(model, tok):
    """While a 300-token prompt is fed 16 tokens a step, the other row draws a token every step."""
    eng = Engine(model, tok, batch_size=2, sinks=2, window=16, max_prefill_tokens=16, temperature=0)
    a = eng.add_request([5, 6, 7], max_tokens=None, ignore_eos=True, buffer=False)
    assert [e.rid for e in eng.step()] == [a]
    b = eng.add_request(list(range(1000, 1300)), max_tokens=3, buffer=False)
    steps = 0
    while True:
        evs = eng.step()
        steps += 1
        assert [e.rid for e in evs if e.rid == a] == [a]  # one token of a in every step
        if any(e.rid == b for e in evs):
            break
    assert steps == 300 // 16 + 1  # b's first token after ceil(300 / 16) steps of prefill


def test_threads_add_and_cancel_while_one_thread_steps(model, tok):
    eng = Engine(model, tok, batch_size=3, sinks=2, window=16, max_prefill_tokens=8, temperature=0, max_queue=64)
    eng.start()
    results, errors = {}, []
    prompts = [[random.Random(i).randrange(3, 4096) for _ in range(5 + i)] for i in range(8)]

    def client(i):
        try:
            rid = eng.add_request(prompts[i], max_tokens=4 if i % 3 else 40)
            if i % 3 == 0:
                eng.cancel(rid)
            results[i] = [e for e in eng.stream(rid)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    run_clients(client, 8, timeout=60)
    eng.shutdown()
    assert not errors and len(results) == 8
    for i, evs in results.items():
        tokens = [e.token for e in evs if e.token is not None]
        want = alone(model, tok, prompts[i], max_tokens=4 if i % 3 else 40)
        assert evs[-1].finish_reason in (("cancelled", "stop", "length") if i % 3 == 0 else ("stop", "length"))
        assert tokens == want[: len(tokens)] and (i % 3 == 0 or tokens == want)


# ----------------------------------------------------------------------------------------------
# Refusals and stats


def test_refusals_are_one_line_errors_naming_the_problem(model, tok):
    eng = Engine(model, tok, batch_size=1, sinks=2, window=16, max_queue=2)
    for kw, needle in ((dict(temperature=-1), "temperature"), (dict(top_p=7), "top_p"), (dict(n=2), "'n'"),
                       (dict(max_tokens=-1), "max_tokens"), (dict(stop=3), "stop"), (dict(seed="x"), "seed")):
        with pytest.raises(MiniLLMError, match=needle):
            eng.add_request("hi", **kw)
    for prompt, needle in (([], "prompt"), ([{"role": "robot", "content": "x"}], "role"),
                           ([{"role": "user", "content": 3}], "content"), ([5000], "out of range"),
                           ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "last"),
                           ({"a": 1}, "prompt")):
        with pytest.raises(MiniLLMError, match=needle):
            eng.add_request(prompt)
    with pytest.raises(MiniLLMError, match="batch_size"):
        Engine(model, tok, batch_size=0)
    eng.add_request("a", session="s")
    with pytest.raises(SessionBusy):
        eng.add_request("b", session="s")
    eng.add_request("c")
    with pytest.raises(QueueFull):
        eng.add_request("d")
    assert eng.stats().queued_requests == 2
    eng.shutdown()
    with pytest.raises(EngineClosed):
        eng.add_request("e")


def test_an_error_fails_its_request_only(model, tok):
    eng = Engine(model, tok, batch_size=2, sinks=2, window=16, temperature=0)
    eng.use_template, tok_template = True, tok.chat_template
    ok = eng.add_request([1, 2, 3], max_tokens=4)
    bad = eng.add_request([{"role": "user", "content": "x"}], max_tokens=4)
    tok.chat_template = "{{ raise_exception('no thanks') }}"
    try:
        _, evs = run(eng, bad)
    finally:
        tok.chat_template = tok_template
    assert evs[-1].finish_reason == "error" and "no thanks" in evs[-1].error
    assert [e.token for e in run(eng, ok)[1]] == alone(model, tok, [1, 2, 3], max_tokens=4)


def test_stats(model, tok):
    eng = Engine(model, tok, batch_size=1, sinks=2, window=16, temperature=0)
    a = eng.add_request([1, 2, 3], max_tokens=3)
    eng.add_request([4, 5, 6], max_tokens=3, buffer=False)
    s = eng.stats()
    assert (s.active_rows, s.queued_requests) == (0, 2)
    eng.step()
    s = eng.stats()
    assert (s.active_rows, s.queued_requests) == (1, 1)
    run(eng, a)
    while eng.has_work():
        eng.step()
    s = eng.stats()
    assert s.active_rows == 0 and s.requests_finished == 2 and s.tokens_generated == 6
    assert s.time_to_first_token_seconds > 0 and s.tokens_per_second > 0


def test_a_failed_turn_keeps_the_conversation_and_rows_are_held(model):
    """A turn that cannot render fails alone and leaves its conversation as it was; a row holding
    a conversation is refused to another ChatSession; max_prompt_tokens refuses a long prompt."""
    tok = minillm.load_tokenizer(WEIGHTS / "llama-tiny")
    tok.chat_template = ("{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('no BOOM') }}"
                         "{% endif %}{% endfor %}" + TEMPLATE)
    eng = Engine(model, tok, batch_size=1, sinks=2, window=16, temperature=0, max_tokens=4)
    chat = ChatSession(model, tok, sinks=2, window=16, max_new_tokens=4, temperature=0)
    msgs = [{"role": "user", "content": USERS[0]}]
    got, _ = run(eng, eng.add_request(msgs, session="k"))
    assert got == "".join(chat.turn(USERS[0]))
    with pytest.raises(MiniLLMError, match="held by another"):
        ChatSession(model, tok, cache=eng.cache, row=0)
    msgs += [{"role": "assistant", "content": got}]
    _, evs = run(eng, eng.add_request(msgs + [{"role": "user", "content": "BOOM"}], session="k"))
    assert evs[-1].finish_reason == "error" and "no BOOM" in evs[-1].error
    msgs += [{"role": "user", "content": USERS[1]}]
    got, evs = run(eng, eng.add_request(msgs, session="k"))
    assert got == "".join(chat.turn(USERS[1])) and evs[-1].cached_tokens > 0
    eng = Engine(model, tok, batch_size=1, sinks=2, window=16, max_prompt_tokens=60)
    with pytest.raises(MiniLLMError, match="max_prompt_tokens"):
        eng.add_request([{"role": "user", "content": "word " * 80}])
    with pytest.raises(MiniLLMError, match="max_prompt_tokens"):
        eng.add_request(list(range(3, 70)))
    with pytest.raises(MiniLLMError, match="no BOOM"):  # with a limit, the template is rendered at once
        eng.add_request([{"role": "user", "content": "BOOM"}])


def test_drain_finishes_shutdown_cancels_and_both_keep_the_streams(model, tok, tmp_path):
    eng = Engine(model, tok, batch_size=2, sinks=2, window=16, temperature=0, session_dir=tmp_path)
    seen = []
    eng.start()
    a = eng.add_request([{"role": "user", "content": "Hi"}], max_tokens=6, session="a")
    b = eng.add_request([1, 2, 3], max_tokens=6, on_event=seen.append)
    eng.drain()
    assert list(eng.stream(a))[-1].finish_reason == "length"
    assert seen[-1].finish_reason == "length" and len(seen) == 6 and {e.rid for e in seen} == {b}
    assert len(list(tmp_path.iterdir())) == 2
    with Engine(model, tok, batch_size=2, sinks=2, window=16, session_dir=tmp_path) as eng:
        assert eng.stats().parked_sessions == 2  # (leaving the block writes them back)
    eng = Engine(model, tok, batch_size=2, sinks=2, window=16, temperature=0, session_dir=tmp_path)
    assert eng.stats().parked_sessions == 2
    c = eng.add_request([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"},
                         {"role": "user", "content": "Go on"}], max_tokens=None, ignore_eos=True, session="a")
    for _ in range(3):
        eng.step()
    eng.shutdown()
    evs = list(eng.stream(c))
    assert evs[-1].finish_reason == "cancelled" and evs[-1].cached_tokens == 0  # "x" was not the reply: fresh
    assert len(list(tmp_path.iterdir())) == 2  # the session's new stream replaced its old one
    with pytest.raises(EngineClosed):
        eng.add_request("more")


def test_hostile_messages_are_refused_or_served(model, tok):
    eng = Engine(model, tok, batch_size=1, sinks=2, window=16, temperature=0, max_tokens=2)
    rid = eng.add_request([{"role": "user", "content": "a lone surrogate \ud800 here"}])
    assert list(eng.stream(rid))[-1].finish_reason in ("error", "length", "stop")
    plain = minillm.load_tokenizer(WEIGHTS / "llama-tiny")  # no chat template
    eng = Engine(model, plain, batch_size=1, sinks=2, window=16)
    with pytest.raises(MiniLLMError, match="system message"):
        eng.add_request([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(MiniLLMError, match="unsupported field 'name'"):
        eng.add_request([{"role": "user", "content": "y", "name": "bob"}])


def test_a_cache_that_cannot_be_viewed_by_row_is_fed_by_ragged_calls(model, tok):
    from minillm.apps import engine as engine_module

    eng = Engine(model, tok, batch_size=2, sinks=2, window=16, max_prefill_tokens=7, temperature=0)
    assert engine_module.row_view(eng.cache, 1) is not None
    eng.cache.per_row_extra = torch.zeros(2)  # something row_view does not know how to slice
    assert engine_module.row_view(eng.cache, 1) is None
    prompts = [list(range(10, 40)), list(range(900, 925))]
    rids = [eng.add_request(p, max_tokens=5) for p in prompts]
    for rid, p in zip(rids, prompts):
        assert [e.token for e in run(eng, rid)[1]] == alone(model, tok, p, max_tokens=5)


def test_non_finite_logits_fail_their_request_only(tok):
    """A model whose logits go NaN for one token id: the request that draws it fails with a one-line
    NonFiniteError message; the request beside it goes on."""
    m = make_model()
    eng = Engine(m, tok, batch_size=2, sinks=2, window=16, temperature=0)
    poison = alone(m, tok, [9, 9, 9], max_tokens=2)[0]
    with torch.no_grad():
        m.embed.weight[poison] = float("nan")
    bad = eng.add_request([9, 9, 9], max_tokens=5)
    ok = eng.add_request([7, 7], max_tokens=5)
    evs = run(eng, bad)[1]
    assert evs[-1].finish_reason == "error" and "NaN" in evs[-1].error and "request" in evs[-1].error
    assert evs[-1].completion_tokens == 1
    assert run(eng, ok)[1][-1].finish_reason in ("length", "stop")  # served to its end


def test_two_requests_continuing_one_conversation_at_once_are_both_exact(model, tok):
    """Two clients send the same conversation at once: one continues the kept stream, the other
    a fork of it (its log replayed), and both replies are the lone ChatSession's."""
    eng = Engine(model, tok, batch_size=2, sinks=2, window=24, max_prefill_tokens=8, max_tokens=5, temperature=0)
    chat = ChatSession(model, tok, sinks=2, window=24, max_new_tokens=5, temperature=0)
    first = "".join(chat.turn(USERS[0]))
    msgs = [{"role": "user", "content": USERS[0]}]
    assert run(eng, eng.add_request(msgs))[0] == first
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": USERS[1]}]
    a, b = eng.add_request(msgs), eng.add_request(msgs)
    want = "".join(chat.turn(USERS[1]))
    (ta, ea), (tb, eb) = run(eng, a), run(eng, b)
    assert ta == want and tb == want
    assert sorted([ea[-1].cached_tokens > 0, eb[-1].cached_tokens > 0]) == [False, True]  # one replayed
    assert eng.stats().kept_sessions == 2


def test_concurrent_conversations_from_threads_each_equal_chatsession(model, tok):
    """Four clients, each in its own thread, hold a 3-turn conversation at once through 2 rows
    (one parked, so streams are parked, logged and replayed) while a background thread steps."""
    eng = Engine(model, tok, batch_size=2, sinks=2, window=24, max_prefill_tokens=8, max_tokens=4, temperature=0,
                 max_sessions=1)
    eng.start()
    got, errors = {}, []

    def client(k):
        try:
            history, replies = [], []
            for t in range(3):
                history.append({"role": "user", "content": f"{USERS[(t + k) % len(USERS)]} ({k})"})
                text = "".join(e.text for e in eng.stream(eng.add_request(list(history))))
                history.append({"role": "assistant", "content": text})
                replies.append(text)
            got[k] = replies
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    run_clients(client, 4, timeout=120)
    eng.shutdown()
    assert not errors and len(got) == 4
    for k, replies in got.items():
        chat = ChatSession(model, tok, sinks=2, window=24, max_new_tokens=4, temperature=0)
        assert replies == ["".join(chat.turn(f"{USERS[(t + k) % len(USERS)]} ({k})")) for t in range(3)]


def test_a_decode_step_computes_only_the_span_of_rows_in_flight(model, tok):
    """One request in an 8-row engine decodes one row, not the padded batch (the forward's batch is
    recorded), and its tokens equal `generate` alone; two requests in rows 0 and 1 decode 2 rows."""
    want = [t for t in generate(model, [5, 6, 7], max_new_tokens=6, temperature=0, sinks=2, window=16)]
    eng = Engine(model, tok, batch_size=8, sinks=2, window=16, max_prefill_tokens=64, temperature=0)
    batches = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: batches.append(args[0].shape), with_kwargs=True)
    try:
        rid = eng.add_request([5, 6, 7], max_tokens=6)
        got = [e.token for e in eng.stream(rid) if e.token is not None]
        decodes = [s for s in batches if s[1] == 1]
        assert decodes and all(s[0] == 1 for s in decodes), batches
        assert got == want
        batches.clear()
        rids = [eng.add_request([5, 6, 7 + i], max_tokens=4) for i in range(2)]
        for r in rids:
            list(eng.stream(r))
        assert max(s[0] for s in batches if s[1] == 1) == 2, batches
    finally:
        hook.remove()
