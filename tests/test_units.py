"""Unit scenarios for the pieces under the store: config, policy, slot allocation, data file, index."""
from __future__ import annotations

import errno
import os

import pytest
import torch

import tierkv
from tierkv._memory import ALIGNMENT, aligned_empty
from tierkv.config import parse_bytes
from tierkv.index import DiskIndex, IndexRecord
from tierkv.io import PosixFile, open_data_file
from tierkv.policy import LRUPolicy, make_policy
from tierkv.tiers import SlotAllocator


# -- configuration -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [("4096", 4096), ("512M", 512 << 20), ("8GiB", 8 << 30),
                                            ("1.5G", 3 << 29), ("2gb", 2 * 1000**3), (7, 7)])
def test_sizes_parse_with_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-5", "5 parsecs", True, 1.5])
def test_bad_sizes_say_what_was_expected(bad):
    with pytest.raises((ValueError, TypeError), match="expected"):
        parse_bytes(bad)


def test_config_reads_every_field_from_the_environment(tmp_path):
    env = {"TIERKV_DEVICE_BYTES": "0", "TIERKV_HOST_BYTES": "64M", "TIERKV_DISK_PATH": str(tmp_path),
           "TIERKV_DISK_BYTES": "1G", "TIERKV_POLICY": "lru", "TIERKV_DISK_BACKEND": "posix",
           "TIERKV_IO_THREADS": "2", "TIERKV_HOST_CODEC": "none", "TIERKV_DISK_CODEC": "none"}
    config = tierkv.StoreConfig.from_env(env)
    assert (config.device_bytes, config.host_bytes, config.disk_bytes) == (0, 64 << 20, 1 << 30)
    assert config.disk_path == str(tmp_path) and config.io_threads == 2 and config.disk_backend == "posix"
    assert {name for name, *_ in tierkv.StoreConfig.describe()} == set(config.__dataclass_fields__)


def test_config_overrides_beat_the_environment():
    config = tierkv.StoreConfig.from_env({"TIERKV_HOST_BYTES": "1G"}, host_bytes=4096)
    assert config.host_bytes == 4096


