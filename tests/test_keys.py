"""block_keys: chained prefix keys, exactly as the contract specifies them.

    root   = xxh3_128_digest(b"tierkv-v1" + salt)
    key[i] = xxh3_128_digest(key[i-1] + tokens of block i as little-endian uint32),  key[-1] = root

The tests recompute the chain with the ``xxhash`` package directly, so they pin the format, not the code.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import xxhash

import tierkv
import tierkv.keys


def spec_keys(tokens, block_tokens: int, salt: bytes = b"") -> list[bytes]:
    """The contract's definition, written out independently of tierkv."""
    tokens = [int(t) for t in tokens]
    parent = xxhash.xxh3_128_digest(b"tierkv-v1" + salt)
    keys = []
    for b in range(len(tokens) // block_tokens):
        block = tokens[b * block_tokens:(b + 1) * block_tokens]
        parent = xxhash.xxh3_128_digest(parent + struct.pack(f"<{block_tokens}I", *block))
        keys.append(parent)
    return keys


def random_tokens(n: int, seed: int, high: int = 2**32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size=n, dtype=np.uint64)


# ---------------------------------------------------------------------------------------------------------------
# the format


def test_keys_follow_the_documented_chain():
    tokens = list(range(100, 164))  # 4 full blocks of 16
    keys = tierkv.block_keys(tokens, block_tokens=16)
    assert keys == spec_keys(tokens, 16)
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)


def test_first_key_hashes_the_root_and_first_block():
    tokens = [1, 2, 3, 4]
    root = xxhash.xxh3_128_digest(b"tierkv-v1")
    expected = xxhash.xxh3_128_digest(root + b"\x01\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x04\x00\x00\x00")
    assert tierkv.block_keys(tokens, block_tokens=4) == [expected]


# Computed once with the xxhash package (xxh3_128, canonical digest) from the definition above for
# tokens 0..31, block_tokens=16; pins the key format across tierkv and xxhash versions, processes and machines.
KNOWN_ANSWER_NO_SALT = ["aa57f24aa6c24f617f1c23a08d887f9a", "87b738b702253c6eadfe5c4ce56e2c87"]
KNOWN_ANSWER_SALT_TENANT_A = ["8052b68d6e582e2e9e7deb8d66f5e9cd", "7697293585f9f6871da7ec869703fcab"]


def test_known_answer_vector():
    tokens = list(range(32))
    keys = tierkv.block_keys(tokens, block_tokens=16)
    assert [k.hex() for k in keys] == KNOWN_ANSWER_NO_SALT
    salted = tierkv.block_keys(tokens, block_tokens=16, salt=b"tenant-a")
    assert [k.hex() for k in salted] == KNOWN_ANSWER_SALT_TENANT_A
    # and the xxhash package itself still agrees with the pinned values
    assert [k.hex() for k in spec_keys(tokens, 16)] == KNOWN_ANSWER_NO_SALT


def test_tokens_are_little_endian_uint32():
    big = [2**32 - 1, 0, 2**31, 0x01020304]
    assert tierkv.block_keys(big, block_tokens=4) == spec_keys(big, 4)
    # byte order matters: the same values byte-swapped give another key
    swapped = [int.from_bytes(t.to_bytes(4, "little"), "big") for t in big]
    assert tierkv.block_keys(swapped, block_tokens=4) != tierkv.block_keys(big, block_tokens=4)


@pytest.mark.parametrize("n_tokens", [0, 1, 15, 16, 17, 31, 32, 33, 47])
def test_partial_tail_gets_no_key(n_tokens):
    tokens = list(range(n_tokens))
    keys = tierkv.block_keys(tokens, block_tokens=16)
    assert len(keys) == n_tokens // 16
    assert keys == spec_keys(tokens, 16)


def test_keys_are_prefix_chained():
    tokens = random_tokens(64, seed=1)
    full = tierkv.block_keys(tokens, block_tokens=16)
    assert tierkv.block_keys(tokens[:40], block_tokens=16) == full[:2]
    changed = tokens.copy()
    changed[20] ^= 1  # a change in block 1 changes keys 1.. but not key 0
    other = tierkv.block_keys(changed, block_tokens=16)
    assert other[0] == full[0]
    assert all(a != b for a, b in zip(other[1:], full[1:]))


