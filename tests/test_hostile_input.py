"""Hostile and careless input over the whole public API (issue 7, part 3).

Every bad argument is a ``TypeError``/``ValueError`` (``StoreClosed``, a ``RuntimeError``, after ``close()``) whose
message says "expected X, got Y"; never a crash, a hang or a changed store. "Unchanged" is checked against a
snapshot taken before the call: every counter of ``stats()``, ``lookup`` of each suffix of a known chain,
``lookup_tokens`` of its prompt, ``in`` and ``locate`` of stored and absent keys; then the stored blocks are read
back bit-exact. Async methods either raise at once or fail their future within a timeout.

Decisions pinned here (see docs/security.md, "Input validation"):
- non-contiguous ``blocks`` (transposed, strided, expanded views with the right shape) are accepted and stored
  bit-exact; a non-contiguous ``out=`` is refused (``get`` writes into its memory as laid out);
- a key named twice in one ``put`` is stored with its first block, the later ones are ignored, under every
  policy; ``get`` of a repeated key returns its block at each place; ``delete`` counts it once;
- empty calls are no-ops returning the empty answer;
- ``meta`` tensors (no data) are refused as ``blocks``, ``out`` and token arrays.
"""
from __future__ import annotations

import dataclasses
import re
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import tierkv
import tierkv.keys
import tierkv.prefix_index
from conftest import as_bytes, assert_bit_equal, make_blocks, make_tier_setup, tiny_layout

EXPECTED_GOT = re.compile(r"expected\b.*\bgot\b", re.S)
BAD = (TypeError, ValueError)
FUTURE_TIMEOUT_S = 30
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LAYOUT = tiny_layout()  # bf16 [2, 2, 4, 2, 16]: 1 KiB blocks
SHAPE = LAYOUT.block_shape
BT = LAYOUT.block_tokens


def prompt(seed: int, blocks: int) -> list[int]:
    g = np.random.default_rng(seed)
    return [int(t) for t in g.integers(0, 50_000, blocks * BT)]


TOKENS = prompt(7, 6)
KNOWN = tierkv.block_keys(TOKENS, block_tokens=BT)  # a chain of 6: the first 4 stored, the last 2 absent
STORED, ABSENT = KNOWN[:4], KNOWN[4:]
BLOCKS = make_blocks(4, LAYOUT, seed=11)


# ---------------------------------------------------------------------------------------------------------------
# the store under attack, and what "unchanged" means


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Every tier, small enough that the stored blocks spread over all three (2 on device, 2 host, disk)."""
    setup = make_tier_setup("device+host+disk", tmp_path_factory.mktemp("hostile"), LAYOUT)
    s = setup.open(device=2, host=2, disk=16)
    s.put(STORED, BLOCKS)
    s.flush()
    yield s
    s.close()


def snapshot(store: tierkv.BlockStore) -> dict:
    store.drain()  # no write-behind in flight: counters only move for what a call does
    stats = store.stats()
    return {
        "totals": {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)
                   if f.name not in ("tiers", "latency")},
        "tiers": {name: dataclasses.asdict(t) for name, t in stats.tiers.items()},
        "lookup": [store.lookup(KNOWN[i:]) for i in range(len(KNOWN))],
        "lookup_tokens": store.lookup_tokens(TOKENS),
        "in": [k in store for k in KNOWN],
        "locate": store.locate(KNOWN),
    }


def assert_refused(store: tierkv.BlockStore, call, kinds=BAD) -> BaseException:
    """``call()`` raises one of ``kinds`` (or returns a future that fails with one, in time) saying "expected X,
    got Y"; the store is as it was and still returns its blocks bit-exact."""
    before = snapshot(store)
    try:
        result = call()
    except kinds as exc:
        error: BaseException = exc
    else:
        assert isinstance(result, Future), f"accepted: returned {result!r}"
        error = result.exception(timeout=FUTURE_TIMEOUT_S)  # raises TimeoutError on a hang
        assert isinstance(error, kinds), f"the future ended with {error!r}"
    assert EXPECTED_GOT.search(str(error)), f"message does not say 'expected ... got ...': {error}"
    assert snapshot(store) == before, f"a refused call changed the store ({error})"
    assert_bit_equal(store.get(STORED), BLOCKS)
    return error


