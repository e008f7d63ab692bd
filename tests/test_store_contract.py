"""BlockStore behaviour every tier combination must keep (ARCHITECTURE.md, "Public API").

Each scenario runs on "device", "device+host", "device+host+disk" and "host+disk" (see ``tier_config``).
"""
from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

import tierkv
from conftest import (assert_bit_equal, check_invariants, gpu, make_blocks, make_keys, make_tier_setup, tiny_layout,
                      used_blocks)


# ---------------------------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("combo", ["device", "device+host", "device+host+disk", "host+disk"])
def test_put_then_get_is_bit_exact_for_every_dtype(combo, layout_any_dtype, tmp_path):
    setup = make_tier_setup(combo, tmp_path, layout_any_dtype)
    keys = make_keys(6, seed=1, layout=layout_any_dtype)
    blocks = make_blocks(6, layout_any_dtype, seed=2)
    with setup.open() as store:
        store.put(keys, blocks)
        out = store.get(keys)
        assert_bit_equal(out, blocks)
        assert_bit_equal(store.get(keys[2:4]), blocks[2:4])
        assert_bit_equal(store.get([keys[5], keys[0]]), blocks[[5, 0]])


def test_get_returns_a_cpu_tensor_of_the_layout(store, layout):
    keys = make_keys(3)
    store.put(keys, make_blocks(3, layout))
    out = store.get(keys)
    assert tuple(out.shape) == (3, *layout.block_shape)
    assert out.dtype == layout.dtype
    assert out.device.type == "cpu"  # no CUDA on this machine: the store's device is cpu


def test_get_returns_data_that_does_not_alias_the_callers_tensor(store, layout):
    keys = make_keys(2)
    blocks = make_blocks(2, layout, seed=3)
    original = blocks.clone()
    store.put(keys, blocks)
    blocks.view(torch.uint8).fill_(0)  # the caller reuses its buffer after put returns
    assert_bit_equal(store.get(keys), original)


def test_put_accepts_a_non_contiguous_tensor(store, layout):
    keys = make_keys(3, seed=4)
    wide = make_blocks(6, layout, seed=5)
    strided = wide[::2]
    assert not strided.is_contiguous()
    store.put(keys, strided)
    assert_bit_equal(store.get(keys), strided.contiguous())


def test_get_of_a_key_twice_returns_it_twice(store, layout):
    keys = make_keys(2, seed=40)
    blocks = make_blocks(2, layout, seed=41)
    store.put(keys, blocks)
    assert_bit_equal(store.get([keys[1], keys[0], keys[1]]), blocks[[1, 0, 1]])


def test_get_into_out_fills_and_returns_it(store, layout):
    keys = make_keys(4, seed=6)
    blocks = make_blocks(4, layout, seed=7)
    store.put(keys, blocks)
    out = torch.empty((4, *layout.block_shape), dtype=layout.dtype)
    got = store.get(keys, out=out)
    assert got is out
    assert_bit_equal(out, blocks)


def test_empty_calls_work(store, layout):
    store.put([], torch.empty((0, *layout.block_shape), dtype=layout.dtype))
    out = store.get([])
    assert tuple(out.shape) == (0, *layout.block_shape)
    assert out.dtype == layout.dtype
    assert store.lookup([]) == 0
    store.delete([])
    assert all(v == 0 for v in used_blocks(store).values())


# ---------------------------------------------------------------------------------------------------------------
# lookup / contains


def test_lookup_returns_the_longest_stored_prefix(store, layout):
    keys = make_keys(8, seed=8)
    assert store.lookup(keys) == 0
    store.put(keys[:5], make_blocks(5, layout))
    assert store.lookup(keys) == 5
    assert store.lookup(keys[:3]) == 3
    assert store.lookup(keys[5:]) == 0