@pytest.mark.parametrize("kwargs, fragment", [
    ({"disk_bytes": 1 << 20}, "disk_path"),
    ({"policy": "mru"}, "policy"),
    ({"host_codec": "zstd"}, "host_codec"),
    ({"disk_backend": "tape"}, "disk_backend"),
    ({"io_threads": 0}, "io_threads"),
    ({"device_bytes": 0, "host_bytes": 0}, "at least one tier"),
    ({"host_bytes": -1}, "host_bytes"),
])
def test_conflicting_or_unknown_settings_are_rejected(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        tierkv.StoreConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(Exception):
        tierkv.StoreConfig().host_bytes = 1  # type: ignore[misc]


# -- eviction policy -----------------------------------------------------------------------------------------
def test_lru_evicts_the_longest_idle_first_and_skips_protected():
    policy = LRUPolicy()
    for stamp, key in enumerate((b"a", b"b", b"c", b"d")):
        policy.insert(key, stamp)
    policy.touch(b"a", 10)  # order now b, c, d, a
    assert policy.evict(2, protected=lambda k: k == b"b") == [b"c", b"d"]
    assert policy.order() == [b"b", b"a"]


def test_lru_orders_by_last_use_not_by_arrival():
    policy = LRUPolicy()
    policy.insert(b"recent", 50)
    policy.insert(b"demoted", 7)  # arrives later, but was last used long ago
    assert policy.order() == [b"demoted", b"recent"]


def test_lru_never_evicts_a_block_more_recent_than_the_one_needing_room():
    policy = LRUPolicy()
    policy.insert(b"a", 5)
    policy.insert(b"b", 9)
    assert policy.evict(1, protected=lambda k: False, newer_than=5) is None
    assert policy.evict(1, protected=lambda k: False, newer_than=6) == [b"a"]
    assert policy.evict(1, protected=lambda k: False, newer_than=6) is None and b"b" in policy


def test_lru_evict_is_all_or_nothing():
    policy = make_policy("lru")
    policy.insert(b"a", 1)
    policy.insert(b"b", 2)
    assert policy.evict(2, protected=lambda k: k == b"a") is None
    assert len(policy) == 2 and b"a" in policy and b"b" in policy
    assert policy.evict(0, protected=lambda k: False) == []
    assert policy.evict(2, protected=lambda k: False) == [b"a", b"b"] and len(policy) == 0


def test_lru_stays_compact_under_many_touches():
    policy = LRUPolicy()
    policy.insert(b"a", 0)
    policy.insert(b"b", 1)
    for stamp in range(2, 10_000):
        policy.touch(b"a", stamp)
    assert len(policy._heap) < 200
    assert policy.order() == [b"b", b"a"]


def test_unknown_policy_name_is_a_value_error():
    with pytest.raises(ValueError, match="expected policy"):
        make_policy("clock")


# -- slots ---------------------------------------------------------------------------------------------------
def test_slot_allocator_hands_out_each_slot_once():
    slots = SlotAllocator(3)
    taken = [slots.allocate() for _ in range(3)]
    assert sorted(taken) == [0, 1, 2] and slots.allocate() is None
    slots.free(1)
    assert slots.free_count == 1 and slots.allocate() == 1
    slots.free(1)
    with pytest.raises(AssertionError, match="freed twice"):
        slots.free(1)


def test_aligned_buffers_are_page_aligned():
    for n in (0, 1, 4096, 12345):
        buf = aligned_empty(n)
        assert buf.numel() == n and buf.data_ptr() % ALIGNMENT == 0


# -- data file -----------------------------------------------------------------------------------------------
def test_posix_file_round_trips_aligned_blocks(tmp_path):
    f = PosixFile(str(tmp_path / "f.data"), 4 * 8192)
    try:
        assert os.stat(tmp_path / "f.data").st_size == 4 * 8192
        assert oct(os.stat(tmp_path / "f.data").st_mode & 0o777) == "0o600"
        src = aligned_empty(8192)
        src.copy_(torch.randint(0, 256, (8192,), dtype=torch.uint8))
        f.pwrite(src, 8192)
        dst = aligned_empty(8192)
        f.pread(dst, 8192)
        assert torch.equal(src, dst)
    finally:
        f.close()


def test_reading_past_a_truncated_file_is_an_io_error(tmp_path):
    path = str(tmp_path / "f.data")
    f = PosixFile(path, 2 * 4096)
    try:
        os.truncate(path, 4096)
        with pytest.raises(OSError) as info:
            f.pread(aligned_empty(4096), 4096)
        assert info.value.errno == errno.EIO
    finally:
        f.close()


def test_asking_for_kvikio_without_a_driver_names_the_reason(tmp_path):
    from tierkv.io import kvikio_usable

    usable, why = kvikio_usable()
    if usable:
        pytest.skip("kvikio is usable here")
    with pytest.raises(ValueError, match="kvikio"):
        open_data_file(str(tmp_path / "f.data"), 4096, backend="kvikio")


# -- index ---------------------------------------------------------------------------------------------------
def test_index_batches_become_visible_after_commit(tmp_path):
    index = DiskIndex(str(tmp_path), {"layout": {"a": 1}}, 16)
    try:
        index.stage(b"k" * 16, IndexRecord(3, 4096, 0, 99, 1.0, 1))
        assert index.records() == {}
        index.commit()
        assert index.records()[b"k" * 16].slot == 3
        index.stage(b"k" * 16, None)
        index.commit(durable=True)
        assert index.records() == {}
    finally:
        index.close()


def test_index_refuses_another_header(tmp_path):
    DiskIndex(str(tmp_path), {"layout": {"a": 1}}, 16).close()
    with pytest.raises(tierkv.LayoutMismatch, match="expected"):
        DiskIndex(str(tmp_path), {"layout": {"a": 2}}, 16)
