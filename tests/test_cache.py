"""SinkCache bookkeeping and the bad inputs that streaming refuses.

- `slot_of` / `slot_positions` against a simulation that shares no formula with them: the paper's
  list cache (append, then evict the oldest non-sink) with each new token written into the first
  empty slot or else into the slot of the token it evicts; and against the contract's key set K_t
  (docs/streaming.md), for every (sinks, window, T) in a grid.
- Bad input gets a MiniLLMError (a ValueError) that names the parameter, and leaves the cache as
  it was: bad sinks/window/batch_size, batch size, dtype and device mismatches, another model's
  cache, something that is not a cache.
"""

from __future__ import annotations

import pytest
import torch

from minillm import MiniLLMError
from minillm.core.cache import SinkCache
from minillm.core.contract import slot_of, slot_positions
from util import random_model, tiny_config


def simulate(sinks: int, window: int, T: int) -> tuple[list[int], list[int]]:
    """Replay T tokens through the paper's list cache, giving each token a slot as it arrives.

    Returns (which stream position each slot holds after T tokens, -1 if empty; the slot each
    token 0..T-1 was written to). No ring formula: a token takes the first empty slot, else the
    slot of the token the list cache evicts for it (the oldest that is not a sink)."""
    S = sinks + window
    held: list[int] = []  # the paper's cache, in stream order
    slots = [-1] * S
    written = []
    for j in range(T):
        held.append(j)
        if len(held) > S:
            evicted = held.pop(sinks)  # the oldest non-sink
            slot = slots.index(evicted)
        else:
            slot = slots.index(-1)
        slots[slot] = j
        written.append(slot)
        assert sorted(p for p in slots if p >= 0) == held  # the slots hold the list cache's keys
    return slots, written


def key_set(sinks: int, window: int, t: int) -> set[int]:
    """K_t (docs/streaming.md): the keys token t attends to."""
    if t < sinks + window:
        return set(range(t + 1))
    return set(range(sinks)) | set(range(t - window + 1, t + 1))


def make_cache(sinks: int, window: int) -> SinkCache:
    return SinkCache(num_layers=1, batch_size=1, num_kv_heads=1, head_dim=2, sinks=sinks, window=window,
                     dtype=torch.float32, device="cpu", owner_id=0, keep_raw_sinks=True)


@pytest.mark.parametrize("sinks", [0, 1, 2, 4, 7])
@pytest.mark.parametrize("window", [1, 2, 3, 5, 16])
def test_slots_match_brute_force(sinks, window):
    cache = make_cache(sinks, window)
    S = sinks + window
    for T in range(0, 4 * S + 3):
        want, _ = simulate(sinks, window, T)
        assert slot_positions(T, sinks, window)[0].tolist() == want, T
        cache.tokens_seen = T
        assert slot_positions(cache.tokens_seen, sinks, window)[0].tolist() == want
        assert len(cache) == min(T, S)
        # The slots hold exactly the keys the last token attended to.
        if T:
            assert {p for p in want if p >= 0} == key_set(sinks, window, T - 1)
    _, written = simulate(sinks, window, 5 * S)
    assert slot_of(torch.arange(0, 5 * S), sinks, window).tolist() == written
    assert [slot_of(j, sinks, window) for j in range(5 * S)] == written  # the int form, used by decode


def test_reset_zeroes_and_keeps_buffers():
    cache = make_cache(2, 3)
    ptrs = [cache.k.data_ptr(), cache.v.data_ptr(), cache.raw_sink_k.data_ptr()]
    cache.k.fill_(1), cache.v.fill_(1), cache.raw_sink_k.fill_(1)
    cache.tokens_seen = 11
    cache.reset()
    assert cache.tokens_seen.tolist() == [0] and len(cache) == 0
    assert not cache.k.any() and not cache.v.any() and not cache.raw_sink_k.any()
    assert [cache.k.data_ptr(), cache.v.data_ptr(), cache.raw_sink_k.data_ptr()] == ptrs


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config("llama_gqa", layers=1), dtype=torch.float32)


def _raises(match: str):
    return pytest.raises(ValueError, match=match)


@pytest.mark.parametrize("kwargs,name", [
    (dict(sinks=-1), "sinks"),
    (dict(sinks=2.0), "sinks"),
    (dict(sinks="4"), "sinks"),
    (dict(sinks=True), "sinks"),
    (dict(window=0), "window"),
    (dict(window=-5), "window"),
    (dict(window=None), "window"),
    (dict(window=8.5), "window"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=1.0), "batch_size"),
])
def test_bad_cache_parameters(model, kwargs, name):
    args = dict(batch_size=1, sinks=4, window=8) | kwargs
    with _raises(name) as err:
        model.new_cache(**args)
    assert isinstance(err.value, MiniLLMError) and "\n" not in str(err.value)


def test_sinks_zero_and_window_one_are_accepted(model):
    assert model.new_cache(sinks=0, window=1).capacity == 1