def test_lookup_tokens_agrees_with_lookup_of_the_block_keys(store, layout):
    """Random prompts, a random subset of their blocks stored or deleted: the token walk (hashing and probing
    in one call) finds the same prefix as lookup(block_keys(...)), for every input type it accepts."""
    import numpy as np

    rng = np.random.default_rng(61)
    B = layout.block_tokens
    for trial in range(12):
        tokens = rng.integers(0, 2**32, size=int(rng.integers(0, 10 * B)), dtype=np.uint64).astype(np.uint32)
        keys = tierkv.block_keys(tokens, B)
        stored = [k for k in keys if rng.random() < 0.8]
        if stored:
            store.put(stored, make_blocks(len(stored), layout, seed=trial))
        if trial % 3 == 0 and keys:
            store.delete([keys[int(rng.integers(len(keys)))]])
        want = store.lookup(keys)
        assert store.lookup_tokens(tokens) == want
        assert store.lookup_tokens(tokens.tolist()) == want
        assert store.lookup_tokens(torch.from_numpy(tokens.astype(np.int64))) == want
        assert store.lookup_tokens(tokens[:len(tokens) - len(tokens) % B]) == want  # the partial tail counts not


def test_lookup_tokens_of_another_salt_finds_nothing(store, layout):
    tokens = list(range(4 * layout.block_tokens))
    store.put(tierkv.block_keys(tokens, layout.block_tokens, salt=b"tenant-a"), make_blocks(4, layout))
    assert store.lookup_tokens(tokens, salt=b"tenant-a") == 4
    assert store.lookup_tokens(tokens, salt=b"tenant-b") == 0
    assert store.lookup_tokens(tokens) == 0


@pytest.mark.parametrize("tokens, error", [([1, -1], ValueError), ([1, 2**32], ValueError), ([1.5], TypeError),
                                           ([[1, 2]], TypeError), ("abc", TypeError)])
def test_lookup_tokens_refuses_bad_tokens_like_block_keys(store, tokens, error):
    with pytest.raises(error):
        tierkv.block_keys(tokens)
    with pytest.raises(error):
        store.lookup_tokens(tokens)


def test_a_gap_stops_the_prefix(store, layout):
    keys = make_keys(8, seed=9)
    present = [0, 1, 2, 4, 5]
    store.put([keys[i] for i in present], make_blocks(len(present), layout))
    assert store.lookup(keys) == 3
    assert store.lookup(keys[4:]) == 2
    n = store.lookup(keys)
    assert tuple(store.get(keys[:n]).shape)[0] == n


def test_contains(store, layout):
    keys = make_keys(3, seed=10)
    store.put(keys[:2], make_blocks(2, layout))
    assert keys[0] in store
    assert keys[1] in store
    assert keys[2] not in store
    assert make_keys(1, seed=11)[0] not in store


def test_get_of_a_missing_key_raises_block_not_found_naming_it(store, layout):
    keys = make_keys(3, seed=12)
    store.put(keys[:2], make_blocks(2, layout))
    with pytest.raises(tierkv.BlockNotFound) as info:
        store.get(keys)
    assert isinstance(info.value, KeyError)
    assert keys[2].hex() in str(info.value)
    # the present keys are still served
    assert store.lookup(keys) == 2


# ---------------------------------------------------------------------------------------------------------------
# delete


def test_delete_removes_keys(store, layout):
    keys = make_keys(8, seed=13)
    blocks = make_blocks(8, layout, seed=14)
    store.put(keys, blocks)
    store.delete(keys[5:])
    assert store.lookup(keys) == 5
    for k in keys[5:]:
        assert k not in store
        with pytest.raises(tierkv.BlockNotFound) as info:
            store.get([k])
        assert isinstance(info.value, KeyError)
        assert k.hex() in str(info.value)
    assert_bit_equal(store.get(keys[:5]), blocks[:5])


def test_delete_of_a_missing_key_is_a_no_op(store, layout):
    keys = make_keys(3, seed=15)
    store.put(keys[:1], make_blocks(1, layout))
    before = used_blocks(store)
    store.delete(keys[1:])
    store.delete(keys[1:])
    assert used_blocks(store) == before
    assert store.lookup(keys) == 1