def blocks_for(n: int) -> torch.Tensor:
    return make_blocks(n, LAYOUT, seed=99 + n)


# ---------------------------------------------------------------------------------------------------------------
# keys: wrong type, wrong length, wrong container, in every method that takes keys

def _frombuffer(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


bad_key = st.one_of(
    st.binary(max_size=15), st.binary(min_size=17, max_size=40),            # ValueError: length
    st.text(min_size=16, max_size=16),                                      # TypeError from here on
    st.integers(), st.none(), st.floats(allow_nan=False), st.booleans(),
    st.binary(min_size=16, max_size=16).map(bytearray),
    st.binary(min_size=16, max_size=16).map(memoryview),
    st.binary(min_size=16, max_size=16).map(lambda b: np.frombuffer(b, dtype=np.uint8)),
    st.binary(min_size=16, max_size=16).map(_frombuffer),
    st.binary(min_size=16, max_size=16).map(lambda b: (b,)),
)

KEY_METHODS = {
    "put": lambda s, keys: s.put(keys, blocks_for(len(keys))),
    "put_async": lambda s, keys: s.put_async(keys, blocks_for(len(keys))),
    "get": lambda s, keys: s.get(keys),
    "get_async": lambda s, keys: s.get_async(keys),
    "get_out": lambda s, keys: s.get(keys, out=torch.empty((len(keys), *SHAPE), dtype=LAYOUT.dtype)),
    "lookup": lambda s, keys: s.lookup(keys),
    "locate": lambda s, keys: s.locate(keys),
    "delete": lambda s, keys: s.delete(keys),
    "prefetch": lambda s, keys: s.prefetch(keys),
}


@SETTINGS
@given(method=st.sampled_from(sorted(KEY_METHODS)), key=bad_key, at=st.integers(0, 5),
       neighbours=st.lists(st.sampled_from(KNOWN), max_size=5))
def test_a_bad_key_among_good_ones_is_refused_by_every_method(store, method, key, at, neighbours):
    keys = list(neighbours)
    keys.insert(min(at, len(keys)), key)  # the good keys around it (stored or not) must not be touched either
    error = assert_refused(store, lambda: KEY_METHODS[method](store, keys))
    if isinstance(key, bytes):
        assert isinstance(error, ValueError) and f"got a key of {len(key)} bytes" in str(error)
    else:
        assert isinstance(error, TypeError) and type(key).__name__ in str(error)


@SETTINGS
@given(key=bad_key)
def test_a_bad_key_is_refused_by_in(store, key):
    assert_refused(store, lambda: key in store)


bad_key_container = st.one_of(
    st.none(), st.integers(), st.floats(allow_nan=False),
    st.sampled_from(KNOWN),                                  # one key, not a list of them
    st.sampled_from(KNOWN).map(bytearray), st.sampled_from(KNOWN).map(lambda k: k.hex()),
    st.sets(st.sampled_from(KNOWN), min_size=1),             # no order: not a chain
    st.frozensets(st.sampled_from(KNOWN), min_size=1),
)


@SETTINGS
@given(method=st.sampled_from(sorted(KEY_METHODS)), keys=bad_key_container)
def test_keys_that_are_not_an_ordered_sequence_are_refused(store, method, keys):
    n = len(keys) if isinstance(keys, (set, frozenset)) else 1

    def call():
        if method.startswith("put"):
            return getattr(store, method)(keys, blocks_for(n))
        if method == "get_out":
            return store.get(keys, out=torch.empty((n, *SHAPE), dtype=LAYOUT.dtype))
        return KEY_METHODS[method](store, keys)
    error = assert_refused(store, call)
    assert isinstance(error, TypeError) and "sequence" in str(error)


# ---------------------------------------------------------------------------------------------------------------
# blocks (put, put_async) and out (get, get_async)

WRONG_DTYPES = [torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int8, torch.uint8,
                torch.bool, torch.complex64, torch.float8_e4m3fn]


def _perturbed(shape: tuple[int, ...], how: str, by: int) -> tuple[int, ...]:
    s = list(shape)
    if how == "grow":
        s[by % len(s)] += 1 + by // len(s)
    elif how == "shrink":
        s[by % len(s)] = max(0, s[by % len(s)] - 1 - by // len(s))
    elif how == "drop":
        del s[by % len(s)]
    elif how == "add":
        s.insert(by % (len(s) + 1), 1 + by % 3)
    elif how == "flatten":
        s = [s[0], int(np.prod(s[1:]))]
    elif how == "scalar":
        s = []
    return tuple(s)


bad_tensor = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(WRONG_DTYPES), st.just(0)),
    st.tuples(st.just("shape"), st.sampled_from(["grow", "shrink", "drop", "add", "flatten", "scalar"]),
              st.integers(0, 11)),
    st.tuples(st.just("count"), st.integers(-2, 3).filter(bool), st.just(0)),
    st.tuples(st.just("meta"), st.just(None), st.just(0)),
    st.tuples(st.just("type"), st.sampled_from(["numpy", "list", "none", "bytes", "int"]), st.just(0)),
)


