"""Every storage fault of issue 7, injected in-process and deterministically, with the three outcomes each must end in:

(a) the store keeps serving: put/get/lookup work afterwards, from the tiers that work (the disk too, once a
    transient fault has passed);
(b) the failure is counted in ``stats()`` and logged once (a burst is one line), saying what to do;
(c) nothing wrong is returned: every ``get`` is bit-exact or ``BlockNotFound``, and once a ``get`` has found a
    block unreadable, ``lookup`` no longer reports it.

| fault | injected by | counter | outcome |
|---|---|---|---|
| ENOSPC / EIO / EROFS on write: put (direct), write-behind demotion, flush | ``FaultyFile`` (N-th write call) | ``disk.failed_writes`` | that copy dropped; a miss only where it was the last copy |
| short write (``pwritev`` writes part) | patched ``os.pwritev`` | none | the rest is written: no fault |
| write of nothing (``pwritev`` returns 0) | patched ``os.pwritev`` | ``disk.failed_writes`` | as ENOSPC |
| EIO on read | ``FaultyFile`` (N-th read call) | ``disk.failed_reads`` | that block a miss, its copy dropped |
| short read (``preadv`` reads part) | patched ``os.preadv`` | none | the rest is read: no fault |
| read past the end (``preadv`` returns 0) | patched ``os.preadv`` | ``disk.failed_reads`` | a miss |
| a read that silently fills part of the buffer | ``FaultyFile`` | ``disk.corrupt`` | checksum catches it: a miss |
| bytes flipped in the data file, while open or between close and reopen | real file edit | ``disk.corrupt`` | a miss |
| data file truncated between close and reopen | real ``truncate`` | ``disk.open_faults`` | blocks past the end dropped at open, never looked up |
| data file truncated while open | real ``truncate`` | ``disk.failed_reads`` | a miss |
| garbage over ``data.mdb`` | real file edit | ``disk.open_faults`` | index moved aside to ``index.lmdb.corrupt``; the disk tier starts empty |
| garbage over ``lock.mdb`` | real file edit | none | lmdb rebuilds its lock file: every block still there |
| ``index.lmdb`` deleted, data file present | real ``rmtree`` | ``disk.open_faults`` | the disk tier starts empty |
| lmdb map full | tiny ``map_size`` | none | the map grows, nothing lost |
| lmdb map full and it cannot grow; any failing commit | tiny map, growth refused / a failing write | ``disk.failed_commits`` | blocks stay readable; records retried at the next commit |
| read-only directory at open | ``chmod 0500`` | (refused) | ``ValueError`` naming the path (ARCHITECTURE.md) |
| read-only directory while open | ``chmod 0500`` | none | open files keep working: nothing fails |
| filesystem read-only while open | ``FaultyFile`` EROFS | ``disk.failed_writes`` | as ENOSPC, advice "not writable" |
| full filesystem at open, new directory | ENOSPC from ``posix_fallocate`` | (refused) | ``ValueError`` naming the path and the free space: lmdb would die of SIGBUS |
| full filesystem at open, existing store | ENOSPC from ``posix_fallocate`` of the data file | ``disk.open_faults`` | opens degraded (sparse file); writes that find no space are ``failed_writes`` |

The decisions (fail closed on an index that cannot be trusted, open degraded on a full filesystem) are also in
docs/configuration.md, "When the disk fails".
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import stat

import lmdb
import pytest
import torch

import tierkv
import tierkv.index
from conftest import assert_bit_equal, make_blocks, make_keys, off_page, round_up, settle, tiny_layout
from tierkv.faultlog import FailureLog
from tierkv.io import posix

LAYOUT = tiny_layout()
SLOT = round_up(LAYOUT.block_nbytes)


# ---------------------------------------------------------------------------------------------------------------
# injection


class FaultyFile:
    """The disk tier's data file, with faults by call number (1-based, per operation; "all" for every call).

    ``fail_writes``/``fail_reads``/``fail_syncs`` raise ``OSError(err)``; ``short_reads`` return having filled
    only the first 512 bytes of the buffer (the rest keeps stale bytes), as a backend that ignored a short count
    would.
    ``pwrite`` and ``pwritev`` are both "writes": a vectored request fails or succeeds as a whole.
    """

    def __init__(self, inner, err: int = errno.EIO, fail_writes=(), fail_reads=(), fail_syncs=(), short_reads=()):
        self._inner, self.err = inner, err
        self.plan = {"write": fail_writes, "read": fail_reads, "sync": fail_syncs, "short": short_reads}
        self.calls = {"write": 0, "read": 0, "sync": 0}
        self.failed = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _hit(self, op: str, plan: str | None = None) -> bool:
        chosen = self.plan[plan or op]
        return chosen == "all" or self.calls[op] in chosen

    def _call(self, op: str) -> None:
        self.calls[op] += 1
        if self._hit(op):
            self.failed += 1
            raise OSError(self.err, f"injected {os.strerror(self.err)} on {op} #{self.calls[op]}")

    def pwrite(self, buf, offset):
        self._call("write")
        self._inner.pwrite(buf, offset)

    def pwritev(self, bufs, offset):
        self._call("write")
        self._inner.pwritev(bufs, offset)

    def pread(self, buf, offset):
        self._call("read")
        self._inner.pread(buf, offset)
        if self._hit("read", "short"):
            buf[512:] = 0xA5  # never filled: stale bytes, whatever the buffer held before

    def sync(self):
        self._call("sync")
        self._inner.sync()

    def stop(self) -> None:
        """The fault passes (space was freed, the device came back)."""
        self.plan = {op: () for op in self.plan}


def inject(store: tierkv.BlockStore, **faults) -> FaultyFile:
    disk = store._manager.tiers[-1]
    assert disk.name == "disk"
    disk._file = FaultyFile(disk._file, **faults)
    return disk._file


def config(tmp_path, device: int = 0, host: int = 0, disk: int = 16, **kw) -> tierkv.StoreConfig:
    """Capacities in blocks; the disk tier under ``tmp_path / "disk"``."""
    return tierkv.StoreConfig(device_bytes=device * LAYOUT.block_nbytes, host_bytes=host * LAYOUT.block_nbytes,
                              disk_path=str(tmp_path / "disk"), disk_bytes=disk * SLOT, **kw)


def open_store(tmp_path, **kw) -> tierkv.BlockStore:
    return tierkv.BlockStore(LAYOUT, config(tmp_path, **kw))


def data_file(tmp_path) -> str:
    return str(tmp_path / "disk" / "blocks.data")


def index_dir(tmp_path) -> str:
    return str(tmp_path / "disk" / "index.lmdb")


# ---------------------------------------------------------------------------------------------------------------
# the three outcomes


def check_nothing_wrong(store: tierkv.BlockStore, keys, blocks) -> int:
    """(c): every get is bit-exact or BlockNotFound; afterwards every key lookup reports is returned bit-exact.
    Returns how many blocks the store still serves."""
    for i, key in enumerate(keys):
        try:
            got = store.get([key])
        except tierkv.BlockNotFound:
            continue
        assert_bit_equal(got, blocks[i:i + 1], f"block {i}")
    served = 0
    for i, key in enumerate(keys):
        if store.lookup([key]) == 1:
            assert_bit_equal(store.get([key]), blocks[i:i + 1], f"block {i} (reported by lookup)")
            served += 1
        else:
            with pytest.raises(tierkv.BlockNotFound):
                store.get([key])
    return served


def check_keeps_serving(store: tierkv.BlockStore, seed: int, n: int = 3) -> tuple[list[bytes], torch.Tensor]:
    """(a): new blocks can be put, looked up and read back bit-exact."""
    keys, blocks = make_keys(n, seed=seed), make_blocks(n, LAYOUT, seed=seed + 1)
    store.put(keys, blocks)
    assert store.lookup(keys) == n
    assert_bit_equal(store.get(keys), blocks)
    return keys, blocks


def warnings(caplog, *needles: str) -> list[str]:
    """(b): WARNING lines tierkv logged that contain every needle."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("tierkv")
            and all(n in r.getMessage() for n in needles)]