def test_delete_frees_room(tier_config, layout):
    with tier_config.open(device=2, host=2, disk=2) as store:
        keys = make_keys(2, seed=16)
        store.put(keys, make_blocks(2, layout))
        store.delete(keys)
        assert all(v == 0 for v in used_blocks(store).values())
        again = make_keys(2, seed=17)
        blocks = make_blocks(2, layout, seed=18)
        store.put(again, blocks)
        assert_bit_equal(store.get(again), blocks)


def test_a_deleted_key_can_be_put_again(store, layout):
    key = make_keys(1, seed=19)
    first, second = make_blocks(2, layout, seed=20).split(1)
    store.put(key, first)
    store.delete(key)
    store.put(key, second)
    assert_bit_equal(store.get(key), second)


# ---------------------------------------------------------------------------------------------------------------
# put of an existing key


def test_put_of_an_existing_key_keeps_the_stored_bytes(store, layout):
    keys = make_keys(3, seed=21)
    first = make_blocks(3, layout, seed=22)
    second = make_blocks(3, layout, seed=23)
    store.put(keys, first)
    store.put(keys, second)
    assert_bit_equal(store.get(keys), first)
    # a mixed put stores only the new key
    extra = make_keys(4, seed=21)  # same prompt: shares keys[:3], adds one
    assert extra[:3] == keys
    third = make_blocks(4, layout, seed=24)
    store.put(extra, third)
    assert_bit_equal(store.get(extra[:3]), first)
    assert_bit_equal(store.get(extra[3:]), third[3:])


def test_put_of_an_existing_key_in_a_lower_tier_keeps_the_stored_bytes(tier_config, layout):
    with tier_config.open(device=2, host=2, disk=8) as store:
        keys = make_keys(6, seed=25)
        first = make_blocks(6, layout, seed=26)
        for i, k in enumerate(keys[:4]):
            store.put([k], first[i:i + 1])
        present = [i for i in range(4) if keys[i] in store]
        assert present, "the most recent blocks must still be stored"
        store.put([keys[i] for i in present], make_blocks(len(present), layout, seed=27))
        assert store.lookup([keys[i] for i in present]) == len(present)
        # one get for all: reading them one by one could promote one and push another off the last tier
        assert_bit_equal(store.get([keys[i] for i in present]), first[present])


def test_put_of_an_existing_key_refreshes_its_recency(tmp_path, layout):
    setup = make_tier_setup("device", tmp_path, layout)
    with setup.open(device=2) as store:
        a, b, c = make_keys(3, seed=28)
        store.put([a], make_blocks(1, layout, 1))
        store.put([b], make_blocks(1, layout, 2))
        store.put([a], make_blocks(1, layout, 3))  # a is now the most recent
        store.put([c], make_blocks(1, layout, 4))  # room for c: b, the least recent, goes
        assert a in store and c in store
        assert b not in store
        assert_bit_equal(store.get([a]), make_blocks(1, layout, 1))


def test_get_refreshes_recency(tmp_path, layout):
    setup = make_tier_setup("device", tmp_path, layout)
    with setup.open(device=2) as store:
        a, b, c = make_keys(3, seed=29)
        store.put([a], make_blocks(1, layout, 1))
        store.put([b], make_blocks(1, layout, 2))
        store.get([a])
        store.put([c], make_blocks(1, layout, 3))
        assert a in store and c in store
        assert b not in store


# ---------------------------------------------------------------------------------------------------------------
# eviction and promotion


def check_consistent(store, keys, expected):
    """Every key that ``in``/``lookup`` report present is gettable bit-exact; every absent one raises
    BlockNotFound. Checked key by key, because a get may promote and so demote others."""
    present = []
    for i, k in enumerate(keys):
        contained = k in store
        assert contained == (store.lookup([k]) == 1), f"key {i}: `in` and lookup disagree"
        if contained:
            assert_bit_equal(store.get([k]), expected[i:i + 1], f"key {i}")
            present.append(i)
        else:
            with pytest.raises(tierkv.BlockNotFound):
                store.get([k])
    return present


