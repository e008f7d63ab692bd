"""All methods are safe to call from several threads at once.

Eight threads put, get, look up and delete on one store whose tiers hold only a few blocks, so eviction and
promotion run all the time. A block's bytes are a pure function of its key, so every thread can check every
block it gets. The only exception allowed is BlockNotFound (a key evicted or deleted under our feet).
"""
from __future__ import annotations

import random
import threading
import time

import pytest

import tierkv
from conftest import assert_bit_equal, block_for_key, blocks_for_keys, check_invariants, make_keys, make_tier_setup

THREADS = 8
# The full hierarchy gets the longest run; the other combinations a shorter one, to keep the suite fast.
DURATION = {"device+host+disk": 3.0}
DEFAULT_DURATION = 1.0


def worker(store, layout, prompts, deadline, seed, errors, counts, tokens=None):
    rng = random.Random(seed)
    try:
        while time.monotonic() < deadline:
            p = rng.randrange(len(prompts))
            keys = prompts[p]
            op = rng.random()
            if op < 0.35:  # put a chain of 1-4 keys of one prompt
                start = rng.randrange(len(keys))
                chain = keys[start:start + rng.randint(1, 4)]
                store.put(chain, blocks_for_keys(chain, layout))
                counts["put"] += 1
            elif op < 0.65:  # get what lookup promised, or a random key
                if rng.random() < 0.5:
                    n = store.lookup(keys)
                    chain = keys[:n]
                else:
                    chain = [rng.choice(keys)]
                try:
                    out = store.get(chain)
                except tierkv.BlockNotFound as exc:
                    assert any(k.hex() in str(exc) for k in chain), f"BlockNotFound for a key not asked: {exc}"
                    counts["miss"] += 1
                    continue
                for i, k in enumerate(chain):
                    assert_bit_equal(out[i], block_for_key(k, layout), f"key {k.hex()}")
                counts["hit"] += 1
            elif op < 0.85:
                n = store.lookup(keys)
                assert 0 <= n <= len(keys)
                bool(rng.choice(keys) in store)
                if tokens is not None:  # the native walk hashes the prompt while writers change the index
                    assert 0 <= store.lookup_tokens(tokens[p]) <= len(keys)
                counts["lookup"] += 1
            elif op < 0.95:
                store.delete([rng.choice(keys)])
                counts["delete"] += 1
            else:
                store.flush()
                counts["flush"] += 1
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


@pytest.mark.parametrize("combo, policy", [("device", "lru"), ("device+host", "lru"), ("device+host+disk", "lru"),
                                           ("host+disk", "lru"), ("device+host+disk", "relevance")])
def test_threads_hammering_one_store(combo, policy, tmp_path, layout):
    setup = make_tier_setup(combo, tmp_path, layout)
    # 6 prompts of 8 blocks (48 keys) for tiers of 2-4 blocks; keys derived from tokens, for lookup_tokens
    tokens = [list(range(1000 * p, 1000 * p + 8 * layout.block_tokens)) for p in range(6)]
    prompts = [tierkv.block_keys(t, layout.block_tokens) for t in tokens]
    errors: list[BaseException] = []
    counts = {k: 0 for k in ("put", "hit", "miss", "lookup", "delete", "flush")}
    with setup.open(device=2, host=3, disk=4, policy=policy) as store:
        deadline = time.monotonic() + DURATION.get(combo, DEFAULT_DURATION)
        threads = [threading.Thread(target=worker,
                                    args=(store, layout, prompts, deadline, seed, errors, counts, tokens),
                                    name=f"tierkv-test-{seed}")
                   for seed in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a thread hangs (deadlock?)"
        if errors:
            raise errors[0]
        assert counts["put"] > 0 and counts["hit"] > 0, counts

        # afterwards the store is consistent, and every key it reports is served bit-exact
        check_invariants(store, expected={k: block_for_key(k, layout) for p in prompts for k in p})
        for keys in prompts:
            for k in keys:
                if k in store:
                    assert_bit_equal(store.get([k])[0], block_for_key(k, layout))


@pytest.mark.parametrize("combo", ["device+host", "device+host+disk", "host+disk"])
def test_close_while_other_threads_work(combo, tmp_path, layout):
    """Threads busy on the store see StoreClosed (or BlockNotFound) once it closes; nothing hangs or crashes."""
    setup = make_tier_setup(combo, tmp_path, layout)
    prompts = [make_keys(8, seed=2000 + p) for p in range(4)]
    store = setup.open(device=2, host=3, disk=4)
    errors: list[BaseException] = []
    closed = threading.Event()

    def work(seed):
        rng = random.Random(seed)
        while True:
            keys = rng.choice(prompts)
            try:
                r = rng.random()
                if r < 0.4:
                    store.put(keys[:3], blocks_for_keys(keys[:3], layout))
                elif r < 0.8:
                    chain = keys[:store.lookup(keys)]
                    out = store.get(chain)
                    for i, k in enumerate(chain):
                        assert_bit_equal(out[i], block_for_key(k, layout), f"key {k.hex()}")
                else:
                    store.flush()
            except tierkv.BlockNotFound:
                pass
            except tierkv.StoreClosed:
                if closed.is_set():
                    return
                errors.append(AssertionError("StoreClosed before close()"))
                return
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=work, args=(seed,), name=f"tierkv-test-{seed}") for seed in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    closed.set()
    store.close()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a thread hangs after close()"
    if errors:
        raise errors[0]
    if setup.has_disk:  # what close persisted is readable and right
        with setup.open(device=2, host=3, disk=4) as again:
            for keys in prompts:
                for k in keys:
                    if k in again:
                        assert_bit_equal(again.get([k])[0], block_for_key(k, layout))