@pytest.fixture(autouse=True)
def _capture(caplog):
    caplog.set_level(logging.DEBUG, logger="tierkv")  # a per-failure DEBUG line would be a flood too


# ---------------------------------------------------------------------------------------------------------------
# write errors: put (direct), write-behind demotion, flush

ADVICE = {errno.ENOSPC: "disk is full", errno.EIO: "kernel log", errno.EROFS: "not writable"}


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO, errno.EROFS], ids=errno.errorcode.get)
def test_write_error_on_a_put_to_disk(tmp_path, caplog, err):
    keys, blocks = make_keys(4, seed=1), off_page(make_blocks(4, LAYOUT, seed=2))
    with open_store(tmp_path) as store:  # disk only: the put writes each (off-page) block itself
        faulty = inject(store, err=err, fail_writes={2})
        store.put(keys, blocks)
        assert faulty.failed == 1
        stats = store.stats()
        assert stats["disk"].failed_writes == 1 and stats.dropped == 1
        assert check_nothing_wrong(store, keys, blocks) == 3
        [line] = warnings(caplog, "writing block", ADVICE[err])
        assert str(tmp_path / "disk") in line
        again, again_blocks = check_keeps_serving(store, seed=3)  # the next writes go through
    with open_store(tmp_path) as store:
        assert check_nothing_wrong(store, keys, blocks) == 3
        assert_bit_equal(store.get(again), again_blocks)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO], ids=errno.errorcode.get)