def test_more_blocks_than_fit_fall_off_the_last_tier(tier_config, layout):
    caps = dict(device=2, host=2, disk=3)
    total = sum(tier_config.capacities(**caps).values())
    n = 5 * total
    keys = make_keys(n, seed=30)
    blocks = make_blocks(n, layout, seed=31)
    with tier_config.open(**caps) as store:
        for i in range(n):
            store.put(keys[i:i + 1], blocks[i:i + 1])  # no exception: running out of room is not an error
        assert keys[-1] in store, "the block put last is the most valuable one"
        assert keys[0] not in store, "the oldest block must have fallen off the last tier"
        present = check_consistent(store, keys, blocks)
        assert 1 <= len(present) <= total
        stats = store.stats()
        for name, cap in tier_config.capacities(**caps).items():
            assert stats.tiers[name].used_blocks <= stats.tiers[name].capacity_blocks <= cap
        assert sum(t.evictions for t in stats.tiers.values()) > 0


def test_chains_longer_than_a_tier_are_stored(tier_config, layout):
    caps = dict(device=2, host=2, disk=3)
    total = sum(tier_config.capacities(**caps).values())
    with tier_config.open(**caps) as store:
        for seed in range(4):
            keys = make_keys(min(total, 4), seed=100 + seed)
            blocks = make_blocks(len(keys), layout, seed=200 + seed)
            store.put(keys, blocks)
        # keys of the last put are the most recent: all of them fit somewhere
        assert store.lookup(keys) == len(keys)
        assert_bit_equal(store.get(keys), blocks)


def test_a_single_put_larger_than_the_whole_store(tier_config, layout):
    caps = dict(device=2, host=2, disk=3)
    total = sum(tier_config.capacities(**caps).values())
    n = 3 * total
    keys = make_keys(n, seed=42)
    blocks = make_blocks(n, layout, seed=43)
    with tier_config.open(**caps) as store:
        store.put(keys, blocks)  # not an error: the chain's first blocks fall off as later ones arrive
        assert keys[-1] in store, "the last block of the chain is the most recent"
        assert keys[0] not in store, "the first block of the chain is the least recent"
        present = check_consistent(store, keys, blocks)
        assert 1 <= len(present) <= total


@pytest.mark.parametrize("touch", ["get", "put"])
def test_when_several_blocks_go_down_at_once_the_least_recent_falls_off(tier_config, layout, touch):
    """Top tier 3 blocks, the tier below 2 (the one below that, if any, 2 as well, and it is filled first).

    a, b, c fill the top tier, then a is used again. Three new blocks push a, b, c down together; the tier below
    has room for two of them, so one falls further (or off the last tier): LRU says that one is b, never a.
    """
    if len(tier_config.tiers) < 2:
        pytest.skip("needs a tier below the top one")
    top, second = tier_config.tiers[:2]
    caps = {"device": 2, "host": 2, "disk": 2, top: 3}
    with tier_config.open(**caps) as store:
        if len(tier_config.tiers) == 3:  # fill the last tier with older blocks first, so it too must choose
            old = make_keys(7, seed=50)
            for i in range(7):
                store.put(old[i:i + 1], make_blocks(1, layout, seed=i))
        a, b, c, x, y, z = make_keys(6, seed=51)
        blocks = make_blocks(6, layout, seed=52)
        for i, k in enumerate((a, b, c)):
            store.put([k], blocks[i:i + 1])
        if touch == "get":
            store.get([a])
        else:
            store.put([a], blocks[0:1])
        store.put([x, y, z], blocks[3:6])
        assert [k in store for k in (x, y, z)] == [True, True, True]
        assert a in store, "a, the most recently used of a, b, c, was pushed off while b stayed"
        assert c in store
        if len(tier_config.tiers) == 2:
            assert b not in store, "b is the least recently used block"
        assert_bit_equal(store.get([a]), blocks[0:1])