# -- the asynchronous engine under load ------------------------------------------------------------------------
STRESS_THREADS = 16


def async_worker(store, layout, prompts, deadline, seed, errors, counts):
    """Random put/get/prefetch/delete, half of them through the async API; every block a get returns is
    checked byte for byte against the pure function of its key."""
    rng = random.Random(seed)

    def check(chain, out):
        for i, k in enumerate(chain):
            assert_bit_equal(out[i], block_for_key(k, layout), f"key {k.hex()}")
        counts["hit"] += 1

    try:
        while time.monotonic() < deadline:
            keys = rng.choice(prompts)
            start = rng.randrange(len(keys))
            chain = keys[start:start + rng.randint(1, 4)]
            op, use_async = rng.random(), rng.random() < 0.5
            try:
                if op < 0.35:
                    blocks = blocks_for_keys(chain, layout)
                    new = store.put_async(chain, blocks).result(60) if use_async else store.put(chain, blocks)
                    assert 0 <= new <= len(chain)
                    counts["put"] += 1
                elif op < 0.7:
                    chain = keys[:store.lookup(keys)] if rng.random() < 0.5 else chain
                    check(chain, store.get_async(chain).result(60) if use_async else store.get(chain))
                elif op < 0.88:
                    n = store.prefetch(chain).result(60)
                    assert 0 <= n <= len(chain)
                    counts["prefetch"] += 1
                elif op < 0.97:
                    store.delete([rng.choice(keys)])
                    counts["delete"] += 1
                else:
                    store.flush()
                    counts["flush"] += 1
            except tierkv.BlockNotFound as exc:
                assert any(k.hex() in str(exc) for k in chain), f"BlockNotFound for a key not asked: {exc}"
                counts["miss"] += 1
    except BaseException as exc:  # reported by the main thread
        errors.append(exc)


@pytest.mark.parametrize("combo, policy, writeback", [
    ("device+host+disk", "lru", True), ("device+host+disk", "relevance", True),
    ("host+disk", "lru", True), ("device+host+disk", "lru", False)])
