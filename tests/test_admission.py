"""The disk tier's admission rule (``disk_admit_uses``): one-off blocks do not wear the SSD."""
from __future__ import annotations

import pytest

import tierkv
from conftest import assert_bit_equal, check_invariants, make_blocks, make_keys, make_tier_setup


def open_store(tmp_path, layout, admit: int, host: int = 2, disk: int = 8):
    return make_tier_setup("host+disk", tmp_path, layout).open(host=host, disk=disk, disk_admit_uses=admit)


def test_one_off_blocks_fall_off_instead_of_reaching_the_disk(tmp_path, layout):
    keys = make_keys(4, seed=101)
    with open_store(tmp_path, layout, admit=2) as store:
        for i in range(4):
            store.put(keys[i:i + 1], make_blocks(1, layout, seed=i))
        stats = store.stats()
        assert stats["disk"].used_blocks == 0 and stats["disk"].bytes_written == 0
        assert stats["disk"].not_admitted == 2 and stats.dropped == 2
        assert [k in store for k in keys] == [False, False, True, True]
        check_invariants(store)


def test_a_block_used_twice_is_admitted(tmp_path, layout):
    a, b, c, d = make_keys(4, seed=102)
    blocks = make_blocks(4, layout, seed=103)
    with open_store(tmp_path, layout, admit=2) as store:
        store.put([a], blocks[0:1])
        store.get([a])                      # second use
        store.put([b], blocks[1:2])
        store.put([c], blocks[2:3])         # a (used twice) goes down: admitted
        store.put([d], blocks[3:4])         # b (used once) goes down: refused
        assert a in store and b not in store
        assert store.stats()["disk"].used_blocks == 1 and store.stats()["disk"].not_admitted == 1
        assert_bit_equal(store.get([a]), blocks[0:1])


def test_a_refused_block_that_comes_back_counts_its_earlier_use(tmp_path, layout):
    keys = make_keys(3, seed=104)
    blocks = make_blocks(3, layout, seed=105)
    with open_store(tmp_path, layout, admit=2) as store:
        store.put(keys[:1], blocks[:1])
        store.put(keys[1:3], blocks[1:3])   # keys[0] pushed down and refused
        assert keys[0] not in store
        store.put(keys[:1], blocks[:1])     # the same prompt again: its second use
        store.put(keys[1:3], blocks[1:3])   # keys[0] pushed down again: now admitted
        assert keys[0] in store and store.stats()["disk"].used_blocks == 1


def test_flush_writes_every_block_whatever_the_rule(tmp_path, layout):
    keys = make_keys(2, seed=106)
    blocks = make_blocks(2, layout, seed=107)
    with open_store(tmp_path, layout, admit=5) as store:
        store.put(keys, blocks)
        store.flush()
        assert store.stats()["disk"].used_blocks == 2
    with open_store(tmp_path, layout, admit=5) as store:
        assert_bit_equal(store.get(keys), blocks)


def test_the_default_admits_everything(tmp_path, layout):
    with open_store(tmp_path, layout, admit=1) as store:
        for i, k in enumerate(make_keys(4, seed=108)):
            store.put([k], make_blocks(1, layout, seed=i))
        assert store.stats()["disk"].used_blocks == 2 and store.stats()["disk"].not_admitted == 0


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_admission_values_are_refused(bad):
    with pytest.raises(ValueError, match="disk_admit_uses"):
        tierkv.StoreConfig(host_bytes=1 << 20, disk_admit_uses=bad)


def test_the_rule_comes_from_the_environment():
    config = tierkv.StoreConfig.from_env({"TIERKV_HOST_BYTES": "1MiB", "TIERKV_DISK_ADMIT_USES": "3"})
    assert config.disk_admit_uses == 3