def test_write_error_in_write_behind(tmp_path, caplog, err):
    keys, blocks = make_keys(8, seed=4), make_blocks(8, LAYOUT, seed=5)
    with open_store(tmp_path, host=2) as store:
        faulty = inject(store, err=err, fail_writes={1, 2})  # the first demotion, and its retry slot by slot
        for i in range(8):  # one at a time: each put pushes the oldest host block down, in the background
            store.put(keys[i:i + 1], blocks[i:i + 1])
        settle(store)
        assert store.stats().latency["writeback.disk"].count > 0, "the demotions did not go through write-behind"
        assert faulty.failed >= 1
        stats = store.stats()
        assert stats["disk"].failed_writes >= 1
        assert stats.dropped == stats["disk"].failed_writes  # a demoted block had no other copy left
        assert check_nothing_wrong(store, keys, blocks) == 8 - stats.dropped
        assert len(warnings(caplog, "writing block", ADVICE[err])) == 1
        check_keeps_serving(store, seed=6)
        store.flush()


def test_write_error_on_flush_keeps_the_memory_copies(tmp_path, caplog):
    keys, blocks = make_keys(4, seed=7), make_blocks(4, LAYOUT, seed=8)
    with open_store(tmp_path, device=8, host=8) as store:
        store.put(keys, blocks)
        faulty = inject(store, err=errno.ENOSPC, fail_writes="all")
        store.flush()  # a full disk is not an error
        assert store.stats()["disk"].failed_writes == 4
        assert store.stats().dropped == 0
        assert check_nothing_wrong(store, keys, blocks) == 4  # flush copies: memory still has every block
        assert len(warnings(caplog, "writing block", "disk is full")) == 1
        faulty.stop()
        store.flush()
    with open_store(tmp_path, device=8, host=8) as store:
        assert check_nothing_wrong(store, keys, blocks) == 4


def test_a_burst_of_failures_is_one_log_line(tmp_path, caplog):
    keys, blocks = make_keys(100, seed=9), make_blocks(100, LAYOUT, seed=10)
    with open_store(tmp_path, host=4, disk=128) as store:
        inject(store, err=errno.ENOSPC, fail_writes="all")
        for i in range(100):
            store.put(keys[i:i + 1], blocks[i:i + 1])
        store.flush()
        settle(store)
        stats = store.stats()
        assert stats["disk"].failed_writes == 100  # 96 demotions, 4 from the flush
        lines = [r for r in caplog.records if r.name.startswith("tierkv")]
        assert len(lines) == 1, [r.getMessage() for r in lines]
        assert "disk is full" in lines[0].getMessage() and "lower disk_bytes" in lines[0].getMessage()
        check_keeps_serving(store, seed=11)


