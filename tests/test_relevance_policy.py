"""The relevance policy: prefix chains leave tail first, blocks seen often (even before they last left) stay,
credit fades once they are no longer used, orphans are freed."""
from __future__ import annotations

import pytest

from conftest import assert_bit_equal, check_invariants, make_blocks, make_keys, make_tier_setup
from tierkv.policy import RelevancePolicy
from tierkv.policy.relevance import MAX_SEEN, MIN_TIER_BLOCKS, SAMPLE


def open_store(tmp_path, layout, combo="device", **caps):
    return make_tier_setup(combo, tmp_path, layout).open(policy="relevance", **caps)


def test_a_chain_too_long_for_the_store_keeps_its_head(tmp_path, layout):
    """LRU keeps the tail of a chain that does not fit (its head is the oldest block), which no lookup can
    use; relevance keeps the head, so lookup finds the longest prefix the store can hold."""
    keys = make_keys(6, seed=111)
    blocks = make_blocks(6, layout, seed=112)
    with open_store(tmp_path, layout, device=4) as store:
        store.put(keys, blocks)
        assert store.lookup(keys) == 4
        assert_bit_equal(store.get(keys[:4]), blocks[:4])
        check_invariants(store)
    with make_tier_setup("device", tmp_path, layout).open(device=4) as store:  # lru, for contrast
        store.put(keys, blocks)
        assert store.lookup(keys) == 0


def test_leaves_leave_before_their_ancestors(tmp_path, layout):
    """Two conversations share a 2-block system prompt; a third, unrelated prompt needs room: the evicted
    blocks are conversation tails, never the shared prefix."""
    system = make_keys(2, seed=113)
    conv_a, conv_b, other = make_keys(2, seed=114), make_keys(2, seed=115), make_keys(2, seed=116)
    blocks = make_blocks(2, layout, seed=117)
    with open_store(tmp_path, layout, device=6) as store:
        store.put(system + conv_a, make_blocks(4, layout, seed=1))
        store.put(system + conv_b, make_blocks(4, layout, seed=2))  # system refreshed, b added: 6 blocks
        store.put(other, blocks)                                      # needs 2 slots
        assert all(k in store for k in system), "the shared prefix stays"
        assert store.lookup(system + conv_b) >= 2 and store.lookup(system + conv_a) >= 2
        evicted = [k for k in conv_a + conv_b if k not in store]
        assert len(evicted) == 2
        for conv in (conv_a, conv_b):  # within a conversation, the later block leaves first
            assert not (conv[0] not in store and conv[1] in store)


def test_a_reused_prefix_outlives_a_stream_of_one_off_prompts(tmp_path, layout):
    system = make_keys(2, seed=118)
    with open_store(tmp_path, layout, device=8) as store:
        store.put(system, make_blocks(2, layout, seed=3))
        for turn in range(3):  # the system prompt is reused
            store.get(system)
        for i in range(6):  # one-off prompts of 2 blocks, more than the tier holds besides the prefix
            store.put(make_keys(2, seed=200 + i), make_blocks(2, layout, seed=i))
        assert store.lookup(system) == 2
    with make_tier_setup("device", tmp_path, layout).open(device=8) as store:  # lru forgets it
        store.put(system, make_blocks(2, layout, seed=3))
        for turn in range(3):
            store.get(system)
        for i in range(6):
            store.put(make_keys(2, seed=200 + i), make_blocks(2, layout, seed=i))
        assert store.lookup(system) == 0


@pytest.mark.parametrize("combo, caps", [("device", dict(device=3)), ("host+disk", dict(host=1, disk=2))])
def test_descendants_of_a_block_that_fell_off_the_last_tier_are_freed(tmp_path, layout, combo, caps):
    """[a, b] is a chain; b alone is read again and again (so it scores high) while a is not. When a falls off
    the last tier, b can no longer be found by any prefix lookup: it is freed too, counted in orphaned,
    and its slot serves newer blocks."""
    a, b = make_keys(2, seed=119)
    with open_store(tmp_path, layout, combo=combo, **caps) as store:
        store.put([a, b], make_blocks(2, layout, seed=4))
        for _ in range(3):
            store.get([b])
        newer = make_keys(3, seed=120)
        for i, k in enumerate(newer):
            store.put([k], make_blocks(1, layout, seed=10 + i))
        stats = store.stats()
        assert a not in store and b not in store
        assert stats.orphaned == 1 and stats.dropped >= 1
        assert all(k in store for k in newer[-2:])
        check_invariants(store)