def make_bad_tensor(kind: str, arg, by: int, n: int):
    full = (n, *SHAPE)
    if kind == "dtype":
        return torch.zeros(full, dtype=arg)
    if kind == "shape":
        shape = _perturbed(full, arg, by)
        assume(shape != full)
        return torch.zeros(shape, dtype=LAYOUT.dtype)
    if kind == "count":
        assume(n + arg >= 0)
        return torch.zeros((n + arg, *SHAPE), dtype=LAYOUT.dtype)
    if kind == "meta":
        return torch.empty(full, dtype=LAYOUT.dtype, device="meta")
    good = torch.zeros(full, dtype=LAYOUT.dtype)
    return {"numpy": good.float().numpy(), "list": good.tolist(), "none": None, "bytes": b"\0" * 1024,
            "int": 0}[arg]


@SETTINGS
@given(method=st.sampled_from(["put", "put_async"]), bad=bad_tensor, n=st.integers(0, 3))
def test_bad_blocks_are_refused_by_put(store, method, bad, n):
    kind, arg, by = bad
    keys = ABSENT[:min(n, 2)] + KNOWN[:max(0, n - 2)]
    blocks = make_bad_tensor(kind, arg, by, len(keys))
    error = assert_refused(store, lambda: getattr(store, method)(keys, blocks))
    message = str(error)
    if kind == "dtype":
        assert isinstance(error, TypeError) and str(arg) in message and str(LAYOUT.dtype) in message
    elif kind in ("shape", "count"):
        assert isinstance(error, ValueError) and ("shape" in message or "one per key" in message), message
    elif kind == "meta":
        assert isinstance(error, ValueError) and "meta" in message
    else:
        assert isinstance(error, TypeError)


@SETTINGS
@given(method=st.sampled_from(["get", "get_async"]), bad=st.one_of(
    bad_tensor, st.tuples(st.just("noncontiguous"), st.sampled_from(["transpose", "stride", "channels"]),
                          st.just(0))))
def test_a_bad_out_tensor_is_refused_and_left_untouched(store, method, bad):
    kind, arg, by = bad
    keys = STORED[:3]
    if kind == "noncontiguous":
        out = noncontiguous_like(torch.full((3, *SHAPE), 7, dtype=LAYOUT.dtype), arg)
        assume(not out.is_contiguous())
    else:
        assume(arg != "none")  # out=None is the default: a new tensor
        out = make_bad_tensor(kind, arg, by, len(keys))
    sentinel = out.clone() if isinstance(out, torch.Tensor) and out.device.type == "cpu" else None
    error = assert_refused(store, lambda: getattr(store, method)(keys, out=out))
    assert "out" in str(error)
    if sentinel is not None:
        assert torch.equal(as_bytes(out), as_bytes(sentinel)), "a refused out= was written"


# ---------------------------------------------------------------------------------------------------------------
# non-contiguous blocks: accepted, stored bit-exact