def test_failure_log_summarises_a_long_failure_at_most_once_per_interval(caplog):
    now = [0.0]
    failures = FailureLog(logging.getLogger("tierkv.test"), interval_s=60, clock=lambda: now[0])
    for i in range(100):
        failures.report(("disk", "write", "full"), f"failure {i}")
        now[0] += 1  # 100 s in all: one summary when the first minute has passed
    failures.report(("disk", "read", "io"), "another kind")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("failure 0 (logged once")
    assert lines[1].startswith("60 more failures like this in the last 60 s; the latest: failure 60")
    assert lines[2].startswith("another kind")


def test_short_writes_are_completed_and_a_write_of_nothing_is_enospc(tmp_path, monkeypatch, caplog):
    real = os.pwritev
    mode = {"zero": False, "short": 0}

    def pwritev(fd, buffers, offset):
        if mode["zero"]:
            return 0
        if sum(len(b) for b in buffers) > SLOT:
            mode["short"] += 1
            return real(fd, buffers[:1], offset)  # one slot of a multi-slot request: the caller resumes
        return real(fd, buffers, offset)

    monkeypatch.setattr(posix.os, "pwritev", pwritev)
    keys, blocks = make_keys(8, seed=12), make_blocks(8, LAYOUT, seed=13)
    with open_store(tmp_path, host=2) as store:
        for i in range(0, 8, 2):
            store.put(keys[i:i + 2], blocks[i:i + 2])
        store.flush()
        assert mode["short"] > 0, "no multi-slot write was issued"
        assert store.stats()["disk"].failed_writes == 0
        mode["zero"] = True
        more, more_blocks = make_keys(2, seed=14), make_blocks(2, LAYOUT, seed=15)
        store.put(more, more_blocks)
        store.flush()
        assert store.stats()["disk"].failed_writes > 0
        assert len(warnings(caplog, "writing block", "disk is full")) == 1
        mode["zero"] = False
    with open_store(tmp_path, host=2) as store:
        assert check_nothing_wrong(store, keys, blocks) == 8


# ---------------------------------------------------------------------------------------------------------------
# read errors


def test_eio_on_read_is_a_miss(tmp_path, caplog):
    keys, blocks = make_keys(4, seed=16), make_blocks(4, LAYOUT, seed=17)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
    with open_store(tmp_path, host=8) as store:  # memory starts empty: gets read the disk
        faulty = inject(store, err=errno.EIO, fail_reads={1})
        with pytest.raises(tierkv.BlockNotFound, match="injected"):
            store.get(keys[1:2])
        assert store.stats()["disk"].failed_reads == 1
        assert store.lookup(keys) == 1  # the lost block is no longer reported
        faulty.stop()
        assert check_nothing_wrong(store, keys, blocks) == 3
        [line] = warnings(caplog, "reading block", "kernel log")
        assert str(tmp_path / "disk") in line
        store.put(keys[1:2], blocks[1:2])  # the lost block can be stored again
        assert_bit_equal(store.get(keys), blocks)


def test_a_burst_of_read_errors_is_one_log_line(tmp_path, caplog):
    keys, blocks = make_keys(50, seed=18), make_blocks(50, LAYOUT, seed=19)
    with open_store(tmp_path, disk=64) as store:
        store.put(keys, blocks)
        faulty = inject(store, err=errno.EIO, fail_reads="all")
        for key in keys:
            with pytest.raises(tierkv.BlockNotFound):
                store.get([key])
        assert store.stats()["disk"].failed_reads == 50
        assert len([r for r in caplog.records if r.name.startswith("tierkv")]) == 1
        faulty.stop()
        check_keeps_serving(store, seed=20)


def test_short_reads_are_completed_and_a_read_of_nothing_is_eio(tmp_path, monkeypatch, caplog):
    real = os.preadv
    mode = {"zero": False, "calls": 0}

    def preadv(fd, buffers, offset):
        mode["calls"] += 1
        if mode["zero"]:
            return 0  # end of file
        [view] = buffers
        # One slot at a time (O_DIRECT needs whole sectors, so a real short read is one too): the caller resumes.
        return real(fd, [view[:SLOT]], offset)

    keys, blocks = make_keys(6, seed=21), make_blocks(6, LAYOUT, seed=22)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
    monkeypatch.setattr(posix.os, "preadv", preadv)
    with open_store(tmp_path, host=8) as store:
        assert_bit_equal(store.get(keys[:3]), blocks[:3])  # one request for the run, completed piecewise
        assert mode["calls"] == 3
        assert store.stats()["disk"].failed_reads == 0
        mode["zero"] = True
        with pytest.raises(tierkv.BlockNotFound, match="short read"):
            store.get(keys[3:4])
        assert store.stats()["disk"].failed_reads == 1
        mode["zero"] = False
        assert len(warnings(caplog, "reading block")) == 1
        assert check_nothing_wrong(store, keys, blocks) == 5