def test_orphans_are_freed_in_every_tier_and_counted(tmp_path, layout):
    """host 1, disk 3 (the last tier): a 3-block chain leaves its head on the host, the rest on disk. Newer
    one-block prompts push the head down and the disk makes room by evicting its least relevant block; when
    a chain block falls off, what follows it goes too: the store never holds a block past a gap in its chain."""
    chain = make_keys(3, seed=122)
    with open_store(tmp_path, layout, combo="host+disk", host=1, disk=3) as store:
        store.put(chain, make_blocks(3, layout, seed=6))
        for i in range(4):
            store.put(make_keys(1, seed=123 + i), make_blocks(1, layout, seed=9 + i))
            present = [k in store for k in chain]
            assert present == sorted(present, reverse=True), f"after prompt {i}: {present}"
            check_invariants(store)
        stats = store.stats()
        lost = 3 - sum(k in store for k in chain)
        assert lost >= 1 and stats.orphaned + stats.dropped >= lost
        used = stats["host"].used_blocks + stats["disk"].used_blocks
        assert used == stats.blocks, "every slot in use holds a block the index still knows"


def test_a_sighting_is_worth_a_sample_of_recency_and_a_newcomer_counts_as_seen_once():
    """score = stamp + seen * SAMPLE * tier_blocks; a newcomer last used at newer_than is scored as seen once."""
    policy = RelevancePolicy()
    unit = SAMPLE * MIN_TIER_BLOCKS  # ticks one sighting is worth while the tier holds no more than that
    for stamp, key in enumerate([b"a", b"b", b"c"]):
        policy.insert(key, stamp)  # seen once each (their arrival): plain recency
    assert policy.order() == [b"a", b"b", b"c"]
    policy.touch(b"a", 3)  # seen twice: 3 + 2 * unit
    assert policy.seen(b"a") == 2 and policy.order() == [b"b", b"c", b"a"]
    assert policy.evict(1, lambda k: False) == [b"b"]
    # a (seen twice) holds against a newcomer used less than one unit after it, not against a later one
    assert policy.evict(1, lambda k: k == b"c", newer_than=3 + unit - 1) is None
    assert policy.evict(1, lambda k: k == b"c", newer_than=3 + unit + 1) == [b"a"]
    # c (seen once) gives way to any newer block, as under LRU, and to no older one
    assert policy.evict(1, lambda k: False, newer_than=2) is None
    assert policy.evict(1, lambda k: False, newer_than=3) == [b"c"]
    assert len(policy) == 0


def test_a_prefix_that_returns_after_being_evicted_is_recognised(tmp_path, layout):
    """A prompt is evicted by one-off prompts, then comes back, together with a prompt never seen before: the
    tier remembers the earlier visit, so the returning prompt outlives the next stream of one-off prompts and the
    new one does not. Under LRU both are gone (they are equally recent)."""
    returning, new = make_keys(2, seed=140), make_keys(2, seed=141)

    def scenario(store):
        store.put(returning, make_blocks(2, layout, seed=20))
        for i in range(4):  # 8 blocks of one-off prompts: a tier-full
            store.put(make_keys(2, seed=300 + i), make_blocks(2, layout, seed=30 + i))
        assert store.lookup(returning) == 0, "evicted: the tier must remember a key it no longer holds"
        store.put(returning, make_blocks(2, layout, seed=20))
        store.put(new, make_blocks(2, layout, seed=21))
        for i in range(4):
            store.put(make_keys(2, seed=400 + i), make_blocks(2, layout, seed=40 + i))
        check_invariants(store)
        return store.lookup(returning), store.lookup(new)

    with open_store(tmp_path, layout, device=8) as store:
        assert scenario(store) == (2, 0)
    with make_tier_setup("device", tmp_path, layout).open(device=8) as store:  # lru
        assert scenario(store) == (0, 0)