def test_a_put_keeps_every_key_it_refreshes(tier_config, layout):
    """Top tier 3 blocks, the tiers below 2 each. a, b, c, d are put one by one (a goes down a tier), then the
    chain [a, x, y]: a is refreshed, x and y push b and c down. LRU says b falls, a stays: the whole chain is
    retrievable right after the put that stored it."""
    if len(tier_config.tiers) < 2:
        pytest.skip("needs a tier below the top one")
    caps = {"device": 2, "host": 2, "disk": 2, tier_config.top: 3}
    a, b, c, d, x, y = make_keys(6, seed=53)
    blocks = make_blocks(6, layout, seed=54)
    with tier_config.open(**caps) as store:
        if len(tier_config.tiers) == 3:  # fill the tiers with older blocks first, so every tier must choose
            old = make_keys(7, seed=55)
            for i in range(7):
                store.put(old[i:i + 1], make_blocks(1, layout, seed=i))
        for i in range(4):
            store.put([(a, b, c, d)[i]], blocks[i:i + 1])
        store.put([a, x, y], blocks[[0, 4, 5]])
        assert store.lookup([a, x, y]) == 3, (
            f"present after put([a, x, y]): {dict(zip('abcdxy', (k in store for k in (a, b, c, d, x, y))))}")
        assert c in store and d in store
        if len(tier_config.tiers) == 2:
            assert b not in store, "b is the least recently used block"
        assert_bit_equal(store.get([a, x, y]), blocks[[0, 4, 5]])


def test_a_flushed_copy_that_duplicates_a_memory_copy_makes_room_for_a_new_block(tmp_path, layout):
    """host 3, disk 2. [b, c] are put and flushed (both tiers hold them), then the chain [a, b, c, d]: a and d
    are new, and a, put first, is the least recent. Its room on disk comes from a disk copy that duplicates a
    host copy, so the whole chain stays cached instead of losing its head (which would make lookup 0)."""
    setup = make_tier_setup("host+disk", tmp_path, layout)
    a, b, c, d = make_keys(4, seed=57)
    blocks = make_blocks(4, layout, seed=58)
    with setup.open(host=3, disk=2) as store:
        store.put([b, c], blocks[1:3])
        store.flush()
        store.put([a, b, c, d], blocks)
        assert store.lookup([a, b, c, d]) == 4, f"present: {[k in store for k in (a, b, c, d)]}"
        assert_bit_equal(store.get([a, b, c, d]), blocks)
        check_invariants(store)


def test_eviction_with_chained_puts_stays_consistent(tier_config, layout):
    caps = dict(device=2, host=3, disk=4)
    with tier_config.open(**caps) as store:
        all_keys, all_blocks = [], []
        for seed in range(12):
            keys = make_keys(1 + seed % 4, seed=300 + seed)
            blocks = make_blocks(len(keys), layout, seed=400 + seed)
            store.put(keys, blocks)
            if seed % 3 == 0:
                store.get(keys[:store.lookup(keys)])
            all_keys += keys
            all_blocks.append(blocks)
        check_consistent(store, all_keys, torch.cat(all_blocks))