def _refused(model, cache, ids, match):
    """The call is refused with a one-line ValueError naming `match`, and the cache is untouched."""
    seen, k = cache.tokens_seen.clone(), cache.k.clone() if cache.k.device.type != "meta" else None
    with _raises(match) as err:
        model(ids, cache=cache)
    assert isinstance(err.value, MiniLLMError) and "\n" not in str(err.value)
    assert torch.equal(cache.tokens_seen, seen)
    if k is not None:
        assert torch.equal(cache.k, k)


@torch.no_grad()
def test_batch_size_mismatch(model):
    cache = model.new_cache(batch_size=2, sinks=1, window=4)
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    _refused(model, cache, torch.zeros(1, 1, dtype=torch.long), "batch_size")
    _refused(model, cache, torch.zeros(3, 5, dtype=torch.long), "batch_size")


@torch.no_grad()
def test_dtype_mismatch(model):
    cache = model.new_cache(batch_size=1, sinks=1, window=4, dtype=torch.float64)
    _refused(model, cache, torch.zeros(1, 2, dtype=torch.long), "dtype")
    model64 = random_model(tiny_config("llama_gqa", layers=1), dtype=torch.float64)
    cache32 = model64.new_cache(batch_size=1, sinks=1, window=4, dtype=torch.float32)
    _refused(model64, cache32, torch.zeros(1, 2, dtype=torch.long), "dtype")


@torch.no_grad()
def test_device_mismatch(model):
    # "meta" stands in for a second device: a cache (or input) that is not where the model is.
    cache = model.new_cache(batch_size=1, sinks=1, window=4, device="meta")
    _refused(model, cache, torch.zeros(1, 2, dtype=torch.long), "device")
    good = model.new_cache(batch_size=1, sinks=1, window=4)
    _refused(model, good, torch.zeros(1, 2, dtype=torch.long, device="meta"), "device")


@torch.no_grad()
def test_cache_of_another_model(model):
    other = random_model(model.config, dtype=model.dtype, seed=1)  # same config, other weights
    cache = other.new_cache(batch_size=1, sinks=1, window=4)
    _refused(model, cache, torch.zeros(1, 2, dtype=torch.long), "different model")
    twin = random_model(model.config, dtype=model.dtype, seed=0)  # the same config and weights: the same model
    twin.load_state_dict(model.state_dict())
    model(torch.zeros(1, 2, dtype=torch.long), cache=twin.new_cache(batch_size=1, sinks=1, window=4))


@torch.no_grad()
def test_not_a_cache(model):
    with _raises("cache"):
        model(torch.zeros(1, 2, dtype=torch.long), cache={"k": None})


def test_tokens_seen_is_checked_before_it_changes(model):
    # The getter hands out a copy, so `cache.tokens_seen -= n` below zero is refused by the setter
    # with the cache's counts unchanged; complex and float counts are refused by name.
    cache = model.new_cache(2, sinks=2, window=4)
    cache.tokens_seen = 3
    with _raises("tokens_seen"):
        cache.tokens_seen -= 5
    assert cache.tokens_seen.tolist() == [3, 3]
    saved = cache.tokens_seen
    cache.tokens_seen += 1
    assert saved.tolist() == [3, 3] and cache.tokens_seen.tolist() == [4, 4]
    for bad in (torch.zeros(2, dtype=torch.complex64), torch.zeros(2), torch.zeros(3, dtype=torch.long)):
        with _raises("tokens_seen"):
            cache.tokens_seen = bad


@torch.no_grad()
def test_numpy_lengths_are_integers(model):
    np = pytest.importorskip("numpy")
    ids = torch.randint(0, model.config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    a, b = model.new_cache(2, sinks=2, window=4), model.new_cache(2, sinks=2, window=4)
    assert torch.equal(model(ids, cache=a, lengths=np.array([1, 3]))[1], model(ids, cache=b, lengths=[1, 3])[1])
    with _raises("lengths"):
        model(ids, cache=a, lengths=np.array([True, False]))


def test_a_cache_is_always_truthy():
    # SinkCache has __len__, so without __bool__ an empty cache was falsy and
    # `cache = cache or model.new_cache()` silently replaced it; a cache whose rows differ raised.
    model = random_model(tiny_config("llama_gqa"))
    cache = model.new_cache(2, 2, 4)
    assert bool(cache) and (cache or None) is cache
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache, lengths=[3, 1])
    assert bool(cache)  # rows holding different numbers of keys: still a cache
    with pytest.raises(MiniLLMError, match="different numbers of keys"):
        len(cache)


@pytest.mark.parametrize("count", [2.7, -1, 2**64, True, "3"])
def test_an_imported_row_state_with_a_bad_count_is_refused(count):
    # A RowState is a frozen dataclass anyone can build: tokens_seen=2.7 used to become 2 silently.
    import dataclasses

    model = random_model(tiny_config("llama_gqa"))
    cache = model.new_cache(1, 2, 4)
    state = dataclasses.replace(cache.export_row(0), tokens_seen=count)
    with pytest.raises(MiniLLMError, match="tokens_seen"):
        cache.import_row(0, state)
    assert cache.tokens_seen.tolist() == [0]