def test_a_read_that_fills_part_of_the_buffer_is_caught_by_the_checksum(tmp_path, caplog):
    keys, blocks = make_keys(3, seed=23), make_blocks(3, LAYOUT, seed=24)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
        inject(store, short_reads={1})
        with pytest.raises(tierkv.BlockNotFound, match="checksum"):
            store.get(keys[:1])
        assert store.stats()["disk"].corrupt == 1
        assert len(warnings(caplog, "failed its checksum")) == 1
        assert check_nothing_wrong(store, keys, blocks) == 2
        check_keeps_serving(store, seed=25)


# ---------------------------------------------------------------------------------------------------------------
# the data file changed behind the store's back


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())


def slot_of(store: tierkv.BlockStore, key: bytes) -> int:
    disk = store._manager.tiers[-1]
    return disk._key_slot[key]


def test_bytes_flipped_while_open(tmp_path, caplog):
    keys, blocks = make_keys(3, seed=26), make_blocks(3, LAYOUT, seed=27)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
        flip_byte(data_file(tmp_path), slot_of(store, keys[1]) * SLOT + 100)  # O_DIRECT reads see it
        with pytest.raises(tierkv.BlockNotFound, match="checksum"):
            store.get(keys)
        assert store.stats()["disk"].corrupt == 1
        assert [k in store for k in keys] == [True, False, True]
        assert check_nothing_wrong(store, keys, blocks) == 2
        assert len(warnings(caplog, "failed its checksum", "check the device")) == 1
        store.put(keys[1:2], blocks[1:2])
        assert_bit_equal(store.get(keys), blocks)


def test_bytes_flipped_between_close_and_reopen(tmp_path, caplog):
    keys, blocks = make_keys(3, seed=28), make_blocks(3, LAYOUT, seed=29)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
        slot = slot_of(store, keys[2])
    flip_byte(data_file(tmp_path), slot * SLOT)
    with open_store(tmp_path) as store:
        assert check_nothing_wrong(store, keys, blocks) == 2
        assert store.stats()["disk"].corrupt == 1
        assert len(warnings(caplog, "failed its checksum")) == 1
        check_keeps_serving(store, seed=30)


def test_data_file_truncated_between_close_and_reopen(tmp_path, caplog):
    keys, blocks = make_keys(8, seed=31), make_blocks(8, LAYOUT, seed=32)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
        kept = {k for k in keys if slot_of(store, k) < 3}
    os.truncate(data_file(tmp_path), 3 * SLOT)
    with open_store(tmp_path) as store:
        stats = store.stats()
        assert stats["disk"].open_faults == 1
        # Dropped at open: lookup never reports them, and no read has to find them corrupt.
        assert {k for k in keys if k in store} == kept
        assert check_nothing_wrong(store, keys, blocks) == 3
        assert store.stats().corrupt == 0
        [line] = warnings(caplog, "shorter than its index")
        assert "blocks.data" in line and "dropped the 5 blocks" in line
        check_keeps_serving(store, seed=33)
    caplog.clear()
    with open_store(tmp_path) as store:  # the drops were committed: the next open finds nothing wrong
        assert store.stats()["disk"].open_faults == 0
        assert check_nothing_wrong(store, keys, blocks) == 3
    assert not warnings(caplog)


def test_data_file_truncated_while_open(tmp_path, caplog):
    keys, blocks = make_keys(4, seed=34), make_blocks(4, LAYOUT, seed=35)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
        os.truncate(data_file(tmp_path), 0)
        for key in keys:
            with pytest.raises(tierkv.BlockNotFound, match="short read"):
                store.get([key])
        assert store.stats()["disk"].failed_reads == 4
        assert store.lookup(keys) == 0
        assert len(warnings(caplog, "reading block")) == 1
        again, again_blocks = check_keeps_serving(store, seed=36)  # writes extend the file again
    with open_store(tmp_path) as store:
        assert_bit_equal(store.get(again), again_blocks)
        assert check_nothing_wrong(store, keys, blocks) == 0