def test_sixteen_threads_of_async_traffic_on_tiny_tiers(combo, policy, writeback, tmp_path, layout):
    """16 threads, put/get/prefetch/delete/flush with and without futures, on tiers of 2-4 blocks with a
    write-behind arena of 2 blocks (or none): eviction, promotion, staging and back-pressure all the time."""
    setup = make_tier_setup(combo, tmp_path, layout)
    prompts = [make_keys(8, seed=3000 + p) for p in range(6)]
    errors: list[BaseException] = []
    counts = {k: 0 for k in ("put", "hit", "miss", "prefetch", "delete", "flush")}
    with setup.open(device=2, host=3, disk=4, policy=policy, writeback_bytes=2 * 4096 if writeback else 0) as store:
        deadline = time.monotonic() + 3.0
        threads = [threading.Thread(target=async_worker, args=(store, layout, prompts, deadline, seed, errors, counts),
                                    name=f"tierkv-test-{seed}") for seed in range(STRESS_THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a thread hangs (deadlock?)"
        if errors:
            raise errors[0]
        assert counts["put"] and counts["hit"] and counts["prefetch"], counts
        check_invariants(store, expected={k: block_for_key(k, layout) for p in prompts for k in p})
        for keys in prompts:
            for k in keys:
                if k in store:
                    assert_bit_equal(store.get([k])[0], block_for_key(k, layout))


@pytest.mark.parametrize("combo", ["device+host+disk", "host+disk"])
def test_close_under_heavy_traffic_keeps_every_block_flush_reported_durable(combo, tmp_path, layout):
    """Writers put new prompts (sync and async) while readers read and a flusher flushes; the store is closed
    in the middle of it. The disk holds every key, so nothing may fall off it: every block put before the
    start of the last flush that returned must be found after reopening, bit-exact."""
    setup = make_tier_setup(combo, tmp_path, layout)
    prompts = [make_keys(4, seed=4000 + p) for p in range(60)]
    capacity = dict(device=2, host=3, disk=len(prompts) * 4)
    store = setup.open(writeback_bytes=4 * 4096, **capacity)
    stored: set[bytes] = set()  # keys whose put returned
    stored_lock = threading.Lock()
    durable: set[bytes] = set()
    errors: list[BaseException] = []
    closing = threading.Event()

    def writer(seed):
        rng = random.Random(seed)
        for p in range(seed, len(prompts), 4):
            keys = prompts[p]
            try:
                blocks = blocks_for_keys(keys, layout)
                if rng.random() < 0.5:
                    store.put(keys, blocks)
                else:
                    store.put_async(keys, blocks).result(60)
                with stored_lock:
                    stored.update(keys)
            except tierkv.StoreClosed:
                assert closing.is_set(), "StoreClosed before close()"
                return
            except BaseException as exc:
                errors.append(exc)
                return

    def reader(seed):
        rng = random.Random(seed)
        while not closing.is_set():
            keys = rng.choice(prompts)
            try:
                chain = keys[:store.lookup(keys)]
                out = store.get(chain)
                for i, k in enumerate(chain):
                    assert_bit_equal(out[i], block_for_key(k, layout), f"key {k.hex()}")
                store.prefetch(keys)
            except (tierkv.BlockNotFound, tierkv.StoreClosed):
                pass
            except BaseException as exc:
                errors.append(exc)
                return

    def flusher():
        while not closing.is_set():
            with stored_lock:
                before = set(stored)
            try:
                store.flush()
            except tierkv.StoreClosed:
                return
            except BaseException as exc:
                errors.append(exc)
                return
            durable.update(before)

    threads = [threading.Thread(target=writer, args=(s,), name=f"tierkv-test-w{s}") for s in range(4)]
    threads += [threading.Thread(target=reader, args=(s,), name=f"tierkv-test-r{s}") for s in range(3)]
    threads.append(threading.Thread(target=flusher, name="tierkv-test-flush"))
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(durable) < 40 and time.monotonic() < deadline and not errors:
        time.sleep(0.01)
    closing.set()
    store.close()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a thread hangs after close()"
    if errors:
        raise errors[0]
    assert len(durable) >= 40, f"only {len(durable)} blocks were flushed before the deadline"
    with setup.open(**capacity) as again:
        missing = [k for k in durable if k not in again]
        assert not missing, f"{len(missing)} of {len(durable)} blocks flush had made durable are gone"
        lost = [k for k in stored if k not in again]  # close persists too: every put that returned is there
        assert not lost, f"{len(lost)} of {len(stored)} stored blocks did not survive close()"
        for k in durable:
            assert_bit_equal(again.get([k])[0], block_for_key(k, layout), f"key {k.hex()}")
        check_invariants(again, expected={k: block_for_key(k, layout) for p in prompts for k in p})