def test_default_block_tokens_is_16_and_default_salt_is_empty():
    tokens = list(range(48))
    assert tierkv.block_keys(tokens) == spec_keys(tokens, 16, b"")
    assert tierkv.block_keys(tokens) == tierkv.block_keys(tokens, block_tokens=16, salt=b"")


# ---------------------------------------------------------------------------------------------------------------
# inputs


def test_list_numpy_and_torch_inputs_agree():
    tokens = [int(t) for t in random_tokens(80, seed=2, high=2**31)]
    expected = spec_keys(tokens, 16)
    inputs = {
        "list": tokens,
        "tuple": tuple(tokens),
        "numpy int64": np.asarray(tokens, dtype=np.int64),
        "numpy uint32": np.asarray(tokens, dtype=np.uint32),
        "numpy uint64": np.asarray(tokens, dtype=np.uint64),
        "numpy int32": np.asarray(tokens, dtype=np.int32),
        "numpy big-endian uint32": np.asarray(tokens, dtype=">u4"),
        "torch int64": torch.tensor(tokens, dtype=torch.int64),
        "torch int32": torch.tensor(tokens, dtype=torch.int32),
        "numpy strided": np.repeat(np.asarray(tokens, dtype=np.int64), 2)[::2],
        "torch strided": torch.tensor(tokens, dtype=torch.int64).repeat_interleave(2)[::2],
    }
    for name, value in inputs.items():
        assert tierkv.block_keys(value, block_tokens=16) == expected, name


def test_full_uint32_range_in_numpy_and_torch():
    tokens = np.array([0, 1, 2**31, 2**32 - 1] * 8, dtype=np.uint64)
    expected = spec_keys(tokens, 8)
    assert tierkv.block_keys(tokens, block_tokens=8) == expected
    assert tierkv.block_keys(tokens.astype(np.uint32), block_tokens=8) == expected
    assert tierkv.block_keys(torch.from_numpy(tokens.astype(np.int64)), block_tokens=8) == expected
    assert tierkv.block_keys([int(t) for t in tokens], block_tokens=8) == expected


def test_salt_isolates_tenants():
    tokens = random_tokens(128, seed=3)
    plain = tierkv.block_keys(tokens, block_tokens=16)
    a = tierkv.block_keys(tokens, block_tokens=16, salt=b"tenant-a")
    b = tierkv.block_keys(tokens, block_tokens=16, salt=b"tenant-b")
    assert a == spec_keys(tokens, 16, b"tenant-a")
    assert not (set(plain) & set(a)) and not (set(a) & set(b)) and not (set(plain) & set(b))
    assert tierkv.block_keys(tokens, block_tokens=16, salt=b"tenant-a") == a  # deterministic


@pytest.mark.parametrize("bad", [[0, 2**32], [-1, 5], [2**64]], ids=["2**32", "negative", "2**64"])
def test_token_outside_uint32_is_a_value_error(bad):
    with pytest.raises(ValueError):
        tierkv.block_keys(bad + [0, 0], block_tokens=2)


@pytest.mark.parametrize("make", [
    lambda: np.array([0, 2**32, 1, 2], dtype=np.uint64),
    lambda: np.array([0, -1, 1, 2], dtype=np.int64),
    lambda: torch.tensor([0, 2**32, 1, 2], dtype=torch.int64),
    lambda: torch.tensor([0, -5, 1, 2], dtype=torch.int64),
], ids=["numpy-2**32", "numpy-negative", "torch-2**32", "torch-negative"])
def test_out_of_range_arrays_are_value_errors(make):
    with pytest.raises(ValueError):
        tierkv.block_keys(make(), block_tokens=2)


def test_out_of_range_token_is_rejected_even_in_the_partial_tail():
    with pytest.raises(ValueError):
        tierkv.block_keys([1, 2, 3, 2**32], block_tokens=3)


@pytest.mark.parametrize("make", [
    lambda: [1.0, 2.0, 3.0, 4.0],
    lambda: [1, 2, 3.5, 4],
    lambda: np.array([1.0, 2.0, 3.0, 4.0]),
    lambda: torch.tensor([1.0, 2.0, 3.0, 4.0]),
    lambda: torch.tensor([1, 2, 3, 4], dtype=torch.bfloat16),
], ids=["list-floats", "list-mixed", "numpy-float", "torch-float", "torch-bf16"])
def test_float_tokens_are_a_type_error(make):
    with pytest.raises(TypeError):
        tierkv.block_keys(make(), block_tokens=2)


