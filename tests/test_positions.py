"""The two position conventions (issue 23): `model.new_cache(..., positions="cache" | "absolute")`.

"cache" is the paper's (the keys at their ranks in the cache, the query at c_t = min(t, S-1));
"absolute" puts every key at its text position and the query at t. Both come from the one contract
function (`core.contract.key_positions`, with `query_position`). What this module proves, in
float64 (1e-9) on a RoPE family with full rotary and GQA (llama_gqa), one with partial rotary
(gpt_neox_parallel) and both ALiBi forms (mpt, falcon_rw), through the core and the fast paths
(split and doubled chunk kernels, lockstep and per-row decode):

  1. absolute streaming, in any chunking, equals `reference_stream(..., positions="absolute")`,
     the literal list-cache form, which shares no position code with the engine;
  2. in absolute, any chunking equals token by token, and the fast paths equal the core;
  3. while the text fits (t < S) both conventions equal dense attention (they coincide there);
  4. in absolute, ragged batched rows with different counts equal each row streamed alone;
  5. the conventions really differ once the cache is full and there are sinks;
  6. the decode step's integer frame agrees with key_positions in both conventions, and
     positions are int64 far past 2^31;
  7. the convention is part of a stream: export/import and save/load carry it and refuse a
     mismatch; a bad `positions=` is one line naming it.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.core.contract import key_positions, query_position
from minillm.errors import MiniLLMError
from minillm.fast.decode import decode_frame, decode_key_positions
from minillm.reference import reference_stream
from tiny_ckpt import tiny_checkpoint  # noqa: F401  (fixture)
from util import random_model, rel_err, tiny_config

CASES = ["llama_gqa", "gpt_neox_parallel", "mpt", "falcon_rw"]
ENGINES = {"core": dict(fast=False), "split": dict(chunk_kernel="split"), "doubled": dict(chunk_kernel="doubled"),
           "rows": dict(decode="rows")}
VOCAB = 61
TOL = 1e-9
PER_CASE = max(2, settings().max_examples // 3)
examples = settings(max_examples=PER_CASE)
_models: dict = {}


def model_of(case: str, engine: str = "split", layers: int = 2):
    """One float64 model per (case, engine, layers), the same weights for every engine."""
    key = (case, engine, layers)
    if key not in _models:
        opts = dict(ENGINES[engine])
        fast = opts.pop("fast", True)
        _models[key] = random_model(tiny_config(case, vocab=VOCAB, heads=4, head_dim=4, layers=layers),
                                    fast=fast, **opts)
    return _models[key]


def ids_of(batch: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


@st.composite
def chunkings(draw, T: int) -> list[int]:
    """Chunk sizes summing to T: random cuts, or a prefill then decode steps."""
    if T == 1:
        return [1]
    if draw(st.booleans()):
        cuts = sorted(set(draw(st.lists(st.integers(1, T - 1), max_size=min(T - 1, 8)))))
    else:
        cuts = list(range(draw(st.integers(1, T)), T))
    edges = [0, *cuts, T]
    return [b - a for a, b in zip(edges[:-1], edges[1:])]


def streamed(model, ids, cache, sizes) -> torch.Tensor:
    out, p = [], 0
    for n in sizes:
        out.append(model(ids[:, p : p + n], cache=cache))
        p += n
    assert cache.tokens_seen.tolist() == [p] * ids.shape[0]
    return torch.cat(out, dim=1)


@st.composite
def shapes(draw, max_T=lambda S: 3 * S + 2, min_T=lambda S: S + 1):
    sinks, window = draw(st.integers(0, 4)), draw(st.integers(1, 10))
    S = sinks + window
    T = draw(st.integers(min_T(S), max(min_T(S), max_T(S))))
    return sinks, window, T, draw(st.integers(0, 2**16))


@pytest.mark.parametrize("case", CASES)
@examples
@given(data=st.data())
def test_1_absolute_streaming_equals_the_literal_reference(case, data):
    sinks, window, T, seed = data.draw(shapes(max_T=lambda S: min(3 * S + 2, 36)))
    engine = data.draw(st.sampled_from(list(ENGINES)))
    model = model_of(case, engine, layers=1)
    ids = ids_of(data.draw(st.integers(1, 2)), T, seed)
    got = streamed(model, ids, model.new_cache(ids.shape[0], sinks, window, positions="absolute"),
                   data.draw(chunkings(T)))
    want = reference_stream(model, ids, sinks, window, positions="absolute")
    assert rel_err(got, want) <= TOL, (engine, rel_err(got, want))


@pytest.mark.parametrize("case", CASES)
@examples
@given(data=st.data())
def test_2_absolute_any_chunking_equals_token_by_token(case, data):
    sinks, window, T, seed = data.draw(shapes(max_T=lambda S: 4 * S))
    engine = data.draw(st.sampled_from(["split", "doubled", "rows"]))
    ids = ids_of(data.draw(st.integers(1, 3)), T, seed)
    core = model_of(case, "core")
    want = streamed(core, ids, core.new_cache(ids.shape[0], sinks, window, positions="absolute"), [1] * T)
    for m in (core, model_of(case, engine)):  # the core chunked, and a fast path chunked
        got = streamed(m, ids, m.new_cache(ids.shape[0], sinks, window, positions="absolute"), data.draw(chunkings(T)))
        assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("case", CASES)
@examples
@given(data=st.data())
def test_3_both_conventions_equal_dense_while_the_text_fits(case, data):
    sinks, window, T, seed = data.draw(shapes(max_T=lambda S: S, min_T=lambda S: 1))
    model = model_of(case, data.draw(st.sampled_from(list(ENGINES))))
    ids = ids_of(data.draw(st.integers(1, 2)), T, seed)
    dense = model(ids)
    for positions in ("cache", "absolute"):
        cache = model.new_cache(ids.shape[0], sinks, window, positions=positions)
        assert rel_err(streamed(model, ids, cache, data.draw(chunkings(T))), dense) <= TOL


@pytest.mark.parametrize("case", CASES)
@examples
@given(data=st.data())
def test_4_absolute_batched_rows_equal_each_row_alone(case, data):
    """Calls with a length per row (0 included): rows at different counts in one cache."""
    sinks, window = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 8))
    S = sinks + window
    model = model_of(case, data.draw(st.sampled_from(list(ENGINES))))
    B = 3
    calls = data.draw(st.lists(st.lists(st.integers(0, 2 * S), min_size=B, max_size=B), min_size=1, max_size=5))
    if data.draw(st.booleans()):  # a run of decode steps, rows idle or not
        calls += data.draw(st.lists(st.lists(st.integers(0, 1), min_size=B, max_size=B), min_size=1, max_size=6))
    totals = [sum(c[b] for c in calls) for b in range(B)]
    ids = ids_of(B, max(totals) + 1, data.draw(st.integers(0, 2**16)))
    cache = model.new_cache(B, sinks, window, positions="absolute")
    got = [[] for _ in range(B)]
    pos = [0] * B
    for lengths in calls:
        n = max(lengths)
        if n == 0:
            continue
        chunk = torch.stack([ids[b, pos[b] : pos[b] + n] if pos[b] + n <= ids.shape[1] else
                             torch.cat([ids[b, pos[b]:], ids[b, :pos[b] + n - ids.shape[1]]]) for b in range(B)])
        out = model(chunk, cache=cache, lengths=lengths)
        for b in range(B):
            got[b].append(out[b, : lengths[b]])
            pos[b] += lengths[b]
    assert cache.tokens_seen.tolist() == totals
    for b in range(B):
        if totals[b]:
            alone = model.new_cache(1, sinks, window, positions="absolute")
            want = model(ids[b : b + 1, : totals[b]], cache=alone)[0]
            assert rel_err(torch.cat(got[b]), want) <= TOL, b


@pytest.mark.parametrize("case", CASES)
def test_5_every_path_in_both_conventions_on_a_fixed_schedule(case):
    """Every engine (core, both chunk kernels, lockstep and per-row decode) on one schedule with
    chunks across S and decode steps before and after it: each convention equals its own
    reference and not the other's (so the properties above could fail), and before the cache is
    full they are one computation."""
    sinks, window, T = 2, 5, 30
    S = sinks + window
    ids = ids_of(2, T, 7)
    schedule = [4, 1, 9, 1, 1, 1, 3, 10]  # decode steps at t = 4 (< S), 14, 15, 16 (>= S)
    refs = {pos: reference_stream(model_of(case), ids, sinks, window, positions=pos) for pos in ("cache", "absolute")}
    for engine in ENGINES:
        model = model_of(case, engine)
        for positions, other in (("cache", "absolute"), ("absolute", "cache")):
            got = streamed(model, ids, model.new_cache(2, sinks, window, positions=positions), schedule)
            assert rel_err(got, refs[positions]) <= TOL, (engine, positions)
            assert rel_err(got[:, S:], refs[other][:, S:]) > 1e-4, (engine, positions)
            assert rel_err(got[:, :S], model(ids[:, :S])) <= TOL


@pytest.mark.parametrize("positions", ["cache", "absolute"])
def test_6_decode_frame_follows_key_positions(positions):
    for sinks in (0, 1, 3):
        for window in (1, 2, 5):
            S = sinks + window
            for t in range(0, 4 * S):
                kp = key_positions(torch.tensor([t]), 1, sinks, window, positions=positions)
                f = decode_frame(t, sinks, window, positions)
                assert kp.query_position[0, 0].item() == t - f.sink_shift == query_position(t, S, positions)
                # the buffer after t's write: slot s holds the key of column s (or, at t's slot, t itself)
                held = kp.key[0, :S].clone()
                held[f.slot] = t
                want = kp.positions_of(slice(None))[0, 0, :S].clone()
                want[f.slot] = kp.query_position[0, 0]
                assert decode_key_positions(t, sinks, window, positions=positions).tolist() == \
                    want[: f.n_valid].tolist(), (sinks, window, t)
                assert f.n_valid == min(t + 1, S) and (held[: f.n_valid] >= 0).all()


def test_6_absolute_positions_are_int64_far_past_two_to_the_31():
    t0 = 3 * 2**40 + 5
    kp = key_positions(torch.tensor([t0]), 3, 4, 12, positions="absolute")
    assert kp.query_position.dtype == torch.int64 and kp.query_position[0].tolist() == [t0, t0 + 1, t0 + 2]
    pos = kp.position[0, 2][kp.allowed[0, 2]].tolist()
    assert sorted(pos) == [0, 1, 2, 3] + list(range(t0 + 2 - 11, t0 + 3))
    assert key_positions(torch.tensor([t0]), 1, 4, 12).query_position.item() == 15  # "cache": c_t = S - 1


@pytest.mark.parametrize("bad", ["relative", "Absolute", "", None, 1])
def test_7_a_bad_convention_is_one_line_naming_it(bad):
    model = model_of("llama_gqa")
    with pytest.raises(MiniLLMError, match="positions must be") as e:
        model.new_cache(1, 2, 6, positions=bad)
    assert "\n" not in str(e.value) and repr(bad) in str(e.value)


def test_7_the_convention_travels_with_the_stream_and_a_mismatch_is_refused(tmp_path):
    model = model_of("llama_gqa")
    ids = ids_of(1, 20, 3)
    absolute = model.new_cache(1, 2, 6, positions="absolute")
    model(ids[:, :12], cache=absolute)
    assert absolute.raw_sink_k is None and "positions='absolute'" in repr(absolute)
    state = absolute.export_row(0)
    assert state.positions == "absolute"
    with pytest.raises(MiniLLMError, match="'absolute' positions, this cache uses 'cache'"):
        model.new_cache(1, 2, 6).import_row(0, state)
    with pytest.raises(MiniLLMError, match="'cache' positions, this cache uses 'absolute'"):
        absolute.import_row(0, model.new_cache(1, 2, 6).export_row(0))
    moved = model.new_cache(1, 2, 6, positions="absolute")
    moved.import_row(0, state)
    path = tmp_path / "s.safetensors"
    absolute.save(path)
    loaded = type(absolute).load(path, model)
    assert loaded.positions == "absolute"
    want = model(ids[:, 12:], cache=absolute)
    for c in (moved, loaded):
        assert torch.equal(model(ids[:, 12:], cache=c), want)


def test_7_a_file_naming_another_convention_is_refused(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = model_of("llama_gqa")
    cache = model.new_cache(1, 2, 6)
    path = tmp_path / "s.safetensors"
    cache.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["minillm"])
    assert info["positions"] == "cache"
    for bad in ("sideways", 3):
        info["positions"] = bad
        save_file(tensors, str(path), metadata={"minillm": json.dumps(info)})
        with pytest.raises(MiniLLMError, match="positions must be") as e:
            type(cache).load(path, model)
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# The command line: --positions cache|absolute on generate, chat, batch and ppl


def cli_main(argv, capsys):
    from minillm import cli

    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def made_caches(monkeypatch):
    """The convention of every cache the commands make."""
    from minillm.core.model import Model

    seen, new_cache = [], Model.new_cache

    def spy(self, *args, **kwargs):
        cache = new_cache(self, *args, **kwargs)
        seen.append(cache.positions)
        return cache

    monkeypatch.setattr(Model, "new_cache", spy)
    return seen


def command_lines(ckpt, tmp_path) -> dict[str, list]:
    (tmp_path / "t.jsonl").write_text('{"turn": "Hello"}\n')
    (tmp_path / "p.jsonl").write_text('{"prompt": "Hello"}\n{"prompt": "The sea"}\n')
    common = ["--temperature", 0, "--cache-size", 12, "--sinks", 2, "--threads", 1, "-n", 20, "--ignore-eos"]
    return {"generate": ["generate", ckpt, "-p", "The whale", *common],
            "chat": ["chat", ckpt, "--prompts", tmp_path / "t.jsonl", *common],
            "batch": ["batch", ckpt, "--input", tmp_path / "p.jsonl", *common],
            "ppl": ["ppl", ckpt, "--max-tokens", 60, "--cache-size", 12, "--sinks", 2, "--threads", 1]}


@pytest.mark.parametrize("command", ["generate", "chat", "batch", "ppl"])
def test_cli_positions_reaches_the_cache(tiny_checkpoint, tmp_path, capsys, made_caches, command):
    argv = command_lines(tiny_checkpoint, tmp_path)[command]
    rc, _, err = cli_main(argv, capsys)
    assert rc == 0 and made_caches and set(made_caches) == {"cache"}, err
    made_caches.clear()
    rc, _, err = cli_main([*argv, "--positions", "absolute"], capsys)
    assert rc == 0 and made_caches and set(made_caches) == {"absolute"}, err
    assert "absolute positions" in err, err


def test_cli_ppl_conventions_agree_inside_the_cache_and_differ_past_it(tiny_checkpoint, tmp_path, capsys):
    import json

    def run(positions, tokens):
        path = tmp_path / f"{positions}{tokens}.json"
        rc, _, err = cli_main(["ppl", tiny_checkpoint, "--max-tokens", tokens, "--cache-size", 16, "--sinks", 4,
                               "--threads", 1, "--positions", positions, "--json", path], capsys)
        assert rc == 0, err
        data = json.loads(path.read_text())
        assert data["positions"] == positions
        return data["modes"]["streaming"]["ppl"]

    assert run("cache", 16) == pytest.approx(run("absolute", 16), rel=1e-5)  # t < S: one computation
    assert run("cache", 200) != pytest.approx(run("absolute", 200), rel=1e-5)


@pytest.mark.parametrize("command", ["generate", "chat", "batch", "ppl"])
def test_cli_bad_positions_is_one_line(tiny_checkpoint, tmp_path, capsys, command):
    argv = command_lines(tiny_checkpoint, tmp_path)[command]
    rc, out, err = cli_main([*argv, "--positions", "relative"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("minillm: error:"), err
    assert "--positions" in err and "'relative'" in err, err


def test_a_chat_keeps_its_convention_through_save_and_load(tiny_checkpoint, tmp_path):
    import minillm

    model, tok = minillm.load(tiny_checkpoint), minillm.load_tokenizer(tiny_checkpoint)
    kw = dict(sinks=2, window=10, temperature=0, max_new_tokens=8, ignore_eos=True)
    chat = minillm.ChatSession(model, tok, positions="absolute", **kw)
    "".join(chat.turn("Hello there"))
    assert chat.cache.positions == "absolute" and int(chat.cache.tokens_seen[0]) > 12  # past S
    chat.save(tmp_path / "c.safetensors")
    loaded = minillm.ChatSession.load(tmp_path / "c.safetensors", model, tok)
    assert loaded.cache.positions == "absolute"
    assert "".join(loaded.turn("And then?")) == "".join(chat.turn("And then?"))
    with pytest.raises(MiniLLMError, match="positions must be"):
        minillm.ChatSession(model, tok, positions="rank", **kw)
