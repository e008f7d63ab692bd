"""The disk tier: persistence across restarts, layout checks, checksums, bounds, exclusivity, I/O failures.

Data file(s): every regular file under ``disk_path`` whose name ends in ".data"; index: ``index.lmdb/``.
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import tierkv
from conftest import (PAGE, assert_bit_equal, data_files, make_blocks, make_keys, make_tier_setup, round_up, settle,
                      tiny_layout)


def reopen(setup, layout=None, **caps):
    return setup.open(layout=layout, **caps)


# ---------------------------------------------------------------------------------------------------------------
# restart recovery


def test_flushed_blocks_survive_a_restart(disk_config, layout):
    keys = make_keys(6, seed=1)
    blocks = make_blocks(6, layout, seed=2)
    with disk_config.open() as store:
        store.put(keys, blocks)
        store.flush()
    with reopen(disk_config) as store:
        assert store.lookup(keys) == 6
        assert all(k in store for k in keys)
        assert_bit_equal(store.get(keys), blocks)
        assert store.stats().tiers["disk"].used_blocks == 6


def test_close_persists_without_flush(disk_config, layout):
    keys = make_keys(6, seed=3)
    blocks = make_blocks(6, layout, seed=4)
    store = disk_config.open()
    store.put(keys, blocks)
    store.close()
    with reopen(disk_config) as store:
        assert store.lookup(keys) == 6
        assert_bit_equal(store.get(keys), blocks)


def test_context_manager_exit_persists(disk_config, layout):
    keys = make_keys(3, seed=5)
    blocks = make_blocks(3, layout, seed=6)
    with disk_config.open() as store:
        store.put(keys, blocks)
    with reopen(disk_config) as store:
        assert_bit_equal(store.get(keys), blocks)


def test_blocks_demoted_to_disk_and_resident_in_memory_all_survive(disk_config, layout):
    keys = make_keys(10, seed=7)
    blocks = make_blocks(10, layout, seed=8)
    with disk_config.open(device=2, host=2, disk=16) as store:
        for i in range(10):
            store.put(keys[i:i + 1], blocks[i:i + 1])
    with reopen(disk_config, device=2, host=2, disk=16) as store:
        assert store.lookup(keys) == 10
        for i in range(10):  # one by one: the memory tiers hold only 2 each
            assert_bit_equal(store.get(keys[i:i + 1]), blocks[i:i + 1], f"block {i}")


def test_flush_makes_every_resident_block_durable(disk_config, layout):
    keys = make_keys(6, seed=9)
    blocks = make_blocks(6, layout, seed=10)
    with disk_config.open() as store:
        store.put(keys, blocks)
        store.flush()
        assert store.stats().tiers["disk"].used_blocks == 6
        # flush copies: the blocks are still served (from memory or disk) in this process
        assert_bit_equal(store.get(keys), blocks)


def test_reopen_with_other_memory_capacities(disk_config, layout):
    keys = make_keys(5, seed=11)
    blocks = make_blocks(5, layout, seed=12)
    with disk_config.open(device=8, host=8, disk=16) as store:
        store.put(keys, blocks)
    with reopen(disk_config, device=1, host=1, disk=16) as store:
        for i in range(5):
            assert_bit_equal(store.get(keys[i:i + 1]), blocks[i:i + 1])


def test_several_restarts(disk_config, layout):
    keys = make_keys(9, seed=13)
    blocks = make_blocks(9, layout, seed=14)
    for round_ in range(3):
        with reopen(disk_config) as store:
            assert store.lookup(keys) == 3 * round_
            store.put(keys[3 * round_:3 * round_ + 3], blocks[3 * round_:3 * round_ + 3])
            assert_bit_equal(store.get(keys[:3 * round_ + 3]), blocks[:3 * round_ + 3])


@pytest.mark.parametrize("new_disk_blocks", [4, 32], ids=["smaller", "larger"])
def test_reopen_with_another_disk_size(disk_config, layout, new_disk_blocks):
    keys = make_keys(12, seed=41)
    blocks = make_blocks(12, layout, seed=42)
    with disk_config.open(device=2, host=2, disk=16) as store:
        store.put(keys, blocks)
    with reopen(disk_config, device=2, host=2, disk=new_disk_blocks) as store:
        present = [i for i, k in enumerate(keys) if k in store]
        if new_disk_blocks >= 12:
            assert present == list(range(12)), "a larger disk keeps every block"
        assert len(present) <= new_disk_blocks
        for i in present:
            assert_bit_equal(store.get(keys[i:i + 1]), blocks[i:i + 1], f"block {i}")
        store.put(keys, blocks)  # and it keeps working
        assert store.lookup(keys[-2:]) == 2
        stats = store.stats().tiers["disk"]
        assert stats.used_blocks <= stats.capacity_blocks <= new_disk_blocks
    size = sum(p.stat().st_size for p in data_files(disk_config.disk_dir))
    assert size <= new_disk_blocks * round_up(layout.block_nbytes)


# ---------------------------------------------------------------------------------------------------------------
# deletes


def test_deletes_survive_a_restart(disk_config, layout):
    keys = make_keys(6, seed=15)
    blocks = make_blocks(6, layout, seed=16)
    with disk_config.open() as store:
        store.put(keys, blocks)
        store.flush()
        store.delete(keys[3:])
    with reopen(disk_config) as store:
        assert store.lookup(keys) == 3
        assert not any(k in store for k in keys[3:])
        assert_bit_equal(store.get(keys[:3]), blocks[:3])
        for k in keys[3:]:
            with pytest.raises(tierkv.BlockNotFound):
                store.get([k])


def test_delete_after_a_restart_survives_the_next_one(disk_config, layout):
    keys = make_keys(4, seed=17)
    blocks = make_blocks(4, layout, seed=18)
    with disk_config.open() as store:
        store.put(keys, blocks)
    with reopen(disk_config) as store:
        store.delete(keys[1:2])
    with reopen(disk_config) as store:
        assert store.lookup(keys) == 1
        assert keys[1] not in store
        assert [k in store for k in keys] == [True, False, True, True]
        assert_bit_equal(store.get([keys[0], keys[2], keys[3]]), blocks[[0, 2, 3]])


# ---------------------------------------------------------------------------------------------------------------
# layout


def _names(message: str, layout: tierkv.KVLayout) -> bool:
    return str(layout) in message or repr(layout) in message


@pytest.mark.parametrize("change", [dict(head_dim=48), dict(num_layers=3), dict(block_tokens=8),
                                    dict(dtype=torch.float16)],
                         ids=["head_dim", "num_layers", "block_tokens", "dtype"])
def test_a_different_layout_is_refused_naming_both(disk_config, layout, change):
    keys = make_keys(3, seed=19)
    blocks = make_blocks(3, layout, seed=20)
    with disk_config.open() as store:
        store.put(keys, blocks)
    other = tiny_layout(**{"dtype": layout.dtype, **change})
    with pytest.raises(tierkv.LayoutMismatch) as info:
        reopen(disk_config, layout=other)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert _names(message, layout) and _names(message, other), message
    # the refusal left the disk tier intact and unlocked
    with reopen(disk_config) as store:
        assert_bit_equal(store.get(keys), blocks)


# ---------------------------------------------------------------------------------------------------------------
# checksums


def _flip_every_page(path, at: int = 1234) -> int:
    flipped = 0
    size = path.stat().st_size
    with open(path, "r+b") as f:
        for page in range(0, size, PAGE):
            if page + at >= size:
                break
            f.seek(page + at)
            byte = f.read(1)
            f.seek(page + at)
            f.write(bytes([byte[0] ^ 0xFF]))
            flipped += 1
        f.flush()
        os.fsync(f.fileno())
    return flipped


def test_corrupt_blocks_are_misses_never_wrong_data(disk_config):
    layout = tiny_layout(head_dim=64)  # exactly one 4 KiB page per block: every flipped byte is payload
    setup = make_tier_setup(disk_config.name, disk_config.disk_dir.parent, layout)
    keys = make_keys(5, seed=21, layout=layout)
    blocks = make_blocks(5, layout, seed=22)
    with setup.open() as store:
        store.put(keys, blocks)
        store.flush()
    files = data_files(setup.disk_dir)
    assert files, f"no *.data file under {setup.disk_dir}"
    assert sum(_flip_every_page(f) for f in files) >= 5
    with setup.open() as store:
        assert store.lookup(keys) in (0, 5)  # answered from the index: may still report the blocks
        with pytest.raises(tierkv.BlockNotFound):
            store.get(keys)
        for k in keys:
            with pytest.raises(tierkv.BlockNotFound) as info:
                store.get([k])
            assert k.hex() in str(info.value)
        stats = store.stats()
        assert stats.corrupt == 5, f"expected 5 corrupt blocks counted, got {stats.corrupt}"
        assert stats.tiers["disk"].corrupt == 5
        # a corrupt block is dropped: no longer reported, and not counted twice
        assert store.lookup(keys) == 0
        assert not any(k in store for k in keys)
        assert store.stats().tiers["disk"].used_blocks == 0
        with pytest.raises(tierkv.BlockNotFound):
            store.get(keys[:1])
        assert store.stats().corrupt == 5
    with setup.open() as store:  # dropped for good: a restart does not bring the corrupt blocks back
        for k in keys:
            with pytest.raises(tierkv.BlockNotFound):
                store.get([k])
        assert store.lookup(keys) == 0
        # and the store keeps serving: the keys can be stored again
        store.put(keys, blocks)
        assert_bit_equal(store.get(keys), blocks)
        store.flush()
    with setup.open() as store:
        assert_bit_equal(store.get(keys), blocks)


def test_a_truncated_data_file_gives_misses_not_wrong_data(disk_config, layout):
    keys = make_keys(4, seed=43)
    blocks = make_blocks(4, layout, seed=44)
    with disk_config.open() as store:
        store.put(keys, blocks)
    for path in data_files(disk_config.disk_dir):
        os.truncate(path, 0)
    with reopen(disk_config) as store:
        for k in keys:
            with pytest.raises(tierkv.BlockNotFound):
                store.get([k])
        store.put(keys, blocks)
        assert_bit_equal(store.get(keys), blocks)


def test_one_corrupt_block_does_not_affect_the_others(disk_config):
    layout = tiny_layout(head_dim=64)
    setup = make_tier_setup(disk_config.name, disk_config.disk_dir.parent, layout)
    keys = make_keys(4, seed=23, layout=layout)
    blocks = make_blocks(4, layout, seed=24)
    with setup.open() as store:
        store.put(keys, blocks)
        store.flush()
    victim = blocks[2].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    for path in data_files(setup.disk_dir):
        data = path.read_bytes()
        at = data.find(victim)
        if at >= 0:
            with open(path, "r+b") as f:
                f.seek(at + 100)
                f.write(bytes([data[at + 100] ^ 0x01]))
                os.fsync(f.fileno())
            break
    else:
        pytest.skip("block bytes are not stored verbatim in the data file; cannot aim at one block")
    with setup.open() as store:
        with pytest.raises(tierkv.BlockNotFound) as info:
            store.get(keys)
        assert keys[2].hex() in str(info.value)
        assert store.stats().corrupt == 1
        for i in (0, 1, 3):
            assert_bit_equal(store.get(keys[i:i + 1]), blocks[i:i + 1], f"block {i}")
        assert store.lookup(keys) == 2


# ---------------------------------------------------------------------------------------------------------------
# bounds, exclusivity


def test_disk_bytes_bounds_the_data_files(disk_config, layout):
    disk_blocks = 5
    disk_bytes = disk_blocks * round_up(layout.block_nbytes)
    keys = make_keys(20, seed=25)
    blocks = make_blocks(20, layout, seed=26)
    with disk_config.open(device=2, host=2, disk=disk_blocks) as store:
        for i in range(20):
            store.put(keys[i:i + 1], blocks[i:i + 1])
        store.flush()
        sizes = {str(p): p.stat().st_size for p in data_files(disk_config.disk_dir)}
        assert sizes and sum(sizes.values()) <= disk_bytes, f"disk_bytes={disk_bytes}, data files: {sizes}"
        assert store.stats().tiers["disk"].used_blocks <= disk_blocks
        assert store.stats().tiers["disk"].capacity_bytes <= disk_bytes
    sizes = {str(p): p.stat().st_size for p in data_files(disk_config.disk_dir)}
    assert sum(sizes.values()) <= disk_bytes, f"after close: {sizes}"


def test_a_second_store_on_an_open_disk_path_is_refused(disk_config, layout):
    keys = make_keys(3, seed=27)
    blocks = make_blocks(3, layout, seed=28)
    with disk_config.open() as first:
        first.put(keys, blocks)
        first.flush()
        with pytest.raises(tierkv.StoreInUse) as info:
            disk_config.open()
        assert isinstance(info.value, RuntimeError)
        assert str(disk_config.disk_dir) in str(info.value)
        # the first store is unharmed
        assert_bit_equal(first.get(keys), blocks)
        first.put(make_keys(1, seed=29), make_blocks(1, layout, seed=30))
    with reopen(disk_config) as second:  # free again once the first is closed
        assert_bit_equal(second.get(keys), blocks)


def test_a_store_in_another_process_is_refused(disk_config, layout):
    with disk_config.open() as store:
        store.put(make_keys(1, seed=31), make_blocks(1, layout))
        code = textwrap.dedent(f"""
            import torch, tierkv
            layout = tierkv.KVLayout(num_layers={layout.num_layers}, num_kv_heads={layout.num_kv_heads},
                                     head_dim={layout.head_dim}, block_tokens={layout.block_tokens},
                                     dtype=torch.{str(layout.dtype).removeprefix("torch.")})
            config = tierkv.StoreConfig(device_bytes=0, host_bytes=1 << 20, disk_path={str(disk_config.disk_dir)!r},
                                        disk_bytes=1 << 20)
            try:
                tierkv.BlockStore(layout, config)
            except tierkv.StoreInUse as exc:
                print("refused:", exc)
            else:
                print("opened")
        """)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert "refused:" in result.stdout, result.stdout + result.stderr
        assert store.lookup(make_keys(1, seed=31)) == 1


# ---------------------------------------------------------------------------------------------------------------
# I/O failures (ENOSPC on write, EIO on read)
#
# The disk backend is reached through tierkv.io.posix.PosixFile (pwrite/pread); it is the default backend where
# no CUDA driver exists. These tests patch its methods to inject the errors.


def _posix_file_class():
    try:
        from tierkv.io.posix import PosixFile
    except ImportError:
        pytest.skip("no tierkv.io.posix.PosixFile seam to inject I/O errors")
    if not (hasattr(PosixFile, "pwrite") and hasattr(PosixFile, "pread")):
        pytest.skip("PosixFile has no pwrite/pread to patch")
    return PosixFile


class Faults:
    def __init__(self):
        self.write_errno = None
        self.read_errno = None
        self.writes_failed = 0
        self.reads_failed = 0


@pytest.fixture
def faults(monkeypatch):
    cls = _posix_file_class()
    state = Faults()
    real_write, real_writev, real_read = cls.pwrite, cls.pwritev, cls.pread

    def pwrite(self, buf, offset):
        if state.write_errno is not None:
            state.writes_failed += 1
            raise OSError(state.write_errno, os.strerror(state.write_errno))
        return real_write(self, buf, offset)

    def pwritev(self, bufs, offset):
        if state.write_errno is not None:
            state.writes_failed += 1
            raise OSError(state.write_errno, os.strerror(state.write_errno))
        return real_writev(self, bufs, offset)

    def pread(self, buf, offset):
        if state.read_errno is not None:
            state.reads_failed += 1
            raise OSError(state.read_errno, os.strerror(state.read_errno))
        return real_read(self, buf, offset)

    monkeypatch.setattr(cls, "pwrite", pwrite)
    monkeypatch.setattr(cls, "pwritev", pwritev)
    monkeypatch.setattr(cls, "pread", pread)
    return state


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_failed_disk_writes_are_misses_not_crashes(tmp_path, layout, faults, err):
    setup = make_tier_setup("host+disk", tmp_path, layout)
    keys = make_keys(6, seed=31)
    blocks = make_blocks(6, layout, seed=32)
    with setup.open(host=2, disk=8) as store:
        faults.write_errno = err
        for i in range(6):  # the host tier holds 2: four blocks are demoted to the failing disk
            store.put(keys[i:i + 1], blocks[i:i + 1])
        settle(store)
        assert faults.writes_failed > 0, "the disk tier was never written"
        assert store.stats().failed_writes > 0
        for i in range(6):
            if keys[i] in store:
                assert_bit_equal(store.get(keys[i:i + 1]), blocks[i:i + 1], f"block {i}")
            else:
                with pytest.raises(tierkv.BlockNotFound):
                    store.get(keys[i:i + 1])
        assert keys[5] in store, "the newest block (in the host tier) is still served"
        store.flush()  # no exception either
        # the disk recovers: the store keeps serving and persisting
        faults.write_errno = None
        more = make_keys(3, seed=33)
        more_blocks = make_blocks(3, layout, seed=34)
        store.put(more, more_blocks)
        store.flush()
        assert_bit_equal(store.get(more), more_blocks)
    with setup.open(host=2, disk=8) as store:
        assert_bit_equal(store.get(more), more_blocks)


def test_a_failing_flush_keeps_the_blocks_in_memory(tmp_path, layout, faults):
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys = make_keys(3, seed=35)
    blocks = make_blocks(3, layout, seed=36)
    with setup.open() as store:
        store.put(keys, blocks)
        faults.write_errno = errno.ENOSPC
        store.flush()  # a full disk is not an error
        assert_bit_equal(store.get(keys), blocks)  # flush copies: the memory copies are untouched
        faults.write_errno = None
        store.flush()
    with setup.open() as store:
        assert_bit_equal(store.get(keys), blocks)


def test_close_with_a_failing_disk_does_not_raise(tmp_path, layout, faults):
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys = make_keys(3, seed=39)
    blocks = make_blocks(3, layout, seed=40)
    store = setup.open()
    store.put(keys, blocks)
    faults.write_errno = errno.ENOSPC
    store.close()  # nothing reaches the disk, but closing is not an error
    faults.write_errno = None
    with setup.open() as store:  # and the directory is usable again
        for i, k in enumerate(keys):
            if k in store:
                assert_bit_equal(store.get([k]), blocks[i:i + 1])
        store.put(keys, blocks)
        assert_bit_equal(store.get(keys), blocks)


def test_read_errors_are_misses_not_crashes(tmp_path, layout, faults):
    setup = make_tier_setup("host+disk", tmp_path, layout)
    keys = make_keys(4, seed=37)
    blocks = make_blocks(4, layout, seed=38)
    with setup.open() as store:
        store.put(keys, blocks)
    with setup.open() as store:  # memory tiers start empty: every get reads the disk
        faults.read_errno = errno.EIO
        with pytest.raises(tierkv.BlockNotFound) as info:
            store.get(keys[:1])
        assert keys[0].hex() in str(info.value)
        assert faults.reads_failed > 0
        faults.read_errno = None
        for i in range(4):  # afterwards: either the right bytes or a miss, never wrong bytes or a crash
            try:
                got = store.get(keys[i:i + 1])
            except tierkv.BlockNotFound:
                continue
            assert_bit_equal(got, blocks[i:i + 1], f"block {i}")
        assert_bit_equal(store.get(keys[1:]), blocks[1:])


def test_blocks_in_consecutive_slots_are_read_in_one_request(tmp_path, layout, monkeypatch):
    """A prompt put in one batch lands in consecutive slots; reading it back takes one request per run (a few
    MiB each), not one per block. When the run's request fails, the slots are read one by one, so a single
    bad request costs no block."""
    cls = _posix_file_class()
    real_read = cls.pread
    sizes: list[int] = []
    fail_next = {"n": 0}

    def pread(self, buf, offset):
        sizes.append(buf.numel())
        if fail_next["n"]:
            fail_next["n"] -= 1
            raise OSError(errno.EIO, "injected failure of one request")
        return real_read(self, buf, offset)

    monkeypatch.setattr(cls, "pread", pread)
    setup = make_tier_setup("host+disk", tmp_path, layout)
    keys = make_keys(8, seed=71)
    blocks = make_blocks(8, layout, seed=72)
    with setup.open() as store:
        store.put(keys, blocks)
        slot = round_up(layout.block_nbytes)
    with setup.open() as store:  # memory starts empty: the get reads the disk
        sizes.clear()
        assert_bit_equal(store.get(keys), blocks)
        assert len(sizes) < len(keys) and sum(sizes) == len(keys) * slot, f"request sizes {sizes}"
    with setup.open() as store:
        sizes.clear()
        fail_next["n"] = 1
        assert_bit_equal(store.get(keys), blocks)
        assert store.stats().tiers["disk"].failed_reads == 0


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_batch_lands_in_consecutive_slots_in_key_order(tmp_path, layout, tier):
    """Which blocks get room is the policy's business; which free slot each gets follows the order of the
    blocks, so a prompt put in one batch is one memcpy run in a memory tier and one pwritev run on disk, and
    reads back the same way. (Blocks of a batch used to land reversed: the most recent claims first.)"""
    room = 16 * round_up(layout.block_nbytes)
    config = tierkv.StoreConfig(device_bytes=0, host_bytes=room if tier == "host" else 0,
                                disk_path=str(tmp_path / "d") if tier == "disk" else None,
                                disk_bytes=room if tier == "disk" else 0)
    keys = make_keys(6, seed=81)
    blocks = make_blocks(6, layout, seed=82)
    with tierkv.BlockStore(layout, config) as store:
        store.put(keys, blocks)
        copies = store._manager.snapshot().copies
        slots = [dict((name, slot) for name, slot, _ in copies[k])[tier] for k in keys]
        assert slots == list(range(slots[0], slots[0] + len(keys))), slots
        assert_bit_equal(store.get(keys), blocks)
        assert_bit_equal(store.get(keys[2:5]), blocks[2:5])  # a run that starts mid-batch