def test_get_promotes_a_block_from_a_lower_tier(tier_config, layout):
    if len(tier_config.tiers) < 2:
        pytest.skip("promotion needs two tiers")
    keys = make_keys(4, seed=32)
    blocks = make_blocks(4, layout, seed=33)
    top = tier_config.top
    caps = {"device": 8, "host": 8, "disk": 8, top: 2}
    with tier_config.open(**caps) as store:
        for i in range(4):  # the top tier holds 2 blocks: keys[0] goes down a tier
            store.put(keys[i:i + 1], blocks[i:i + 1])
        before = store.stats()
        assert_bit_equal(store.get(keys[:1]), blocks[:1])
        after = store.stats()
        lower = [t for t in tier_config.tiers if t != top]
        assert after.tiers[top].hits == before.tiers[top].hits, "keys[0] must not be in the full top tier"
        assert sum(after.tiers[t].hits for t in lower) == sum(before.tiers[t].hits for t in lower) + 1
        # the read promoted it: the next read is a hit in the top tier
        assert_bit_equal(store.get(keys[:1]), blocks[:1])
        again = store.stats()
        assert again.tiers[top].hits == after.tiers[top].hits + 1
        assert sum(t.promotions for t in again.tiers.values()) >= 1
        check_consistent(store, keys, blocks)


def test_an_old_block_is_read_back_from_disk(disk_config, layout):
    keys = make_keys(6, seed=34)
    blocks = make_blocks(6, layout, seed=35)
    with disk_config.open(device=2, host=2, disk=8) as store:
        for i in range(len(keys)):
            store.put(keys[i:i + 1], blocks[i:i + 1])
        before = store.stats().tiers["disk"].hits
        assert_bit_equal(store.get(keys[:1]), blocks[:1])
        assert store.stats().tiers["disk"].hits == before + 1
        check_consistent(store, keys, blocks)


# ---------------------------------------------------------------------------------------------------------------
# stats


def test_stats_name_the_enabled_tiers_with_their_capacities(tier_config, layout):
    caps = dict(device=3, host=5, disk=7)
    with tier_config.open(**caps) as store:
        stats = store.stats()
        assert isinstance(stats, tierkv.StoreStats)
        assert set(stats.tiers) == set(tier_config.tiers)
        for name, cap in tier_config.capacities(**caps).items():
            t = stats.tiers[name]
            assert isinstance(t, tierkv.TierStats)
            assert t.name == name
            assert stats[name] == t
            assert t.used_blocks == 0 and t.used_bytes == 0
            if name == "disk":  # per-block overhead counts against disk_bytes
                assert 1 <= t.capacity_blocks <= cap
                assert t.capacity_bytes <= cap * 4096
            else:
                assert t.capacity_blocks == cap
                assert t.capacity_bytes == cap * layout.block_nbytes
        assert stats.hits == 0 and stats.misses == 0 and stats.corrupt == 0


def test_stats_count_used_blocks_hits_and_misses(tier_config, layout):
    with tier_config.open() as store:
        keys = make_keys(4, seed=36)
        store.put(keys[:3], make_blocks(3, layout))
        stats = store.stats()
        assert stats.tiers[tier_config.top].used_blocks >= 1
        assert max(t.used_blocks for t in stats.tiers.values()) == 3
        store.get(keys[:3])
        with pytest.raises(tierkv.BlockNotFound):
            store.get(keys[3:])
        stats = store.stats()
        assert stats.hits == 3
        assert stats.misses == 1
        assert stats.tiers[tier_config.top].hits == 3


# ---------------------------------------------------------------------------------------------------------------
# lifecycle


def test_calls_after_close_raise_store_closed(tier_config, layout):
    store = tier_config.open()
    keys = make_keys(2, seed=37)
    blocks = make_blocks(2, layout)
    store.put(keys, blocks)
    store.close()
    calls = {
        "put": lambda: store.put(keys, blocks),
        "get": lambda: store.get(keys),
        "lookup": lambda: store.lookup(keys),
        "contains": lambda: keys[0] in store,
        "delete": lambda: store.delete(keys),
        "flush": lambda: store.flush(),
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError) as info:
            call()
        assert isinstance(info.value, tierkv.StoreClosed), name


def test_close_twice_is_harmless(tier_config):
    store = tier_config.open()
    store.close()
    store.close()


def test_context_manager_returns_the_store_and_closes_it(tier_config, layout):
    with tier_config.open() as store:
        assert isinstance(store, tierkv.BlockStore)
        store.put(make_keys(1), make_blocks(1, layout))
    with pytest.raises(tierkv.StoreClosed):
        store.lookup(make_keys(1))