# ---------------------------------------------------------------------------------------------------------------
# the index


def garbage(path: str, offset: int = 0, length: int | None = None) -> None:
    size = os.path.getsize(path)
    length = size - offset if length is None else length
    g = torch.Generator().manual_seed(offset + length)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(torch.randint(0, 256, (length,), dtype=torch.uint8, generator=g).numpy().tobytes())


@pytest.mark.parametrize("where", ["whole", "meta-pages", "data-pages"])
def test_a_corrupt_index_is_moved_aside_and_the_disk_tier_starts_empty(tmp_path, caplog, where):
    keys, blocks = make_keys(6, seed=37), make_blocks(6, LAYOUT, seed=38)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
    mdb = os.path.join(index_dir(tmp_path), "data.mdb")
    page = os.sysconf("SC_PAGE_SIZE")
    garbage(mdb, *{"whole": (0,), "meta-pages": (0, 2 * page), "data-pages": (2 * page,)}[where])
    with open_store(tmp_path, host=4) as store:  # opens: the engine keeps running
        assert store.stats()["disk"].open_faults == 1
        assert store.lookup(keys) == 0  # nothing it cannot verify
        assert check_nothing_wrong(store, keys, blocks) == 0
        [line] = warnings(caplog, "index is unreadable", "index.lmdb.corrupt")
        assert str(tmp_path / "disk") in line
        assert os.path.isdir(index_dir(tmp_path) + ".corrupt")
        again, again_blocks = check_keeps_serving(store, seed=39)
    caplog.clear()
    with open_store(tmp_path, host=4) as store:  # the new index works
        assert store.stats()["disk"].open_faults == 0
        assert_bit_equal(store.get(again), again_blocks)
    assert not warnings(caplog)


def test_garbage_over_the_lmdb_lock_file_is_harmless(tmp_path, caplog):
    keys, blocks = make_keys(4, seed=40), make_blocks(4, LAYOUT, seed=41)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
    garbage(os.path.join(index_dir(tmp_path), "lock.mdb"))
    with open_store(tmp_path) as store:  # lmdb rebuilds the lock file of an environment nobody has open
        assert store.stats()["disk"].open_faults == 0
        assert check_nothing_wrong(store, keys, blocks) == 4
        check_keeps_serving(store, seed=42)
    assert not warnings(caplog)


def test_a_missing_index_starts_an_empty_disk_tier(tmp_path, caplog):
    keys, blocks = make_keys(4, seed=43), make_blocks(4, LAYOUT, seed=44)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
    shutil.rmtree(index_dir(tmp_path))
    with open_store(tmp_path) as store:
        assert store.stats()["disk"].open_faults == 1
        assert store.lookup(keys) == 0 and check_nothing_wrong(store, keys, blocks) == 0
        assert len(warnings(caplog, "has no index", "starts empty")) == 1
        again, again_blocks = check_keeps_serving(store, seed=45)
    caplog.clear()
    with open_store(tmp_path) as store:
        assert store.stats()["disk"].open_faults == 0
        assert_bit_equal(store.get(again), again_blocks)
    assert not warnings(caplog)


@pytest.fixture
def tiny_map(monkeypatch):
    """lmdb environments opened with a 64 KiB map: a few hundred records fill it."""
    real_open = lmdb.open

    def small_open(path, **kw):
        return real_open(path, **{**kw, "map_size": 64 << 10})

    monkeypatch.setattr(tierkv.index.lmdb, "open", small_open)


def test_a_full_index_map_grows(tmp_path, caplog, tiny_map):
    keys, blocks = make_keys(600, seed=46), make_blocks(600, LAYOUT, seed=47)
    with open_store(tmp_path, disk=640) as store:
        store.put(keys, blocks)
        stats = store.stats()["disk"]
        assert stats.failed_commits == 0 and stats.failed_writes == 0
    with open_store(tmp_path, disk=640) as store:
        assert store.lookup(keys) == 600
        assert_bit_equal(store.get(keys), blocks)
    assert not warnings(caplog)


