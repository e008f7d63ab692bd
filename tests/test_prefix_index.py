"""PrefixIndex: both implementations through the same tests (the reference is the specification)."""
from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import tierkv
from tierkv import ops
from tierkv.keys import _as_uint32, block_keys, root_key
from tierkv.prefix_index import (MAX_VALUE, NativePrefixIndex, PrefixIndex, ReferencePrefixIndex,
                                 make_prefix_index)


def _native_available() -> bool:
    module = ops.native()
    return module is not None and hasattr(module, "PrefixIndex")


IMPLS = [
    pytest.param(ReferencePrefixIndex, id="reference"),
    pytest.param(NativePrefixIndex, id="native",
                 marks=pytest.mark.skipif(not _native_available(), reason="native PrefixIndex unavailable")),
]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def rkey(rng: random.Random) -> bytes:
    return rng.randbytes(16)


def collide(home: int, tail: int) -> bytes:
    """A key whose first 8 bytes (the native table's hash, little-endian) are ``home``."""
    return (home % 2**64).to_bytes(8, "little") + tail.to_bytes(8, "little")


def tokens_of(n: int, seed: int, high: int = 50_000) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=n, dtype=np.uint32)


def dict_walk(present: dict, keys) -> int:
    n = 0
    for k in keys:
        if k not in present:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------------------------------------------
# the map


def test_set_get_discard_len_clear(impl):
    ix = impl()
    assert isinstance(ix, PrefixIndex)
    rng = random.Random(1)
    a, b, c = rkey(rng), rkey(rng), rkey(rng)
    assert len(ix) == 0 and ix.get(a) == 0 and a not in ix
    ix.set(a, 1)
    ix.set(b, MAX_VALUE)
    assert len(ix) == 2 and ix.get(a) == 1 and ix.get(b) == MAX_VALUE and a in ix and c not in ix
    ix.set(a, 7)  # replaces
    assert len(ix) == 2 and ix.get(a) == 7
    ix.set(c, np.int64(5))  # numpy integers are ints
    assert ix.get(c) == 5
    assert ix.discard(a) is True and ix.discard(a) is False
    assert len(ix) == 2 and ix.get(a) == 0 and a not in ix
    ix.clear()
    assert len(ix) == 0 and b not in ix and c not in ix
    ix.set(b, 3)  # usable after clear
    assert ix.get(b) == 3 and len(ix) == 1


@pytest.mark.parametrize("expected_keys", [0, 1, 1000])
def test_growth_across_many_resizes(impl, expected_keys):
    ix = impl(expected_keys)
    rng = random.Random(expected_keys)
    keys = [rkey(rng) for _ in range(20_000)]
    for i, k in enumerate(keys):
        ix.set(k, i + 1)
        if i % 997 == 0:
            assert all(ix.get(keys[j]) == j + 1 for j in range(0, i + 1, 37))
    assert len(ix) == len(keys)
    assert all(ix.get(k) == i + 1 for i, k in enumerate(keys))
    for k in keys[::2]:
        assert ix.discard(k)
    assert len(ix) == len(keys) // 2
    assert all(ix.get(k) == (0 if i % 2 == 0 else i + 1) for i, k in enumerate(keys))
    if isinstance(ix, NativePrefixIndex):
        assert ix.capacity >= len(keys) * 8 // 5 and ix.capacity & (ix.capacity - 1) == 0


@pytest.mark.parametrize("seed", range(4))
def test_delete_with_backward_shift_under_heavy_collisions(impl, seed):
    """Clusters that collide on one home slot, that wrap around the end of the table, and that run into each
    other; deleting in random order must keep every other key reachable."""
    ix = impl(64)  # native: 128 slots, no resize below 80 keys
    rng = random.Random(seed)
    keys = [collide(0, t) for t in range(1, 16)]                 # all home at slot 0
    keys += [collide((t << 40) - 1, t) for t in range(1, 16)]    # home at the last slot: wraps to 0, 1, ...
    keys += [collide((t << 40) + 3, 100 + t) for t in range(8)]  # home 3: inside the first cluster
    keys += [collide(rng.randrange(2**64), rng.randrange(2**64)) for _ in range(20)]
    rng.shuffle(keys)
    model = {}
    for i, k in enumerate(keys):
        ix.set(k, i + 1)
        model[k] = i + 1
    order = list(keys)
    rng.shuffle(order)
    for k in order:
        assert ix.discard(k)
        del model[k]
        assert not ix.discard(k)
        assert len(ix) == len(model)
        for other in keys:
            assert ix.get(other) == model.get(other, 0), "a key was cut off from its home"
        # re-insert and remove some keys on the way, so holes get refilled
        if rng.random() < 0.3 and model:
            again = rng.choice(list(model))
            assert ix.discard(again)
            ix.set(again, model[again])
            assert ix.get(again) == model[again]