def test_context_manager_closes_on_error(tier_config):
    with pytest.raises(ZeroDivisionError):
        with tier_config.open() as store:
            1 / 0
    with pytest.raises(tierkv.StoreClosed):
        store.lookup([])


def test_close_stops_every_thread_the_store_started(tier_config, layout):
    before = {t.ident for t in threading.enumerate()}
    with tier_config.open(device=2, host=2, disk=4) as store:
        keys = make_keys(8, seed=44)
        store.put(keys, make_blocks(8, layout))
        store.get(keys[store.lookup(keys) - 1:store.lookup(keys)])
        store.flush()
    leaked = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not leaked, f"threads still running after close(): {leaked}"


def test_import_starts_no_thread_and_touches_no_gpu():
    code = ("import threading, sys; import tierkv; "
            "assert threading.active_count() == 1, [t.name for t in threading.enumerate()]; "
            "import torch; assert not torch.cuda.is_initialized(), 'CUDA initialized by import'; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_store_closed_is_a_runtime_error():
    assert issubclass(tierkv.StoreClosed, RuntimeError)
    assert issubclass(tierkv.BlockNotFound, KeyError)


def test_flush_without_a_disk_tier_is_harmless(tier_config, layout):
    with tier_config.open() as store:
        keys = make_keys(2, seed=38)
        blocks = make_blocks(2, layout)
        store.put(keys, blocks)
        store.flush()
        assert_bit_equal(store.get(keys), blocks)


def test_config_from_env(monkeypatch, tmp_path):
    env = {"TIERKV_DEVICE_BYTES": "1048576", "TIERKV_HOST_BYTES": "2097152", "TIERKV_DISK_PATH": str(tmp_path),
           "TIERKV_DISK_BYTES": "8388608", "TIERKV_HOST_CODEC": "none", "TIERKV_DISK_CODEC": "none",
           "TIERKV_POLICY": "lru"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tierkv.StoreConfig.from_env()
    assert (config.device_bytes, config.host_bytes, config.disk_bytes) == (1 << 20, 2 << 20, 8 << 20)
    assert config.disk_path == str(tmp_path)
    assert (config.host_codec, config.disk_codec, config.policy) == ("none", "none", "lru")


def test_config_from_env_rejects_bad_values(monkeypatch):
    monkeypatch.setenv("TIERKV_DEVICE_BYTES", "lots")
    with pytest.raises(ValueError, match="expected"):
        tierkv.StoreConfig.from_env()


def test_config_defaults():
    config = tierkv.StoreConfig(device_bytes=1 << 20, host_bytes=0)
    assert config.host_codec == "none"
    assert config.disk_codec == "none"
    assert config.policy == "lru"
    assert config.disk_path is None


def test_layout_shape_and_size():
    layout = tierkv.KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16, dtype=torch.bfloat16)
    assert layout.block_shape == (32, 2, 16, 8, 128)
    assert layout.block_nbytes == 32 * 2 * 16 * 8 * 128 * 2
    assert tiny_layout(torch.float32).block_nbytes == 2 * 2 * 4 * 2 * 16 * 4


# ---------------------------------------------------------------------------------------------------------------
# CUDA (skipped on CPU-only machines)


@gpu
def test_store_device_is_cuda_when_available(tier_config, layout):
    keys = make_keys(3, seed=45)
    blocks = make_blocks(3, layout, seed=46)
    with tier_config.open(device=2, host=2, disk=4) as store:
        store.put(keys, blocks.cuda())  # blocks may come from any device
        n = store.lookup(keys)
        out = store.get(keys[:n])
        expected = "cuda" if "device" in tier_config.tiers else "cpu"
        assert out.device.type == expected
        assert_bit_equal(out, blocks[:n])


@gpu
def test_get_into_a_cuda_out(layout, tmp_path):
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys = make_keys(4, seed=47)
    blocks = make_blocks(4, layout, seed=48)
    with setup.open(device=2, host=2, disk=8) as store:
        store.put(keys, blocks)
        out = torch.empty((4, *layout.block_shape), dtype=layout.dtype, device="cuda")
        assert store.get(keys, out=out) is out
        assert_bit_equal(out, blocks)


def test_a_get_naming_one_key_twice_promotes_it_once(tier_config, layout):
    """Duplicate keys in one get return the block twice and leave one copy per tier, no leaked slot."""
    if len(tier_config.tiers) < 2:
        pytest.skip("promotion needs two tiers")
    keys = make_keys(4, seed=900)
    blocks = make_blocks(4, layout, seed=901)
    with tier_config.open(device=2, host=2, disk=4) as store:
        for i in range(4):
            store.put(keys[i:i + 1], blocks[i:i + 1])
        assert keys[0] in store
        got = store.get([keys[0], keys[0]])
        assert_bit_equal(got, blocks[[0, 0]])
        check_invariants(store, dict(zip(keys, blocks)))


def test_stats_report_latency_per_operation_and_tier_of_origin(tmp_path, layout):
    """get latency is filed under the lowest tier its blocks came from (what an operator asks: how slow is a
    disk hit), demotions under the tier they went to; quantiles are bucket edges within 19% and never above
    the largest sample."""
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys = make_keys(6, seed=91)
    blocks = make_blocks(6, layout, seed=92)
    with setup.open(device=2, host=2, disk=8) as store:
        store.put(keys, blocks)              # 2 on device, 2 demoted to host, 2 further to disk
        store.lookup(keys)
        store.lookup_tokens(list(range(2 * layout.block_tokens)))
        store.get(keys[4:6])                 # device
        store.get(keys[0:1])                 # from the disk (the oldest block)
        with pytest.raises(tierkv.BlockNotFound):
            store.get(make_keys(1, seed=93))
        latency = store.stats().latency
        assert {"lookup", "lookup_tokens", "put", "get.device", "get.host", "get.disk", "get.miss",
                "demote.host", "demote.disk"} <= set(latency)
        for op in ("lookup", "lookup_tokens", "put", "get.device", "get.disk", "get.miss"):
            assert latency[op].count == 1, (op, latency[op])
        assert latency["demote.host"].count >= 1 and latency["demote.disk"].count >= 1
        assert latency["get.host"].count == 0 and latency["get.host"].p99_s == 0.0
        for op, l in latency.items():
            assert 0 <= l.p50_s <= l.p99_s <= l.max_s and sum(l.buckets) == l.count, (op, l)
        assert "latency" in store.stats().as_dict()


def test_latency_quantiles_are_bucket_edges_within_a_fifth():
    from tierkv.stats import LatencyHistogram

    h = LatencyHistogram()
    for us in range(1, 1001):  # 1 us .. 1 ms, uniform
        h.record(us * 1e-6)
    s = h.snapshot()
    assert s.count == 1000 and abs(s.mean_s - 500.5e-6) < 1e-9 and s.max_s == pytest.approx(1e-3)
    assert 500e-6 <= s.p50_s <= 500e-6 * 1.19
    assert 990e-6 <= s.p99_s <= 1e-3


def test_locate_names_the_tier_each_block_is_read_from(tmp_path, layout):
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys, blocks = make_keys(6, seed=880), make_blocks(6, layout, seed=881)
    missing = make_keys(1, seed=882)[0]
    with setup.open(device=2, host=2, disk=8) as store:
        store.put(keys, blocks)  # oldest two on disk, next two on host, newest two on the device
        assert store.locate(keys + [missing]) == ["disk", "disk", "host", "host", "device", "device", None]
        store.get(keys[:1])      # promoted: read from the device now
        assert store.locate(keys[:1]) == ["device"]
        with pytest.raises(ValueError, match="expected 16-byte keys"):
            store.locate([b"x"])