def _stream(policy, first_stamp, count, tier, newer_than=None):
    """Offer ``count`` one-off keys to a tier of ``tier`` blocks, as the manager does (evict one resident for
    each when full; a refused key is dropped). Yields after each arrival."""
    for i in range(count):
        stamp = first_stamp + i
        if len(policy) < tier or policy.evict(1, lambda k: False, stamp if newer_than is None else newer_than):
            policy.insert(b"one-off %d" % i, stamp)
        yield i


def test_the_credit_of_a_block_no_longer_used_fades_with_each_halving():
    """A block seen MAX_SEEN times outlives a stream of one-off keys for a while (LRU would drop it after a
    tier-full), then the halvings take its credit: it leaves within a few samples, not after the
    (MAX_SEEN - 1) * SAMPLE tier-fulls of ticks its credit was worth when it was last used."""
    policy = RelevancePolicy()
    sample = SAMPLE * MIN_TIER_BLOCKS
    policy.insert(b"hot", 0)
    for stamp in range(1, MAX_SEEN):
        policy.touch(b"hot", stamp)
    assert policy.seen(b"hot") == MAX_SEEN
    gone_after = next((i for i in _stream(policy, MAX_SEEN, 10 * sample, MIN_TIER_BLOCKS) if b"hot" not in policy),
                      None)
    assert gone_after is not None and sample // 2 < gone_after < 3 * sample < (MAX_SEEN - 1) * sample


def test_a_tier_that_refuses_every_arrival_still_ages():
    """A tier full of blocks seen often, offered only blocks older than all of them (a lower tier after the
    workload moved on): refused arrivals count as traffic, so the halvings come and a resident gives way in
    the end instead of the tier staying frozen."""
    policy = RelevancePolicy()
    stamp = 0
    for i in range(MIN_TIER_BLOCKS):
        policy.insert(b"hot %d" % i, stamp)
        for _ in range(MAX_SEEN - 1):
            stamp += 1
            policy.touch(b"hot %d" % i, stamp)
    residents = set(policy.order())
    first_admitted = next((i for i in _stream(policy, 0, 10 * SAMPLE * MIN_TIER_BLOCKS, MIN_TIER_BLOCKS,
                                              newer_than=stamp) if set(policy.order()) != residents), None)
    assert first_admitted is not None and first_admitted > MIN_TIER_BLOCKS, (
        "refused at first (every resident was seen more often), admitted once the halvings took their credit")


def test_a_shared_prefix_does_not_collect_the_keys_of_blocks_long_gone(tmp_path, layout):
    """A system prompt outlives thousands of conversations: the blocks stored after it that have left the store
    must not stay in its bookkeeping."""
    system = make_keys(1, seed=130)
    with open_store(tmp_path, layout, device=4) as store:
        for i in range(40):
            store.put(system + make_keys(1, seed=1000 + i), make_blocks(2, layout, seed=i))
            store.get(system)
        entry = store._manager._entries[system[0]]
        assert entry.children <= {k for k in entry.children if k in store}
        assert len(entry.children) <= 3


def test_the_other_trace_shapes_replay_both_policies_on_the_same_requests(tmp_path, monkeypatch):
    """bench_policy_shapes (the "never much lower than lru" check): each shape really is the default trace
    with its overrides, both policies replay the same requests, and the verdict follows the floor."""
    import io

    from tierkv.bench.policy import OTHER_SHAPES, POLICY_FLOOR_POINTS, TraceShape, bench_policy_shapes
    from tierkv.bench.progress import Progress

    monkeypatch.chdir(tmp_path)
    results, rows, failures = bench_policy_shapes(seed=1, requests=40, progress=Progress(99, io.StringIO()))
    assert list(results) == list(OTHER_SHAPES) and len(rows) == len(OTHER_SHAPES) and not failures
    for (name, overrides), row in zip(OTHER_SHAPES.items(), rows):
        run = results[name]
        assert run["shape"] == {**TraceShape(requests=40).__dict__, **overrides}
        assert run["lru"]["requested_blocks"] == run["relevance"]["requested_blocks"] > 0
        assert run["gain_points"] == 100 * (run["relevance"]["hit_rate"] - run["lru"]["hit_rate"])
        assert row[-1] == ("PASS" if run["gain_points"] >= POLICY_FLOOR_POINTS else "BELOW")
