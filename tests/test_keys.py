"""`core.contract.key_positions`, the streaming contract in code, against the contract's own words.

- key sets and positions, from the definitions in docs/streaming.md (K_t as a set, a key's
  position as its rank in sorted K_t), for every chunk start and length in a grid, per row;
- the dense case (window=None) and the plain-causal shortcut the plans take when nothing is evicted;
- the decode fast path (`fast.decode.decode_frame`, `decode_key_positions`: slot arithmetic in ints)
  against key_positions, on a grid of (sinks, window, t) and under Hypothesis up to t = 10^7;
- reference.py, the test oracle, imports no engine position code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.fast.decode import decode_frame, decode_key_positions
from minillm.core.contract import slot_positions
from minillm.core.contract import key_positions

REPO = Path(__file__).resolve().parents[1]


def contract_key_set(sinks: int, window: int, t: int) -> list[int]:
    """K_t, sorted: {0..t} while t < S, else the sinks plus the last `window` tokens."""
    if t < sinks + window:
        return list(range(t + 1))
    return list(range(sinks)) + list(range(t - window + 1, t + 1))


def check_row(kp, b: int, sinks: int, window: int | None, t0: int, n: int) -> None:
    for i in range(n):
        t = t0 + i
        want = list(range(t + 1)) if window is None else contract_key_set(sinks, window, t)
        cols = kp.allowed[b, i].nonzero().flatten()
        got = kp.key[b, cols].tolist()
        assert sorted(got) == want, (t, got)  # exactly K_t, each key once
        rank = {j: r for r, j in enumerate(want)}  # a key's position is its index in sorted K_t
        position = kp.position.expand(kp.allowed.shape)  # dense: the same for every query
        assert position[b, i, cols].tolist() == [rank[j] for j in got], t
        assert kp.query[b, i].item() == t and kp.query_position[b, i].item() == len(want) - 1


@pytest.mark.parametrize("sinks", [0, 1, 3])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_key_sets_and_positions_follow_the_contract(sinks, window):
    S = sinks + window
    for t0 in range(0, 3 * S + 2):
        for n in (1, 2, S, S + 3):
            kp = key_positions(torch.tensor([t0]), n, sinks, window)
            assert kp.key.shape == (1, S + n) and kp.allowed.shape == kp.position.shape == (1, n, S + n)
            assert kp.key[0, :S].tolist() == slot_positions(t0, sinks, window)[0].tolist()
            assert kp.key[0, S:].tolist() == list(range(t0, t0 + n))
            check_row(kp, 0, sinks, window, t0, n)
            assert torch.equal(kp.positions_of(slice(1, S + 1)), kp.position[..., 1 : S + 1])
            if t0 == 0:  # an empty cache: the plan leaves out the slot columns, which hold nothing
                own = key_positions(torch.tensor([t0]), n, sinks, window, slots=False)
                assert torch.equal(own.allowed, kp.allowed[..., S:]) and torch.equal(own.position, kp.position[..., S:])


def test_rows_are_independent():
    sinks, window, n = 2, 3, 6
    seen = torch.tensor([0, 4, 17])
    kp = key_positions(seen, n, sinks, window)
    for b, t0 in enumerate(seen.tolist()):
        alone = key_positions(torch.tensor([t0]), n, sinks, window)
        for name in ("key", "query", "allowed", "position", "query_position"):
            assert torch.equal(getattr(kp, name)[b], getattr(alone, name)[0]), (b, name)
        check_row(kp, b, sinks, window, t0, n)


def test_dense_is_causal_at_absolute_positions():
    kp = key_positions(torch.zeros(1, dtype=torch.int64), 9, 0, None)
    assert torch.equal(kp.allowed[0], torch.ones(9, 9, dtype=torch.bool).tril())
    assert torch.equal(kp.position[0, 0], torch.arange(9))  # absolute, whatever the query
    check_row(kp, 0, 0, None, 0, 9)


@pytest.mark.parametrize("sinks,window", [(0, 1), (2, 3), (4, 12)])
def test_plain_causal_shortcut(sinks, window):
    # plan_chunk skips the mask (SDPA's is_causal, RoPE at stream positions) for a chunk that starts
    # an empty cache and ends before S: there every key set is {0..t} at positions 0..t.
    S = sinks + window
    for n in range(1, S + 1):
        kp = key_positions(torch.tensor([0]), n, sinks, window)
        assert not kp.allowed[0, :, :S].any()  # empty slots
        chunk = kp.allowed[0, :, S:]
        assert torch.equal(chunk, torch.ones(n, n, dtype=torch.bool).tril())
        assert torch.equal(kp.position[0, :, S:][chunk], kp.key[0, S:].expand(n, n)[chunk])
        assert torch.equal(kp.query_position[0], kp.query[0])


def check_decode(sinks: int, window: int, t: int) -> None:
    """One decode step of token t, as the fast path computes it, against key_positions."""
    kp = key_positions(torch.tensor([t]), 1, sinks, window)
    cols = kp.allowed[0, 0].nonzero().flatten()
    truth = dict(zip(kp.key[0, cols].tolist(), kp.position[0, 0, cols].tolist()))  # key -> position
    c = kp.query_position[0, 0].item()
    f = decode_frame(t, sinks, window)
    # The step writes token t to f.slot, over the key that leaves K_t, then attends to the buffer's
    # first n_valid slots: those must hold exactly K_t.
    before = slot_positions(t, sinks, window)[0]
    after = slot_positions(t + 1, sinks, window)[0]
    assert after[f.slot].item() == t
    assert torch.equal(torch.cat([after[: f.slot], after[f.slot + 1:]]),
                       torch.cat([before[: f.slot], before[f.slot + 1:]]))  # nothing else moves
    held = after[: f.n_valid].tolist()
    assert sorted(held) == sorted(truth) and (after[f.n_valid:] == -1).all(), (t, held)
    # RoPE: keys stored rotated at their stream position j, the sinks re-rotated at i + sink_shift,
    # the query at t: every query-key distance must be the cache-relative one.
    for j in held:
        rotated_at = j + f.sink_shift if j < sinks else j
        assert t - rotated_at == c - truth[j], (t, j)
    # ALiBi: the decode bias is built from these positions.
    assert decode_key_positions(t, sinks, window).tolist() == [truth[j] for j in held]


@pytest.mark.parametrize("sinks", [0, 1, 2, 4])
@pytest.mark.parametrize("window", [1, 2, 3, 7])
def test_decode_fast_path_grid(sinks, window):
    for t in range(0, 4 * (sinks + window) + 3):
        check_decode(sinks, window, t)


@given(sinks=st.integers(0, 64), window=st.integers(1, 2048), t=st.integers(0, 10**7))
def test_decode_fast_path_hypothesis(sinks, window, t):
    check_decode(sinks, window, t)


def test_reference_shares_no_position_code_with_the_engine():
    tree = ast.parse((REPO / "minillm" / "reference.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    engine = {"positions", "attention", "cache", "keys", "model"}
    assert not {m for m in imported if m and m.split(".")[-1] in engine}, imported