def test_longest_prefix_equals_a_dict_walk(impl):
    rng = random.Random(3)
    keys = block_keys(tokens_of(16 * 300, 3), 16)
    for trial in range(30):
        ix = impl()
        present = {}
        mode = trial % 3
        for i, k in enumerate(keys):
            keep = rng.random() < 0.97 if mode == 0 else (i < rng.randrange(len(keys) + 1) if mode == 1 else
                                                         rng.random() < 0.5)
            if keep:
                ix.set(k, i + 1)
                present[k] = i + 1
        want = dict_walk(present, keys)
        assert ix.longest_prefix(keys) == want
        assert ix.longest_prefix(tuple(keys)) == want
        assert ix.longest_prefix_packed(b"".join(keys)) == want
        cut = rng.randrange(len(keys) + 1)
        assert ix.longest_prefix(keys[:cut]) == min(want, cut)
    assert impl().longest_prefix([]) == 0
    assert impl().longest_prefix_packed(b"") == 0


# ---------------------------------------------------------------------------------------------------------------
# walks from tokens


@pytest.mark.parametrize("block_tokens", [1, 3, 16, 40, 100])
def test_longest_prefix_tokens_equals_longest_prefix_of_block_keys(impl, block_tokens):
    rng = random.Random(block_tokens)
    for trial in range(12):
        n_tokens = rng.randrange(0, 40 * block_tokens)  # partial tails included
        tokens = tokens_of(n_tokens, trial, high=2**32 if trial % 2 else 50_000)
        salt = rng.randbytes(rng.randrange(4))
        keys = block_keys(tokens, block_tokens, salt)
        assert len(keys) == n_tokens // block_tokens
        ix = impl()
        cut = rng.randrange(len(keys) + 1)
        for i, k in enumerate(keys):
            if i < cut or rng.random() < 0.5:
                ix.set(k, i + 1)
        want = ix.longest_prefix(keys)
        assert want >= cut
        assert ix.longest_prefix_tokens(tokens, block_tokens, root_key(salt)) == want


def test_fully_cached_prompt_and_first_block_miss(impl):
    tokens = tokens_of(16 * 2048 + 5, 7)
    keys = block_keys(tokens, 16)
    ix = impl(len(keys))
    for i, k in enumerate(keys):
        ix.set(k, i + 1)
    root = root_key()
    assert ix.longest_prefix_tokens(tokens, 16, root) == len(keys)
    ix.discard(keys[0])
    assert ix.longest_prefix_tokens(tokens, 16, root) == 0
    ix.set(keys[0], 1)
    ix.discard(keys[-1])
    assert ix.longest_prefix_tokens(tokens, 16, root) == len(keys) - 1


def test_empty_and_short_token_arrays(impl):
    ix = impl()
    ix.set(block_keys(tokens_of(16, 0), 16)[0], 1)
    root = root_key()
    for empty in ([], np.zeros(0, np.uint32), np.zeros(0, np.int64), torch.zeros(0, dtype=torch.int64)):
        assert ix.longest_prefix_tokens(empty, 16, root) == 0
    assert ix.longest_prefix_tokens(tokens_of(16, 0)[:15], 16, root) == 0
    assert ix.longest_prefix_tokens(tokens_of(16, 0), 16, root) == 1
    assert impl().longest_prefix_tokens(tokens_of(64, 0), 16, root) == 0  # empty index


def test_token_inputs_of_every_kind_agree(impl):
    tokens = tokens_of(16 * 20 + 3, 11)
    ix = impl()
    for i, k in enumerate(block_keys(tokens, 16)[:13]):
        ix.set(k, i + 1)
    root = root_key()
    inputs = [tokens, tokens.astype(np.int64), tokens.tolist(), torch.from_numpy(tokens.astype(np.int64)),
              tokens.astype(">u4"), np.repeat(tokens, 2)[::2]]
    for tok in inputs:
        assert ix.longest_prefix_tokens(tok, 16, root) == 13


