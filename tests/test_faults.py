"""Disk failures make blocks misses, are counted, and never stop the store or return wrong bytes."""
from __future__ import annotations

import errno

import pytest
import torch

import tierkv
from conftest import off_page, settle


class FaultyFile:
    """Wraps the disk tier's data file and fails chosen calls with a given errno."""

    def __init__(self, inner, fail_writes: int = 0, fail_reads: int = 0, err: int = errno.ENOSPC):
        self._inner = inner
        self.fail_writes, self.fail_reads, self.err = fail_writes, fail_reads, err
        self.name, self.path, self.size, self.direct = inner.name, inner.path, inner.size, inner.direct

    def pwrite(self, buf, offset):
        if self.fail_writes:
            self.fail_writes -= 1
            raise OSError(self.err, "injected write failure")
        self._inner.pwrite(buf, offset)

    def pwritev(self, bufs, offset):  # one request: it fails (or not) as a whole, like pwrite
        if self.fail_writes:
            self.fail_writes -= 1
            raise OSError(self.err, "injected write failure")
        self._inner.pwritev(bufs, offset)

    def pread(self, buf, offset):
        if self.fail_reads:
            self.fail_reads -= 1
            raise OSError(self.err, "injected read failure")
        self._inner.pread(buf, offset)

    def sync(self):
        self._inner.sync()

    def close(self):
        self._inner.close()


LAYOUT = tierkv.KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=16, dtype=torch.float16)


def blocks(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, LAYOUT.block_nbytes), dtype=torch.uint8, generator=g)
    return raw.view(LAYOUT.dtype).view(n, *LAYOUT.block_shape)


def keys(n: int, salt: bytes = b"") -> list[bytes]:
    return tierkv.block_keys(list(range(n * LAYOUT.block_tokens)), LAYOUT.block_tokens, salt)


def disk_only(tmp_path, n_blocks: int = 8) -> tierkv.StoreConfig:
    return tierkv.StoreConfig(device_bytes=0, host_bytes=0, disk_path=str(tmp_path / "disk"),
                              disk_bytes=n_blocks * 4096)


def inject(store: tierkv.BlockStore, **faults) -> FaultyFile:
    disk = store._manager.tiers[-1]
    disk._file = FaultyFile(disk._file, **faults)
    return disk._file


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_a_failed_disk_write_is_a_counted_miss_and_the_store_keeps_serving(tmp_path, err):
    k, b = keys(4), off_page(blocks(4))
    with tierkv.BlockStore(LAYOUT, disk_only(tmp_path)) as store:
        inject(store, fail_writes=1, err=err)
        store.put(k, b)  # written by the put itself, one request per (off-page) block: one fails
        assert store.stats()["disk"].failed_writes == 1
        present = [i for i, key in enumerate(k) if key in store]
        assert len(present) == 3
        missing = next(key for key in k if key not in store)
        with pytest.raises(tierkv.BlockNotFound):
            store.get([missing])
        got = store.get([k[i] for i in present])
        assert torch.equal(got.view(torch.uint8), b[present].view(torch.uint8))
        store.put([missing], b[[k.index(missing)]])  # the disk works again: the block can be stored
        assert missing in store
        assert store.stats().failed_writes == 1


def test_a_failed_demotion_to_disk_drops_the_block_but_nothing_else(tmp_path):
    config = tierkv.StoreConfig(device_bytes=0, host_bytes=2 * LAYOUT.block_nbytes,
                                disk_path=str(tmp_path / "disk"), disk_bytes=8 * 4096)
    k, b = keys(4), blocks(4)
    with tierkv.BlockStore(LAYOUT, config) as store:
        inject(store, fail_writes=2)
        store.put(k, b)  # 2 fit in host; the first two go down in one request: it fails, then one retry fails
        settle(store)
        stats = store.stats()
        assert stats["disk"].failed_writes == 1 and stats.dropped == 1
        assert sum(key in store for key in k) == 3
        for i, key in enumerate(k):
            if key in store:
                assert torch.equal(store.get([key]).view(torch.uint8), b[i:i + 1].view(torch.uint8))


def test_a_failed_disk_read_is_a_miss_and_the_copy_is_dropped(tmp_path):
    k, b = keys(2), blocks(2)
    with tierkv.BlockStore(LAYOUT, disk_only(tmp_path)) as store:
        store.put(k, b)
        # The two blocks sit in adjacent slots and are read in one request; when it fails they are read one by
        # one: failing two requests is a bad sector under whichever block is read first.
        inject(store, fail_reads=2, err=errno.EIO)
        with pytest.raises(tierkv.BlockNotFound, match="injected read failure") as info:
            store.get(k)
        assert store.stats()["disk"].failed_reads == 1
        lost = [i for i in (0, 1) if k[i].hex() in str(info.value)]
        assert len(lost) == 1 and [key in store for key in k] == [i != lost[0] for i in (0, 1)]
        kept = 1 - lost[0]
        assert torch.equal(store.get([k[kept]]).view(torch.uint8), b[kept:kept + 1].view(torch.uint8))


def test_a_corrupt_block_in_a_multi_block_get_raises_and_keeps_the_good_ones(tmp_path):
    k, b = keys(3), blocks(3)
    with tierkv.BlockStore(LAYOUT, disk_only(tmp_path)) as store:
        store.put(k, b)
        settle(store)
        disk = store._manager.tiers[-1]
        slot = store._manager._entries[k[1]].copies[0].slot
        disk._checksums[slot] ^= 1  # the stored bytes no longer match what was written
        with pytest.raises(tierkv.BlockNotFound, match="checksum"):
            store.get(k)
        assert store.stats().corrupt == 1
        assert [key in store for key in k] == [True, False, True]
        assert store.lookup(k) == 1
        got = store.get([k[0], k[2]])
        assert torch.equal(got.view(torch.uint8), b[[0, 2]].view(torch.uint8))


def test_a_failed_run_request_is_retried_block_by_block_and_loses_nothing(tmp_path):
    """Page-aligned blocks a put writes straight to disk go out as one vectored request per run of slots; when
    that request fails, the run is written again slot by slot, so a passing failure costs no block."""
    from tierkv._memory import aligned_empty

    k = keys(4)
    b = aligned_empty(4 * LAYOUT.block_nbytes).view(LAYOUT.dtype).view(4, *LAYOUT.block_shape)
    b.copy_(blocks(4))
    with tierkv.BlockStore(LAYOUT, disk_only(tmp_path)) as store:
        faulty = inject(store, fail_writes=1)
        store.put(k, b)
        assert faulty.fail_writes == 0, "the run's request was not the one that failed"
        assert store.stats()["disk"].failed_writes == 0 and store.stats().dropped == 0
        assert all(key in store for key in k)
        assert torch.equal(store.get(k).view(torch.uint8), b.view(torch.uint8))