@pytest.mark.parametrize("make", [
    lambda: np.arange(8).reshape(2, 4),
    lambda: torch.arange(8).reshape(2, 4),
], ids=["numpy-2d", "torch-2d"])
def test_2d_tokens_are_a_value_error(make):
    with pytest.raises(ValueError):
        tierkv.block_keys(make(), block_tokens=2)


def test_nested_list_is_rejected():
    with pytest.raises((TypeError, ValueError)):
        tierkv.block_keys([[0, 1], [2, 3]], block_tokens=2)


# ---------------------------------------------------------------------------------------------------------------
# native vs reference


# Message = 16-byte parent + 4*block_tokens bytes: 20 and 28 (17-128 path), 80, 144 (129-240), 272, 416 (>240,
# one stripe block), 1040 and 4112 (several 1 KiB blocks of stripes).
BLOCK_TOKENS = [1, 3, 16, 32, 64, 100, 256, 1024]


def _lengths(bt: int) -> list[int]:
    return sorted({0, max(bt - 1, 0), bt, bt + 1, 2 * bt, 3 * bt + bt // 2, 5 * bt})


def _compare_native_and_reference(seed0: int) -> None:
    for bt in BLOCK_TOKENS:
        for i, n in enumerate(_lengths(bt)):
            tokens = random_tokens(n, seed=seed0 + 1000 * bt + i)
            for salt in (b"", b"s", b"a-much-longer-salt-for-a-tenant" * 3):
                fast = tierkv.block_keys(tokens, block_tokens=bt, salt=salt)
                ref = tierkv.keys.block_keys_reference(tokens, bt, salt)
                assert fast == ref, f"block_tokens={bt} n_tokens={n} salt={salt!r}"
                assert len(fast) == n // bt
        # the reference itself is the specification
        tokens = random_tokens(3 * bt, seed=seed0 + bt)
        assert tierkv.keys.block_keys_reference(tokens, bt, b"x") == spec_keys(tokens, bt, b"x")


def test_native_matches_reference(monkeypatch):
    monkeypatch.delenv("TIERKV_FORCE_REFERENCE", raising=False)
    _compare_native_and_reference(seed0=10)


def test_forced_reference_matches(monkeypatch):
    monkeypatch.setenv("TIERKV_FORCE_REFERENCE", "1")
    _compare_native_and_reference(seed0=20)


def test_native_and_forced_reference_give_the_same_keys(monkeypatch):
    tokens = random_tokens(16 * 37 + 5, seed=5)
    monkeypatch.delenv("TIERKV_FORCE_REFERENCE", raising=False)
    fast = tierkv.block_keys(tokens, block_tokens=16, salt=b"t")
    monkeypatch.setenv("TIERKV_FORCE_REFERENCE", "1")
    forced = tierkv.block_keys(tokens, block_tokens=16, salt=b"t")
    assert fast == forced == spec_keys(tokens, 16, b"t")


def test_native_matches_reference_on_strided_inputs():
    tokens = torch.from_numpy(random_tokens(16 * 12, seed=6).astype(np.int64))
    strided = tokens.repeat_interleave(3)[1::3]
    assert not strided.is_contiguous()
    assert tierkv.block_keys(strided, 16) == tierkv.keys.block_keys_reference(tokens, 16, b"")


def test_salt_must_be_bytes():
    with pytest.raises(TypeError):
        tierkv.block_keys([1, 2, 3, 4], block_tokens=2, salt="tenant-a")


@pytest.mark.parametrize("bad", [0, -1])
def test_block_tokens_must_be_positive(bad):
    with pytest.raises(ValueError):
        tierkv.block_keys([1, 2, 3, 4], block_tokens=bad)


def test_fewer_tokens_than_one_block_give_no_keys():
    assert tierkv.block_keys([1, 2, 3], block_tokens=4) == []
    assert tierkv.block_keys(np.empty(0, dtype=np.int64), block_tokens=4) == []
    assert tierkv.block_keys(torch.empty(0, dtype=torch.int64), block_tokens=4) == []