def noncontiguous_like(t: torch.Tensor, how: str) -> torch.Tensor:
    """A view with ``t``'s shape and values but not contiguous memory."""
    if how == "transpose":  # stored transposed, viewed back
        return t.transpose(-1, -3).contiguous().transpose(-1, -3)
    if how == "stride":  # every other element of a larger buffer
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if how == "channels":  # the block dimension last in memory
        return t.movedim(0, -1).contiguous().movedim(-1, 0)
    raise AssertionError(how)


@SETTINGS
@given(how=st.sampled_from(["transpose", "stride", "channels", "expand"]), seed=st.integers(0, 2**16),
       n=st.integers(1, 3), method=st.sampled_from(["put", "put_async"]))
def test_non_contiguous_blocks_are_stored_bit_exact(tmp_path_factory, how, seed, n, method):
    setup = make_tier_setup("device+host+disk", tmp_path_factory.mktemp("noncontig"), LAYOUT)
    keys = tierkv.block_keys(prompt(seed, n), block_tokens=BT)
    with setup.open(device=1, host=1, disk=8) as s:  # blocks land in every tier, the disk too
        if how == "expand":
            one = make_blocks(1, LAYOUT, seed=seed)
            blocks = one.expand(n, *SHAPE)  # stride 0 over the blocks: n copies of one block
        else:
            blocks = noncontiguous_like(make_blocks(n, LAYOUT, seed=seed), how)
        assert not blocks.is_contiguous() or n == 1
        expected = blocks.contiguous().clone()
        stored = getattr(s, method)(keys, blocks)
        if method == "put_async":
            stored = stored.result(timeout=FUTURE_TIMEOUT_S)
        assert stored == n
        assert_bit_equal(s.get(keys), expected)
        s.flush()
    with setup.open(device=1, host=1, disk=8) as s:
        assert_bit_equal(s.get(keys), expected, "after a restart")


# ---------------------------------------------------------------------------------------------------------------
# duplicate keys in one call


@settings(max_examples=40, deadline=None)
@given(picks=st.lists(st.integers(0, 4), min_size=1, max_size=10), policy=st.sampled_from(["lru", "relevance"]),
       stored_first=st.integers(0, 2))
def test_duplicate_keys_in_one_call(tmp_path_factory, picks, policy, stored_first):
    """put stores a repeated key's first block (later ones ignored) and counts it once; get returns the block at
    every place it is asked; lookup, locate and delete treat a repeat like any key; nothing is corrupted."""
    setup = make_tier_setup("device+host+disk", tmp_path_factory.mktemp("dups"), LAYOUT)
    pool = tierkv.block_keys(prompt(len(picks) * 31 + stored_first, 5), block_tokens=BT)
    keys = [pool[i] for i in picks]
    blocks = make_blocks(len(keys), LAYOUT, seed=len(picks))
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    with setup.open(device=8, host=2, disk=16, policy=policy) as s:
        already = pool[:stored_first]
        earlier = make_blocks(len(already), LAYOUT, seed=1234)
        s.put(already, earlier)
        truth = dict(zip(already, earlier))
        new = [k for k in first if k not in truth]
        assert s.put(keys, blocks) == len(new)
        for k in new:
            truth[k] = blocks[first[k]]
        expected = torch.stack([truth[k] for k in keys])
        assert_bit_equal(s.get(keys), expected, "get with repeats")
        assert s.lookup(keys) == len(keys)
        assert s.locate(keys).count(None) == 0
        assert s.prefetch(keys).result(timeout=FUTURE_TIMEOUT_S) == len(set(keys))
        assert_bit_equal(s.get_async(keys).result(timeout=FUTURE_TIMEOUT_S), expected)
        s.flush()
        assert s.delete(keys) == len(set(keys))
        assert not any(k in s for k in keys)
        assert s.delete(keys) == 0
        survivors = [k for k in truth if k not in set(keys)]
        if survivors:
            assert_bit_equal(s.get(survivors), torch.stack([truth[k] for k in survivors]))
    with setup.open(device=8, host=2, disk=16, policy=policy) as s:
        assert not any(k in s for k in keys), "deleted repeats came back after a restart"


# ---------------------------------------------------------------------------------------------------------------
# empty calls