def test_salt_isolation(impl):
    tokens = tokens_of(16 * 10, 5)
    ix = impl()
    for i, k in enumerate(block_keys(tokens, 16, salt=b"tenant-a")):
        ix.set(k, i + 1)
    assert ix.longest_prefix_tokens(tokens, 16, root_key(b"tenant-a")) == 10
    assert ix.longest_prefix_tokens(tokens, 16, root_key(b"tenant-b")) == 0
    assert ix.longest_prefix_tokens(tokens, 16, root_key()) == 0
    assert ix.longest_prefix(block_keys(tokens, 16, salt=b"tenant-b")) == 0


# ---------------------------------------------------------------------------------------------------------------
# input errors


def test_input_errors(impl):
    ix = impl()
    good = bytes(range(16))
    root = root_key()
    with pytest.raises(ValueError, match="16-byte key, got 15 bytes"):
        ix.set(good[:15], 1)
    with pytest.raises(TypeError, match="bytes, got str"):
        ix.set("k" * 16, 1)
    for bad in (0, -1, 2**31, 2**64):
        with pytest.raises(ValueError, match=r"\[1, 2\*\*31\), got"):
            ix.set(good, bad)
    for bad in (True, 1.0, "1", None):
        with pytest.raises(TypeError, match="expected an int value"):
            ix.set(good, bad)
    assert len(ix) == 0
    for method in (ix.get, ix.discard, ix.__contains__):
        with pytest.raises(ValueError, match="16-byte key, got 17 bytes"):
            method(good + b"x")
        with pytest.raises(TypeError, match="expected a key as bytes"):
            method(12)
    with pytest.raises(ValueError, match="16-byte key, got 3 bytes"):
        ix.longest_prefix([good, b"abc"])  # validated even after the first miss
    with pytest.raises(TypeError):
        ix.longest_prefix(good)
    with pytest.raises(TypeError, match="expected a key as bytes"):
        ix.longest_prefix([good, 5])
    with pytest.raises(ValueError, match="multiple of 16 bytes, got 17"):
        ix.longest_prefix_packed(good + b"x")
    tokens = tokens_of(64, 0)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="block_tokens"):
            ix.longest_prefix_tokens(tokens, bad, root)
    with pytest.raises(ValueError, match="16-byte root key, got 9 bytes"):
        ix.longest_prefix_tokens(tokens, 16, b"tierkv-v1")
    with pytest.raises(TypeError, match="root key as bytes"):
        ix.longest_prefix_tokens(tokens, 16, "x" * 16)
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        ix.longest_prefix_tokens([1, 2, -3], 1, root)
    with pytest.raises(ValueError, match="1-D"):
        ix.longest_prefix_tokens(np.zeros((2, 16), np.uint32), 16, root)
    with pytest.raises(TypeError):
        ix.longest_prefix_tokens(np.zeros(16, np.float32), 16, root)
    with pytest.raises(ValueError, match="expected_keys"):
        impl(-1)
    with pytest.raises(TypeError, match="expected_keys"):
        impl(1.5)


# ---------------------------------------------------------------------------------------------------------------
# model-based


_POOL = ([collide(0, t) for t in range(6)] + [collide(2**64 - 1, t) for t in range(6)]
         + [collide(t << 40, 99) for t in range(1, 6)] + [bytes([t]) * 16 for t in range(8)])

_ops = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(_POOL), st.integers(1, MAX_VALUE)),
    st.tuples(st.just("discard"), st.sampled_from(_POOL), st.just(0)),
    st.tuples(st.just("get"), st.sampled_from(_POOL), st.just(0)),
    st.tuples(st.just("walk"), st.lists(st.sampled_from(_POOL), max_size=8), st.just(0)),
    st.tuples(st.just("clear"), st.just(b""), st.just(0)),
)