def test_a_full_index_map_that_cannot_grow(tmp_path, caplog, tiny_map, monkeypatch):
    def refuse(self):
        raise lmdb.MapFullError("mdb_env_set_mapsize: injected: the map cannot grow")

    monkeypatch.setattr(tierkv.index.DiskIndex, "_grow", refuse)
    keys, blocks = make_keys(600, seed=48), make_blocks(600, LAYOUT, seed=49)
    with open_store(tmp_path, disk=640) as store:
        for i in range(0, 600, 20):
            store.put(keys[i:i + 20], blocks[i:i + 20])
        store.flush()
        stats = store.stats()["disk"]
        assert stats.failed_commits > 0 and stats.failed_writes == 0
        assert len(warnings(caplog, "committing the index failed", "map is full", "delete its index.lmdb")) == 1
        assert_bit_equal(store.get(keys), blocks)  # every block stays readable in this process
        check_keeps_serving(store, seed=50)
    assert len(warnings(caplog, "not committed", "misses after a restart")) == 1  # close says what it costs
    monkeypatch.undo()
    with open_store(tmp_path, disk=640) as store:
        found = check_nothing_wrong(store, keys, blocks)
        assert 0 < found < 600  # what was committed before the map filled
        check_keeps_serving(store, seed=51)


def test_a_failing_index_commit_is_retried_and_loses_nothing(tmp_path, caplog, monkeypatch):
    real_write = tierkv.index.DiskIndex._write
    fail = {"left": 2}

    def write(self, batch):
        if fail["left"]:
            fail["left"] -= 1
            raise lmdb.Error(f"mdb_txn_commit: {os.strerror(errno.EIO)}")
        real_write(self, batch)

    monkeypatch.setattr(tierkv.index.DiskIndex, "_write", write)
    keys, blocks = make_keys(6, seed=52), make_blocks(6, LAYOUT, seed=53)
    with open_store(tmp_path) as store:
        store.put(keys[:4], blocks[:4])  # its commit fails
        store.delete(keys[3:4])          # and this one
        store.put(keys[4:], blocks[4:])  # this one commits all three batches
        assert store.stats()["disk"].failed_commits == 2
        assert len(warnings(caplog, "committing the index failed", "kernel log")) == 1
        assert check_nothing_wrong(store, keys, blocks) == 5
    with open_store(tmp_path) as store:
        assert check_nothing_wrong(store, keys, blocks) == 5
        assert keys[3] not in store  # the delete survived the failed commit


def test_a_failing_fsync_is_a_counted_commit_failure(tmp_path, caplog):
    keys, blocks = make_keys(3, seed=54), make_blocks(3, LAYOUT, seed=55)
    with open_store(tmp_path, host=4) as store:
        store.put(keys, blocks)
        faulty = inject(store, err=errno.EIO, fail_syncs={1})
        store.flush()  # not an error
        assert store.stats()["disk"].failed_commits == 1
        assert len(warnings(caplog, "committing the index failed")) == 1
        faulty.stop()
        store.flush()
    with open_store(tmp_path, host=4) as store:
        assert check_nothing_wrong(store, keys, blocks) == 3


# ---------------------------------------------------------------------------------------------------------------
# permissions, read-only and full filesystems


@pytest.fixture
def honest_access(monkeypatch):
    """As root, permission bits bind nobody: answer os.access as an unprivileged owner would, so a chmod means what
    it means for the service account a store runs under."""
    if os.geteuid() != 0:
        return
    real = os.access

    def access(path, mode, **kw):
        if mode & os.W_OK and not os.stat(path).st_mode & stat.S_IWUSR:
            return False
        return real(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)


def test_a_read_only_directory_at_open_is_a_clear_error(tmp_path, honest_access):
    keys, blocks = make_keys(3, seed=56), make_blocks(3, LAYOUT, seed=57)
    with open_store(tmp_path) as store:
        store.put(keys, blocks)
    disk = tmp_path / "disk"
    disk.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="writable") as info:
            open_store(tmp_path)
        assert str(disk) in str(info.value)
    finally:
        disk.chmod(0o700)
    with open_store(tmp_path) as store:  # writable again: everything is still there
        assert check_nothing_wrong(store, keys, blocks) == 3