def test_empty_calls_are_no_ops(store):
    before = snapshot(store)
    empty = torch.empty((0, *SHAPE), dtype=LAYOUT.dtype)
    assert store.put([], empty) == 0
    assert store.put((), empty) == 0
    assert store.put_async([], empty).result(timeout=FUTURE_TIMEOUT_S) == 0
    assert tuple(store.get([]).shape) == (0, *SHAPE)
    assert store.get([], out=empty) is empty
    assert tuple(store.get_async([]).result(timeout=FUTURE_TIMEOUT_S).shape) == (0, *SHAPE)
    assert store.lookup([]) == 0
    assert store.lookup(iter([])) == 0
    assert store.locate([]) == []
    assert store.delete([]) == 0
    assert store.prefetch([]).result(timeout=FUTURE_TIMEOUT_S) == 0
    assert store.lookup_tokens([]) == 0
    assert store.lookup_tokens(TOKENS[:BT - 1]) == 0  # no full block
    assert store.lookup_tokens(np.empty(0, dtype=np.int64)) == 0
    assert tierkv.block_keys([]) == []
    assert snapshot(store) == before
    assert_bit_equal(store.get(STORED), BLOCKS)


def test_empty_keys_with_blocks_or_blocks_without_keys_are_refused(store):
    assert_refused(store, lambda: store.put([], blocks_for(1)))
    assert_refused(store, lambda: store.put(ABSENT[:1], torch.empty((0, *SHAPE), dtype=LAYOUT.dtype)))
    assert_refused(store, lambda: store.put([], torch.empty(0, dtype=LAYOUT.dtype)))
    assert_refused(store, lambda: store.get([], out=torch.empty((1, *SHAPE), dtype=LAYOUT.dtype)))


# ---------------------------------------------------------------------------------------------------------------
# token arrays and block_keys / lookup_tokens

bad_tokens = st.one_of(
    # ValueError: outside [0, 2**32)
    st.lists(st.integers(0, 2**32 - 1), max_size=12).flatmap(
        lambda good: st.tuples(st.just(good), st.integers(0, len(good)),
                               st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)))).map(
        lambda t: ("range", t[0][:t[1]] + [t[2]] + t[0][t[1]:])),
    st.sampled_from([-1, -(2**31), 2**32, 2**40, 2**63 - 1]).map(
        lambda v: ("range", np.array([1, v, 2], dtype=np.int64))),
    st.sampled_from([2**32, 2**63]).map(lambda v: ("range", np.array([v], dtype=np.uint64))),
    st.just(("range", torch.tensor([5, -3, 2], dtype=torch.int64))),
    # ValueError: shape, device
    st.sampled_from([(2, 8), (1, 16), (4, 4, 1)]).map(lambda s: ("shape", np.zeros(s, dtype=np.int64))),
    st.just(("shape", torch.zeros((2, 8), dtype=torch.int32))),
    st.just(("shape", torch.tensor(5))),
    st.just(("meta", torch.zeros(16, dtype=torch.int64, device="meta"))),
    # TypeError: not integers, not a sequence
    st.lists(st.integers(0, 100), min_size=1, max_size=8).flatmap(
        lambda good: st.tuples(st.just(good), st.one_of(st.floats(), st.text(max_size=3), st.none(),
                                                         st.just(b"x"), st.just([1]))).map(
            lambda t: ("type", t[0] + [t[1]]))),
    st.sampled_from([np.float32, np.float64, np.bool_, np.complex64, object]).map(
        lambda d: ("type", np.ones(16, dtype=d))),
    st.sampled_from([torch.float32, torch.bfloat16, torch.bool, torch.complex64]).map(
        lambda d: ("type", torch.ones(16, dtype=d))),
    st.sampled_from([None, 5, 5.0, "0123", b"0123", bytearray(4), np.int64(3), {1, 2, 3}, {1: 2}]).map(
        lambda v: ("type", v)),
)

EXPECTED_ERROR = {"range": ValueError, "shape": ValueError, "meta": ValueError, "type": TypeError}