@pytest.mark.parametrize("impl_cls", IMPLS)
@settings(max_examples=150, deadline=None)
@given(program=st.lists(_ops, max_size=80), expected=st.integers(0, 20))
def test_model_based_against_a_dict(impl_cls, program, expected):
    ix = impl_cls(expected)
    model: dict[bytes, int] = {}
    for op, arg, value in program:
        if op == "set":
            ix.set(arg, value)
            model[arg] = value
        elif op == "discard":
            assert ix.discard(arg) == (arg in model)
            model.pop(arg, None)
        elif op == "get":
            assert ix.get(arg) == model.get(arg, 0)
            assert (arg in ix) == (arg in model)
        elif op == "walk":
            assert ix.longest_prefix(arg) == dict_walk(model, arg)
        else:
            ix.clear()
            model.clear()
        assert len(ix) == len(model)
    for k in _POOL:
        assert ix.get(k) == model.get(k, 0)


# ---------------------------------------------------------------------------------------------------------------
# threads


def test_concurrent_readers_and_writers(impl):
    """Writers add and remove keys (and grow the table) while readers walk: the prefix of keys that are never
    removed is always found, and no walk runs past a block that was never present."""
    tokens = tokens_of(16 * 1024, 21)
    keys = block_keys(tokens, 16)
    stable, volatile = 512, keys[512:1000]  # keys[1000:] are never inserted
    ix = impl(16)
    for i, k in enumerate(keys[:stable]):
        ix.set(k, i + 1)
    root = root_key()
    stop = threading.Event()
    errors: list[str] = []

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        filler = []
        while not stop.is_set():
            k = rng.choice(volatile)
            if rng.random() < 0.5:
                ix.set(k, keys.index(k) + 1)
            else:
                ix.discard(k)
            f = rkey(rng)  # unrelated keys: force resizes under the readers
            ix.set(f, 1)
            filler.append(f)
            if len(filler) > 3000:
                for f in filler[:1500]:
                    ix.discard(f)
                del filler[:1500]

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for n in range(300):
                which = n % 3
                if which == 0:
                    got = ix.longest_prefix_tokens(tokens, 16, root)
                elif which == 1:
                    got = ix.longest_prefix(keys)
                else:
                    got = ix.longest_prefix_packed(b"".join(keys))
                if not stable <= got <= 1000:
                    errors.append(f"walk {which} found {got} blocks, expected {stable}..1000")
                i = rng.randrange(stable)
                if ix.get(keys[i]) != i + 1:
                    errors.append(f"stable key {i} has value {ix.get(keys[i])}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    writers = [threading.Thread(target=writer, args=(s,)) for s in range(2)]
    readers = [threading.Thread(target=reader, args=(100 + s,)) for s in range(3)]
    for t in writers + readers:
        t.start()
    for t in readers:
        t.join(timeout=120)
    stop.set()
    for t in writers:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in writers + readers), "a thread hung (deadlock?)"
    assert not errors, errors[:5]
    assert all(ix.get(k) == i + 1 for i, k in enumerate(keys[:stable]))


# ---------------------------------------------------------------------------------------------------------------
# choosing an implementation, and the token conversion


def test_make_prefix_index_follows_the_native_module(monkeypatch):
    ix = make_prefix_index(10)
    assert isinstance(ix, NativePrefixIndex if _native_available() else ReferencePrefixIndex)
    monkeypatch.setenv("TIERKV_FORCE_REFERENCE", "1")
    assert isinstance(make_prefix_index(), ReferencePrefixIndex)
    with pytest.raises(RuntimeError, match="native PrefixIndex"):
        NativePrefixIndex()


def test_as_uint32_returns_a_ready_array_as_is():
    tokens = tokens_of(100, 0)
    assert _as_uint32(tokens) is tokens
    big = np.array([0, 2**32 - 1], dtype=np.uint32)
    assert _as_uint32(big) is big
    assert _as_uint32(np.array([1, 2], dtype=np.uint16)).dtype == np.dtype("<u4")
    with pytest.raises(ValueError):
        _as_uint32(np.array([2**32], dtype=np.uint64))
    with pytest.raises(ValueError):
        _as_uint32(np.array([-1], dtype=np.int32))


def test_public_block_keys_still_match_the_reference():
    tokens = tokens_of(16 * 500 + 7, 4, high=2**32)
    assert tierkv.block_keys(tokens, 16, b"s") == tierkv.keys.block_keys_reference(tokens, 16, b"s")