def test_a_directory_made_read_only_while_open_changes_nothing(tmp_path, caplog):
    keys, blocks = make_keys(6, seed=58), make_blocks(6, LAYOUT, seed=59)
    disk = tmp_path / "disk"
    with open_store(tmp_path, host=2) as store:
        disk.chmod(0o500)  # the store's files are open already: writing them needs no directory permission
        try:
            store.put(keys, blocks)
            store.flush()
            stats = store.stats()["disk"]
            assert stats.failed_writes == 0 and stats.failed_commits == 0
            assert check_nothing_wrong(store, keys, blocks) == 6
        finally:
            disk.chmod(0o700)
    with open_store(tmp_path, host=2) as store:
        assert check_nothing_wrong(store, keys, blocks) == 6
    assert not warnings(caplog)


def test_a_filesystem_gone_read_only_while_open(tmp_path, caplog):
    keys, blocks = make_keys(6, seed=60), make_blocks(6, LAYOUT, seed=61)
    with open_store(tmp_path, host=4) as store:
        store.put(keys[:2], blocks[:2])
        store.flush()
        inject(store, err=errno.EROFS, fail_writes="all", fail_syncs="all")
        store.put(keys[2:], blocks[2:])  # pushes two blocks down to the disk that refuses them
        store.flush()
        stats = store.stats()["disk"]
        assert stats.failed_writes > 0 and stats.failed_commits > 0
        assert len(warnings(caplog, "writing block", "not writable", "remount")) == 1
        assert check_nothing_wrong(store, keys, blocks) == 6 - store.stats().dropped
        check_keeps_serving(store, seed=62)


@pytest.fixture
def full_filesystem(monkeypatch):
    """posix_fallocate fails with ENOSPC, as on a full filesystem (tmpfs or ext4); ``state["data_only"]`` limits it
    to the data file."""
    real = os.posix_fallocate
    state = {"data_only": False}

    def fallocate(fd, offset, length):
        target = os.readlink(f"/proc/self/fd/{fd}")
        if not state["data_only"] or target.endswith("blocks.data"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    return state


def test_a_full_filesystem_refuses_a_new_disk_path(tmp_path, full_filesystem):
    # lmdb sizes its lock file sparse and writes it through a mapping: on a really full filesystem the first
    # write into it kills the process with SIGBUS (seen on a full tmpfs). The store reserves it first instead.
    with pytest.raises(ValueError, match="free") as info:
        open_store(tmp_path)
    assert str(tmp_path / "disk") in str(info.value)
    full_filesystem["data_only"] = True  # space again for the index: the directory is usable as it was left
    with open_store(tmp_path) as store:
        check_keeps_serving(store, seed=67)


def test_a_full_filesystem_under_an_existing_store_opens_degraded(tmp_path, caplog, full_filesystem, monkeypatch):
    full_filesystem["data_only"] = True
    keys, blocks = make_keys(4, seed=63), make_blocks(4, LAYOUT, seed=64)
    with open_store(tmp_path, disk=4) as store:  # the data file could not be reserved: sparse
        assert store.stats()["disk"].open_faults == 1
        store.put(keys, blocks)
    [line] = warnings(caplog, "could not reserve", "free on that filesystem", "lower disk_bytes")
    assert "blocks.data" in line
    caplog.clear()
    # Reopened larger on a filesystem that is now full: the new part cannot be reserved and writes into it fail.
    real_pwritev = os.pwritev

    def pwritev(fd, buffers, offset):
        if offset >= 4 * SLOT:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(posix.os, "pwritev", pwritev)
    more, more_blocks = make_keys(4, seed=65), make_blocks(4, LAYOUT, seed=66)
    with open_store(tmp_path, host=2, disk=8) as store:
        assert store.stats()["disk"].open_faults == 1
        assert check_nothing_wrong(store, keys, blocks) == 4
        store.put(more, more_blocks)
        store.flush()
        stats = store.stats()
        assert stats["disk"].failed_writes > 0
        assert check_nothing_wrong(store, more, more_blocks) == 4 - stats.dropped
        assert len(warnings(caplog, "could not reserve")) == 1
        assert len(warnings(caplog, "writing block", "disk is full")) == 1