@SETTINGS
@given(bad=bad_tokens, block_tokens=st.sampled_from([1, 2, 4, 16]), salt=st.binary(max_size=8))
def test_bad_token_arrays_are_refused_by_block_keys(bad, block_tokens, salt):
    kind, tokens = bad
    with pytest.raises(EXPECTED_ERROR[kind]) as info:
        tierkv.block_keys(tokens, block_tokens=block_tokens, salt=salt)
    assert EXPECTED_GOT.search(str(info.value)), str(info.value)
    with pytest.raises(EXPECTED_ERROR[kind]):
        tierkv.keys.block_keys_reference(tokens, block_tokens, salt)


@SETTINGS
@given(bad=bad_tokens)
def test_bad_token_arrays_are_refused_by_lookup_tokens(store, bad):
    kind, tokens = bad
    error = assert_refused(store, lambda: store.lookup_tokens(tokens))
    assert isinstance(error, EXPECTED_ERROR[kind]), error


bad_salt = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.lists(st.integers(0, 255), max_size=4))
bad_block_tokens = st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.none(), st.text(max_size=3),
                             st.just(np.float32(4)))


@SETTINGS
@given(salt=bad_salt)
def test_a_salt_that_is_not_bytes_is_refused(store, salt):
    with pytest.raises(TypeError, match="expected salt as bytes, got"):
        tierkv.block_keys(TOKENS, block_tokens=BT, salt=salt)
    error = assert_refused(store, lambda: store.lookup_tokens(TOKENS, salt=salt))
    assert isinstance(error, TypeError)


@SETTINGS
@given(block_tokens=bad_block_tokens)
def test_a_bad_block_tokens_is_refused(block_tokens):
    with pytest.raises(ValueError, match=EXPECTED_GOT):
        tierkv.block_keys(TOKENS, block_tokens=block_tokens)


@pytest.mark.parametrize("block_tokens", [2**31, 2**40, 2**64 + 1])
def test_a_block_larger_than_the_prompt_gives_no_keys_without_allocating_one(block_tokens):
    # the native chain used to size a buffer of 4 * block_tokens bytes even when no block was full
    assert tierkv.block_keys([1, 2, 3], block_tokens=block_tokens) == []
    index = tierkv.prefix_index.make_prefix_index()
    index.set(KNOWN[0], 1)
    assert index.longest_prefix_tokens([1, 2, 3], block_tokens, tierkv.keys.root_key()) == 0


@SETTINGS
@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=40), block_tokens=st.integers(1, 8))
def test_python_bools_are_ints_but_bool_arrays_are_refused(tokens, block_tokens):
    """A list may hold Python bools (``True == 1``, as everywhere in Python); a bool *array* says by its dtype
    that it holds no token ids and is refused."""
    as_bools = [bool(t % 2) for t in tokens]
    assert tierkv.block_keys(as_bools, block_tokens) == tierkv.block_keys([int(b) for b in as_bools], block_tokens)
    for array in (np.array(as_bools, dtype=bool), torch.tensor(as_bools, dtype=torch.bool)):
        with pytest.raises(TypeError, match="bool"):
            tierkv.block_keys(array, block_tokens)


# ---------------------------------------------------------------------------------------------------------------
# KVLayout and StoreConfig

bad_dim = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.booleans(), st.none(),
                    st.text(max_size=3), st.just(np.int64(2)), st.just([2]))
bad_dtype = st.sampled_from([torch.float64, torch.int32, torch.int64, torch.bool, torch.complex64, torch.int16,
                             "float64", "bf16", "torch.float", "", None, 3, np.float16, np.dtype("float16")])


@SETTINGS
@given(field=st.sampled_from(["num_layers", "num_kv_heads", "head_dim", "block_tokens"]), value=bad_dim)
def test_kvlayout_refuses_a_bad_dimension(field, value):
    args = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=4)
    args[field] = value
    with pytest.raises(BAD, match=EXPECTED_GOT) as info:
        tierkv.KVLayout(**args)
    assert field in str(info.value)


@SETTINGS
@given(dtype=bad_dtype)
def test_kvlayout_refuses_a_bad_dtype(dtype):
    with pytest.raises(TypeError, match=EXPECTED_GOT):
        tierkv.KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=dtype)


