"""Crash consistency of the disk tier: real processes killed with SIGKILL at random moments, then checked.

A KV cache that returns a wrong block makes a model say wrong things silently, so after every kill:

- every block ``flush`` had promised (the writer journals keys, fsynced, only after ``flush`` returned) is there
  and bit-exact; no block whose ``delete`` had returned is back;
- every block ``in``/``lookup`` reports is returned by ``get`` bit-exact: no "present" block that then fails its
  checksum (a SIGKILL loses no page cache, so nothing may be corrupt), and ``stats().corrupt`` stays 0;
- the lmdb index and the data file agree: every record points inside the file at a slot no other record
  claims, whose bytes match the record's checksum and the bytes of the record's key; and recovery drops nothing.

Then the next process continues on the same directory, so damage would compound. Kill delays come from a seeded
generator (``TIERKV_CRASH_SEED`` overrides it; the seed is printed and named in every failure), so a failure
reproduces. Children come from a "forkserver" whose process imported torch and tierkv once (see crash_worker).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import threading
import time
from pathlib import Path

import lmdb
import pytest
import torch

import crash_worker as cw
import tierkv
from tierkv.index import IndexRecord
from tierkv.tiers.disk import DATA_FILE, checksum

SEED = int(os.environ.get("TIERKV_CRASH_SEED", "20261201"))
SLOT = 4096  # a 1 KiB block rounds up to one page on disk
BLOCK = cw.layout().block_nbytes


@pytest.fixture(scope="module")
def ctx():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["crash_worker"])
    print(f"crash-consistency seed: {SEED} (set TIERKV_CRASH_SEED to replay another)")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=cw.where, args=(theirs,), daemon=True)
    child.start()
    assert ours.poll(120), "the forkserver child did not answer"
    found = ours.recv()
    child.join(30)
    assert found == tierkv.__file__, f"children import tierkv from {found}, this test from {tierkv.__file__}"
    return ctx


def config(host_blocks: int, disk_blocks: int, writeback_blocks: int) -> dict:
    return dict(device_bytes=0, host_bytes=host_blocks * BLOCK, disk_bytes=disk_blocks * SLOT,
                writeback_bytes=writeback_blocks * SLOT)


def run_until_killed(ctx, target, args: tuple, delay: float, what: str) -> bool:
    """Start ``target(*args, ready)`` in a child, SIGKILL it ``delay`` s after it set ``ready``; True when the
    kill found it running. A child that failed on its own (an assertion in it) fails the test."""
    ready = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, ready), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.01) and proc.is_alive() and time.monotonic() < deadline:
            pass
        assert ready.is_set(), f"{what}: the child never got ready (exit code {proc.exitcode})"
        time.sleep(delay)
        landed = proc.is_alive()
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # it had finished (and is_alive() reaped it)
            landed = False
    finally:
        proc.join(30)
        if proc.is_alive():  # only if the join above timed out
            proc.kill()
            proc.join()
    assert proc.exitcode in (0, -signal.SIGKILL), f"{what}: the child failed on its own (exit code {proc.exitcode})"
    return landed


def run_to_the_end(ctx, target, args: tuple, what: str) -> float:
    """Run ``target(*args, ready)`` in a child to its end; returns seconds from ``ready`` to its exit."""
    ready = ctx.Event()
    proc = ctx.Process(target=target, args=(*args, ready), daemon=True)
    proc.start()
    assert ready.wait(60), f"{what}: the child never got ready"
    start = time.monotonic()
    proc.join(60)
    span = time.monotonic() - start
    assert proc.exitcode == 0, f"{what}: exit code {proc.exitcode}"
    return span


# ---------------------------------------------------------------------------------------------------------------
# checks


def read_journal(path: Path) -> dict[bytes, set[bytes]]:
    """``{b"F": keys flush promised, b"d": keys a delete was started for, b"D": keys whose delete returned}``. A
    kill mid-append leaves a partial last line: skipped (nothing was promised yet)."""
    tags: dict[bytes, set[bytes]] = {b"F": set(), b"d": set(), b"D": set()}
    if path.exists():
        for line in path.read_bytes().split(b"\n")[:-1]:
            tag, key = line.split()
            tags[tag].add(bytes.fromhex(key.decode()))
    return tags


def read_progress(path: Path) -> int:
    raw = path.read_bytes().strip() if path.exists() else b""
    return int(raw) if raw else 0


def check_index_agrees_with_data(disk_path: Path, disk_blocks: int, expected: dict[bytes, bytes],
                                 what: str) -> dict[bytes, int]:
    """Read the lmdb index and the data file as they lie on disk (no store open, no recovery repairing them):
    every record's slot is inside the file and claimed by no other record, and its bytes match the record's
    checksum and its key. Returns key -> slot."""
    env = lmdb.open(str(disk_path / "index.lmdb"), readonly=True, lock=False, max_dbs=2, subdir=True)
    try:
        meta, blocks = env.open_db(b"meta", create=False), env.open_db(b"blocks", create=False)
        with env.begin() as txn:
            header = json.loads(bytes(txn.get(b"header", db=meta)))
            records = {bytes(k): IndexRecord.unpack(bytes(v)) for k, v in txn.cursor(db=blocks)}
    finally:
        env.close()
    slot_nbytes = header["slot_nbytes"]
    assert slot_nbytes == SLOT, f"{what}: header says slot_nbytes {slot_nbytes}"
    size = os.path.getsize(disk_path / DATA_FILE)
    owners: dict[int, bytes] = {}
    with open(disk_path / DATA_FILE, "rb") as f:
        for key, rec in records.items():
            assert key in expected, f"{what}: the index holds {key.hex()}, a key no writer ever put"
            assert 0 <= rec.slot < disk_blocks, f"{what}: {key.hex()} -> slot {rec.slot}, outside {disk_blocks}"
            assert (rec.slot + 1) * slot_nbytes <= size, f"{what}: {key.hex()} -> slot {rec.slot}, past the file end"
            assert rec.slot not in owners, (
                f"{what}: slot {rec.slot} is claimed by {owners[rec.slot].hex()} and {key.hex()}")
            owners[rec.slot] = key
            assert rec.nbytes == BLOCK, f"{what}: {key.hex()} record says {rec.nbytes} bytes"
            payload = os.pread(f.fileno(), rec.nbytes, rec.slot * slot_nbytes)
            assert checksum(torch.frombuffer(bytearray(payload), dtype=torch.uint8)) == rec.checksum, (
                f"{what}: {key.hex()} -> slot {rec.slot}: the data there fails the record's checksum "
                "(the index points at bytes that are not the block's)")
            assert payload == expected[key], f"{what}: {key.hex()} -> slot {rec.slot} holds another block's bytes"
    return {key: rec.slot for key, rec in records.items()}


def check_store(disk_path: Path, disk_blocks: int, expected: dict[bytes, bytes], flushed: set[bytes],
                deleted: set[bytes], what: str, deleting: set[bytes] = frozenset()) -> int:
    """All the checks of the module docstring; returns how many blocks the store holds. ``flushed`` blocks must
    be there unless ``deleted`` (must be gone) or ``deleting`` (a delete was under way: either)."""
    on_disk = check_index_agrees_with_data(disk_path, disk_blocks, expected, what)
    # Reopen with room for every block in memory, so the checker's own reads promote without evicting.
    cfg = tierkv.StoreConfig(disk_path=str(disk_path), **config(len(expected) + 1, disk_blocks, 16))
    with tierkv.BlockStore(cw.layout(), cfg) as store:  # a StoreInUse here: the dead writer's lock wedged it
        disk = store._manager.tiers[-1]
        assert dict(disk._key_slot) == on_disk, f"{what}: recovery dropped or changed index records"
        assert os.path.getsize(disk_path / DATA_FILE) == disk_blocks * SLOT, f"{what}: data file size"
        present = [key for key in expected if key in store]
        assert set(present) == set(on_disk), f"{what}: `in` disagrees with the index"
        lost = flushed - deleted - deleting - set(present)
        assert not lost, f"{what}: {len(lost)} flushed blocks are missing, e.g. {next(iter(lost)).hex()}"
        back = deleted & set(present)
        assert not back, f"{what}: {len(back)} deleted blocks came back, e.g. {next(iter(back)).hex()}"
        for key in present:
            assert store.lookup([key]) == 1, f"{what}: `in` reports {key.hex()}, lookup does not"
        for start in range(0, len(present), 256):
            batch = present[start:start + 256]
            try:
                got = store.get(batch).view(torch.uint8).reshape(len(batch), BLOCK)
            except tierkv.BlockNotFound as exc:
                raise AssertionError(f"{what}: lookup reported a block that get cannot return: {exc}") from None
            for key, row in zip(batch, got):
                assert bytes(row.numpy()) == expected[key], f"{what}: get returned wrong bytes for {key.hex()}"
        stats = store.stats()
        assert stats.corrupt == 0 and stats.tiers["disk"].failed_reads == 0, f"{what}: {stats.tiers['disk']}"
    return len(present)


# ---------------------------------------------------------------------------------------------------------------
# writers killed while they put, flush, delete, read and push blocks down to disk


SCENARIOS = {
    # host 64 blocks: puts of 1..8 keys keep pushing blocks down to disk (write-behind) between frequent flushes.
    "put-flush": dict(cfg=config(64, 16384, 16), kills=10, max_delay=0.5, journal=True,
                      flush_every=3, delete_every=7, get_every=5),
    # host 8 blocks, write-behind of 4: nearly every put demotes blocks to disk in the background; rare flushes.
    "eviction-to-disk": dict(cfg=config(8, 16384, 4), kills=6, max_delay=0.6, journal=True,
                             flush_every=12, delete_every=0, get_every=0),
    # a disk of 96 blocks fills at once: blocks fall off the disk and their slots are reused under load (flushed
    # blocks may be evicted later, so the journal's flushes promise nothing; its deletes still hold).
    "full-disk": dict(cfg=config(8, 96, 4), kills=10, max_delay=0.5, journal=False,
                      flush_every=4, delete_every=5, get_every=3),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_writers_killed_at_random_moments_leave_a_consistent_store(ctx, tmp_path, scenario):
    spec = SCENARIOS[scenario]
    disk_path = tmp_path / "disk"
    disk_blocks = spec["cfg"]["disk_bytes"] // SLOT
    rng = random.Random(f"{SEED}:{scenario}")
    expected: dict[bytes, bytes] = {}
    flushed: set[bytes] = set()
    deleted: set[bytes] = set()
    deleting: set[bytes] = set()
    landed = 0
    for run in range(spec["kills"]):
        delay = rng.uniform(0.0, spec["max_delay"])
        what = f"{scenario}, seed {SEED}, kill {run} after {delay:.3f} s"
        journal, progress = tmp_path / f"journal-{run}", tmp_path / f"progress-{run}"
        landed += run_until_killed(
            ctx, cw.writer, (str(disk_path), spec["cfg"], SEED, run, str(journal), str(progress),
                             spec["flush_every"], spec["delete_every"], spec["get_every"]), delay, what)
        # Keys this run may have written: those handed to put, plus the batch it was starting (at most 8).
        for j in range(read_progress(progress) + 8):
            key = cw.key_of(SEED, run, j)
            expected[key] = cw.bytes_of(key, BLOCK)
        tags = read_journal(journal)
        if spec["journal"]:
            flushed |= tags[b"F"]
        deleted |= tags[b"D"]
        deleting |= tags[b"d"]
        held = check_store(disk_path, disk_blocks, expected, flushed, deleted, what, deleting)
        print(f"{what}: {held} blocks held, {len(flushed)} flushed, {len(deleted)} deleted")
    assert landed == spec["kills"], f"{scenario}: only {landed} of {spec['kills']} kills found the writer running"
    assert flushed or not spec["journal"], f"{scenario}: no flush ever completed; the kills came too early"


# ---------------------------------------------------------------------------------------------------------------
# kills while a store opens (recovery), reads and closes


def test_kills_during_reopen_never_lose_or_corrupt_blocks(ctx, tmp_path):
    disk_path = tmp_path / "disk"
    n, disk_blocks = 1500, 2048
    cfg = config(64, disk_blocks, 16)
    keys = [cw.key_of(SEED, -1, j) for j in range(n)]
    expected = {key: cw.bytes_of(key, BLOCK) for key in keys}
    with tierkv.BlockStore(cw.layout(), tierkv.StoreConfig(disk_path=str(disk_path), **cfg)) as store:
        for start in range(0, n, 100):
            store.put(keys[start:start + 100], cw.blocks_of(keys[start:start + 100], cw.layout()))
    all_of_them = set(keys)
    check_store(disk_path, disk_blocks, expected, all_of_them, set(), f"seed {SEED}, before any kill")
    # One opener left alone measures how long open + reads + close take; the kills land inside that span.
    span = run_to_the_end(ctx, cw.opener, (str(disk_path), cfg, keys, SEED), "the untimed opener")
    rng = random.Random(f"{SEED}:reopen")
    landed = 0
    for i in range(8):
        delay = rng.uniform(0.0, 0.8 * span)
        what = f"reopen, seed {SEED}, kill {i} after {delay:.3f} of {span:.3f} s"
        landed += run_until_killed(ctx, cw.opener, (str(disk_path), cfg, keys, SEED + i), delay, what)
        check_store(disk_path, disk_blocks, expected, all_of_them, set(), what)
    print(f"reopen: {landed} of 8 kills landed within the opener's {span:.3f} s")
    assert landed >= 4, f"only {landed} of 8 kills found the opener running (span {span:.3f} s)"


def test_kills_during_the_first_open_of_a_directory(ctx, tmp_path):
    """Killed while it creates the directory, the index and the data file: the next open still works."""
    cfg = config(16, 4096, 16)
    rng = random.Random(f"{SEED}:first-open")
    landed = 0
    for i in range(4):
        disk_path = tmp_path / f"disk-{i}"
        delay = rng.uniform(0.0, 0.05)
        what = f"first open, seed {SEED}, kill {i} after {delay:.3f} s"
        landed += run_until_killed(ctx, cw.opener, (str(disk_path), cfg, [], SEED), delay, what)
        with tierkv.BlockStore(cw.layout(), tierkv.StoreConfig(disk_path=str(disk_path), **cfg)) as store:
            key = cw.key_of(SEED, -2, i)
            store.put([key], cw.blocks_of([key], cw.layout()))
        check_store(disk_path, 4096, {key: cw.bytes_of(key, BLOCK)}, {key}, set(), what + ", then a put")
    print(f"first open: {landed} of 4 kills landed")


def test_a_child_forked_by_a_killed_owner_does_not_keep_the_store_locked(ctx, tmp_path):
    """The lock is a flock on ``disk_path/LOCK``; a fork()ed child shared it (O_CLOEXEC covers exec only), so a
    worker outliving its killed parent kept the cache "already open by another store" until it exited."""
    disk_path, pidfile = tmp_path / "disk", tmp_path / "child.pid"
    cfg = config(16, 64, 4)
    assert run_until_killed(ctx, cw.forking_owner, (str(disk_path), cfg, str(pidfile)), 0.0, "forking owner")
    child = int(pidfile.read_text())
    try:
        os.kill(child, 0)  # the child lives on
        key = cw.key_of(0, -4, 0)
        check_store(disk_path, 64, {key: cw.bytes_of(key, BLOCK)}, {key}, set(), "reopened beside the child")
    finally:
        os.kill(child, signal.SIGKILL)


def test_an_open_that_fails_in_recovery_leaves_the_directory_unlocked(tmp_path, monkeypatch):
    """A store whose recovery raised (an index lmdb cannot read, after a power loss say) kept its disk_path
    locked: every later open in the process was refused as "already open by another store"."""
    cfg = tierkv.StoreConfig(disk_path=str(tmp_path / "disk"), **config(16, 64, 4))
    key = cw.key_of(SEED, -5, 0)
    with tierkv.BlockStore(cw.layout(), cfg) as store:
        store.put([key], cw.blocks_of([key], cw.layout()))

    def unreadable(self):
        raise lmdb.CorruptedError("injected: the index cannot be read")

    monkeypatch.setattr(tierkv.tiers.disk.DiskTier, "recover", unreadable)
    for _ in range(2):  # the second open sees the same error, not StoreInUse
        with pytest.raises(lmdb.CorruptedError):
            tierkv.BlockStore(cw.layout(), cfg)
    monkeypatch.undo()
    check_store(tmp_path / "disk", 64, {key: cw.bytes_of(key, BLOCK)}, {key}, set(), "after two failed opens")


# ---------------------------------------------------------------------------------------------------------------
# regression: a slot is never overwritten while a committed index record still points at it


class OverwriteWatch:
    """Wraps the disk tier's data file: before every write, finds committed index records (what a SIGKILL now
    would leave) that point at the slots being written and whose checksum the new bytes would fail."""

    def __init__(self, disk) -> None:
        self.disk, self.inner = disk, disk._file
        inner = self.inner
        self.name, self.path, self.size, self.direct = inner.name, inner.path, inner.size, inner.direct
        self.hazards: list[str] = []
        self.writes = 0

    def _check(self, bufs, offset: int) -> None:
        index, slot_nbytes, payload = self.disk._index, self.disk.slot_nbytes, self.disk.payload_nbytes
        first = offset // slot_nbytes
        new = {first + i: checksum(b[:payload]) for i, b in enumerate(bufs)}
        with index._env.begin(db=index._blocks) as txn:
            for key, raw in txn.cursor():
                rec = IndexRecord.unpack(bytes(raw))
                if rec.slot in new and new[rec.slot] != rec.checksum:
                    self.hazards.append(f"slot {rec.slot} overwritten while the index maps {bytes(key).hex()} there")
        self.writes += 1

    def pwrite(self, buf, offset):
        self._check([buf], offset)
        self.inner.pwrite(buf, offset)

    def pwritev(self, bufs, offset):
        self._check(bufs, offset)
        self.inner.pwritev(bufs, offset)

    def pread(self, buf, offset):
        self.inner.pread(buf, offset)

    def sync(self):
        self.inner.sync()

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("writeback_blocks", [0, 4], ids=["sync-writes", "write-behind"])
def test_a_reused_disk_slot_loses_its_old_index_record_before_it_is_overwritten(tmp_path, writeback_blocks):
    """Found by the full-disk scenario: a block evicted off a full disk handed its slot to a newcomer whose bytes
    landed before the eviction's index removal was committed; killed then, the index named the old block at a
    slot holding the new one (a block ``lookup`` reported and ``get`` could not return)."""
    lay = cw.layout()
    cfg = tierkv.StoreConfig(disk_path=str(tmp_path / "disk"), **config(4, 8, writeback_blocks))
    keys = [cw.key_of(SEED, -3, j) for j in range(64)]
    with tierkv.BlockStore(lay, cfg) as store:
        watch = store._manager.tiers[-1]._file = OverwriteWatch(store._manager.tiers[-1])
        for j in range(0, 64, 2):  # a disk of 8 fills at once; every later demotion reuses an evicted block's slot
            store.put(keys[j:j + 2], cw.blocks_of(keys[j:j + 2], lay))
            if j % 8 == 6:
                store.flush()  # flush evicts disk copies of blocks also in memory, and rewrites their slots
            if j % 16 == 14:
                store.delete([keys[j - 5]])
                store.put(keys[j - 5:j - 4], cw.blocks_of(keys[j - 5:j - 4], lay))  # into the slot just freed
        store.drain()
        assert watch.writes >= 20
        assert not watch.hazards, watch.hazards[:3]


def test_a_block_deleted_while_it_is_read_stays_deleted_after_a_restart(tmp_path):
    """A read restages its block's index record (last access, for LRU across restarts). It looked the key up,
    and a delete landing before it staged the record put back the record the delete had removed: the deleted
    block came back after a restart or, once its slot was reused, named bytes that were not its own."""
    cfg = tierkv.StoreConfig(disk_path=str(tmp_path / "disk"), **config(0, 8, 0))
    keys = [cw.key_of(SEED, -6, j) for j in range(2)]
    with tierkv.BlockStore(cw.layout(), cfg) as store:
        store.put(keys, cw.blocks_of(keys, cw.layout()))
        disk = store._manager.tiers[-1]
        deleter = threading.Thread(target=store.delete, args=(keys[:1],))

        class DeleteAfterLookup(dict):  # another thread's delete, landing right after the read found its key
            def get(self, slot, default=None):
                found = super().get(slot, default)
                if found == keys[0] and not deleter.is_alive() and deleter.ident is None:
                    deleter.start()
                    deleter.join(0.5)  # done by now, unless the read holds what the delete needs
                return found

        disk._slot_key = DeleteAfterLookup(disk._slot_key)
        store.get(keys[:1])  # read before the delete: it may still return the block
        deleter.join()
        assert keys[0] not in store
    check_store(tmp_path / "disk", 8, {k: cw.bytes_of(k, BLOCK) for k in keys}, {keys[1]}, {keys[0]},
                "after a delete during a read")