BAD_CONFIG = {
    "device_bytes": st.one_of(st.integers(max_value=-1), st.floats(), st.booleans(), st.none(),
                              st.sampled_from(["-5", "lots", "1.5.2G", "8X", "", [1]])),
    "disk_bytes": st.one_of(st.integers(max_value=-1), st.floats(), st.none(), st.sampled_from(["-1", "lots"])),
    "writeback_bytes": st.one_of(st.integers(max_value=-1), st.floats(), st.sampled_from(["many", True])),
    "host_codec": st.sampled_from(["zstd", "FP8", "", None, 8, ["none"]]),
    "disk_codec": st.sampled_from(["zstd", "Int8", None, 0]),
    "policy": st.sampled_from(["LRU", "random", "", None, 3, ["lru"], "no_such_module_xyz:Policy",
                               "tierkv.config:StoreConfig", "tierkv.config.parse_bytes"]),
    "disk_backend": st.sampled_from(["gds", "", None, "POSIX"]),
    "io_threads": st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.sampled_from(["4", None])),
    "disk_admit_uses": st.one_of(st.integers(max_value=0), st.sampled_from([1.5, True, "2"])),
    "disk_path": st.sampled_from(["", b"/tmp/x", 3, ["/tmp"], "/tmp/a\0b"]),
}


@SETTINGS
@given(data=st.data(), field=st.sampled_from(sorted(BAD_CONFIG)))
def test_store_config_refuses_a_bad_value(data, field):
    value = data.draw(BAD_CONFIG[field])
    args = dict(device_bytes=1 << 20, host_bytes=1 << 20)
    if field in ("disk_bytes",):
        args["disk_path"] = "/nonexistent/tierkv"
    if field == "disk_path":
        args["disk_bytes"] = 1 << 20
    args[field] = value
    with pytest.raises(BAD, match=EXPECTED_GOT):
        tierkv.StoreConfig(**args)


@pytest.mark.parametrize("layout, config", [
    ({"num_layers": 2}, None), (LAYOUT, {"device_bytes": 1}), (None, None), ("bfloat16", None)],
    ids=["dict-layout", "dict-config", "none-layout", "str-layout"])
def test_block_store_refuses_what_is_not_a_layout_or_config(layout, config):
    with pytest.raises(TypeError, match=EXPECTED_GOT):
        tierkv.BlockStore(layout, config)


# ---------------------------------------------------------------------------------------------------------------
# after close


def test_every_method_after_close_raises_store_closed(tmp_path):
    setup = make_tier_setup("device+host+disk", tmp_path, LAYOUT)
    s = setup.open()
    s.put(STORED, BLOCKS)
    s.close()
    good = {
        "put": lambda: s.put(ABSENT, blocks_for(2)),
        "put_async": lambda: s.put_async(ABSENT, blocks_for(2)),
        "get": lambda: s.get(STORED),
        "get_out": lambda: s.get(STORED, out=torch.empty((4, *SHAPE), dtype=LAYOUT.dtype)),
        "get_async": lambda: s.get_async(STORED),
        "prefetch": lambda: s.prefetch(STORED),
        "lookup": lambda: s.lookup(STORED),
        "lookup_tokens": lambda: s.lookup_tokens(TOKENS),
        "locate": lambda: s.locate(STORED),
        "in": lambda: STORED[0] in s,
        "delete": lambda: s.delete(STORED),
        "flush": s.flush,
        "drain": s.drain,
        "stats": s.stats,
        # empty calls too: a closed store answers nothing, not even "nothing"
        "get_empty": lambda: s.get([]),
        "lookup_empty": lambda: s.lookup([]),
        "put_empty": lambda: s.put([], torch.empty((0, *SHAPE), dtype=LAYOUT.dtype)),
    }
    for name, call in good.items():
        with pytest.raises(tierkv.StoreClosed, match="expected an open store, got one that was closed"):
            result = call()
            if isinstance(result, Future):  # not expected: async methods refuse at once once closed
                result.result(timeout=FUTURE_TIMEOUT_S)
        assert s.closed, name
    s.close()  # still idempotent
    with setup.open() as reopened:  # and what it held is intact
        assert_bit_equal(reopened.get(STORED), BLOCKS)
