"""The disk tier's persistent index in lmdb: which key lives in which slot, with its checksum.

Records are written in batches, and only for blocks whose data write had completed, so the index never
points at bytes that were not written. A slot is never overwritten while a committed record still names its old
block: the removal of that record is committed first (:meth:`DiskIndex.fence`). So a process killed at any moment
(SIGKILL: what lmdb committed is in the page cache and survives) leaves an index whose every record matches the
bytes in its slot; it only loses the last uncommitted batch (those blocks are misses after restart). A power
loss may also lose commits that were not synced (``flush``/``close`` sync); a record that then names bytes
overwritten since fails its checksum on read (a miss, counted as corrupt), and the newer record (higher ``seq``)
wins when two claim one slot.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import struct
import threading
import time
from dataclasses import dataclass

import lmdb

from ._fs import check_private_file, open_private_file, private_subdirectory, tighten
from .errors import LayoutMismatch

__all__ = ["DiskIndex", "IndexRecord", "IndexWriteError", "FORMAT_VERSION", "CORRUPT_INDEX_ERRORS"]

log = logging.getLogger("tierkv.disk")

# What lmdb raises for files that are not (or no longer) a valid environment: garbage over the meta pages, pages
# that point nowhere, a transaction poisoned by a bad page. Environmental errors (no space, permissions, EIO) are
# not in this list: they say nothing about whether the index can be trusted.
CORRUPT_INDEX_ERRORS = (lmdb.InvalidError, lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.VersionMismatchError,
                        lmdb.IncompatibleError, lmdb.BadTxnError, lmdb.PanicError)

# The on-disk format (data file slots, record layout, header fields). A directory written with another version is
# refused with LayoutMismatch naming both, never read: bump this whenever old files would be misread.
FORMAT_VERSION = 1
_HEADER_KEY = b"header"
_LMDB_FILES = ("data.mdb", "lock.mdb")
# slot, payload bytes, codec id, xxh3-64 checksum, last access (unix time), write sequence number
_RECORD = struct.Struct("<QQBQdQ")


@dataclass
class IndexRecord:
    slot: int
    nbytes: int
    codec: int
    checksum: int
    last_access: float
    seq: int

    def pack(self) -> bytes:
        return _RECORD.pack(self.slot, self.nbytes, self.codec, self.checksum, self.last_access, self.seq)

    @classmethod
    def unpack(cls, raw: bytes) -> "IndexRecord":
        return cls(*_RECORD.unpack(raw))


class IndexWriteError(OSError):
    """A commit of the index failed (lmdb map full, no space, I/O error). Its records are kept and retried by the
    next commit; the blocks they describe stay readable in this process."""

    advice: str | None = None  # what to do, where the errno alone does not say it


class DiskIndex:
    """lmdb environment at ``<dir>/index.lmdb`` with a header (layout, format) and one record per block."""

    def __init__(self, directory: str, header: dict, max_records: int,
                 owners: frozenset[int] | None = None) -> None:
        path = os.path.join(directory, "index.lmdb")
        owners = frozenset((os.stat(directory).st_uid, os.geteuid())) if owners is None else owners
        # lmdb opens its files by name, following symlinks: check them first (the directory is the store's own,
        # 0700, so nobody else can swap them in between), and tighten their modes after.
        private_subdirectory(path, "the index directory", owners)
        for name in _LMDB_FILES:
            check_private_file(os.path.join(path, name), f"the index file {name}", owners)
        _reserve_lock_file(path, owners)
        map_size = max(64 << 20, max_records * 512)
        try:
            # Commits are not fsynced one by one (a synced commit costs ~0.5 ms); flush()/close() sync explicitly.
            self._env = lmdb.open(path, map_size=map_size, max_dbs=2, subdir=True, sync=False, metasync=False,
                                  mode=0o600)
        except lmdb.Error as exc:  # e.g. a map larger than the address space, for an absurd disk_bytes
            raise ValueError(f"expected an lmdb index at {path} sized for {max_records} blocks ({map_size} bytes "
                             f"of address space), got: {exc}") from exc
        try:
            for name in _LMDB_FILES:
                tighten(os.path.join(path, name), owners)
        except BaseException:
            self.close()
            raise
        self._lock = threading.Lock()
        self._pending: dict[bytes, IndexRecord | None] = {}
        # Slots whose old record's removal is staged and not yet committed: not to be overwritten before it is.
        self._unlinked: set[int] = set()
        try:
            self._meta = self._env.open_db(b"meta")
            self._blocks = self._env.open_db(b"blocks")
            self._check_header(path, header)
        except BaseException:  # a damaged file fails here too: never leave the environment open behind
            self.close()
            raise

    def _check_header(self, path: str, header: dict) -> None:
        expected = {"format": FORMAT_VERSION, **header}
        with self._env.begin(write=True, db=self._meta) as txn:
            raw = txn.get(_HEADER_KEY)
            self.created = raw is None  # a new (or lost) index: nothing on disk is described by it
            if raw is None:
                txn.put(_HEADER_KEY, json.dumps(expected, sort_keys=True).encode())
                return
        try:
            found = json.loads(raw)
        except ValueError:  # not JSON (bytes of UTF-8 that does not parse, or not UTF-8 at all)
            found = {"format": f"unreadable header {bytes(raw)[:40]!r}"}
        if not isinstance(found, dict):
            found = {"format": f"unreadable header {found!r:.40}"}
        if found != expected:
            self.close()
            raise LayoutMismatch(f"disk tier at {os.path.dirname(path)} was written with {_describe(found)}; "
                                 f"expected {_describe(expected)}. Use another disk_path or the same layout.")

    def records(self) -> dict[bytes, IndexRecord]:
        """Every well-formed record; a record of another size (damaged) is skipped and staged for removal."""
        found: dict[bytes, IndexRecord] = {}
        with self._env.begin(db=self._blocks) as txn:
            for k, v in txn.cursor():
                if len(v) == _RECORD.size:
                    found[bytes(k)] = IndexRecord.unpack(bytes(v))
                else:
                    self.stage(bytes(k), None)
        return found

    def stage(self, key: bytes, record: IndexRecord | None, unlinked_slot: int | None = None) -> None:
        """Queue a record (None: a removal) for the next commit; the last one staged for a key wins.
        ``unlinked_slot``: the slot the key's committed record names, which must not be overwritten until this
        commits (see :meth:`fence`)."""
        with self._lock:
            self._pending[key] = record
            if unlinked_slot is not None:
                self._unlinked.add(unlinked_slot)

    def fence(self, slots: range) -> None:
        """Call before writing into ``slots``: commits the staged batch when it unlinks one of them, so no
        committed record names a slot while other bytes land in it (a kill in between would leave a record
        whose block ``lookup`` reports and ``get`` cannot return). Not synced: enough for a killed process."""
        with self._lock:
            if self._unlinked and not self._unlinked.isdisjoint(slots):
                self._commit_locked()

    def commit(self, durable: bool = False) -> None:
        """Write the staged records in one transaction (and, ``durable``, force them to stable storage).

        Raises ``IndexWriteError`` when lmdb cannot: the batch stays staged (records staged since win) and the
        next commit retries it, so a passing failure loses nothing and deletes still reach the disk. A full map
        is first grown (doubled) and the commit retried once.
        """
        with self._lock:
            self._commit_locked(durable)

    def _commit_locked(self, durable: bool = False) -> None:
        batch, self._pending = self._pending, {}
        try:
            if batch:
                try:
                    self._write(batch)
                except lmdb.MapFullError:
                    self._grow()
                    self._write(batch)
            if durable:
                self._env.sync(True)
        except BaseException as exc:
            self._pending = {**batch, **self._pending}  # not committed: kept for the next try (the fence stays up)
            if not isinstance(exc, lmdb.Error):
                raise
            error = IndexWriteError(_errno_of(exc), f"committing {len(batch)} records to the index failed: {exc}")
            if isinstance(exc, lmdb.MapFullError):
                error.advice = ("The index's lmdb map is full and could not grow: close the store and delete "
                                "its index.lmdb (the disk tier then starts empty).")
            raise error from exc
        # Every removal staged so far is committed (or superseded by a newer record of its key, committed too).
        self._unlinked.clear()

    def _write(self, batch: dict[bytes, IndexRecord | None]) -> None:
        with self._env.begin(write=True, db=self._blocks) as txn:
            for key, record in batch.items():
                if record is None:
                    txn.delete(key)
                else:
                    txn.put(key, record.pack())

    def _grow(self) -> None:
        """Double the map (lmdb allows it with no transaction open in this process: the caller holds the lock
        every write takes, and reads happen only at open). Raises ``lmdb.Error`` when it cannot."""
        size = self._env.info()["map_size"] * 2
        self._env.set_mapsize(size)
        log.info("%s: the disk index map was full; grown to %d bytes", self._env.path(), size)

    @property
    def pending(self) -> int:
        """Records staged and not yet committed."""
        with self._lock:
            return len(self._pending)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None  # type: ignore[assignment]


# lmdb's lock file for its default 126 readers: lmdb sizes it with ftruncate (a sparse file) and writes it through
# a shared mapping, and a store on a full filesystem then dies of SIGBUS at its first write into a hole.
_LOCK_FILE_BYTES = 8192


def _reserve_lock_file(path: str, owners: frozenset[int]) -> None:
    """Give lmdb's lock file real blocks before lmdb maps it, so that a full filesystem is a ``ValueError`` at
    open rather than SIGBUS. lmdb keeps a lock file at least this large as it is. Opened like every store file:
    0600, never through a symlink."""
    fd = open_private_file(os.path.join(path, "lock.mdb"), os.O_RDWR | os.O_CREAT, "the index file lock.mdb", owners)
    try:
        os.posix_fallocate(fd, 0, _LOCK_FILE_BYTES)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            from .io.posix import free_space

            raise ValueError(f"expected free space for the disk index at {path}, got {free_space(path)} free "
                             f"({exc.strerror}): free space on that filesystem or choose another disk_path") from exc
        # Anything else (a filesystem without fallocate): lmdb sizes the file itself, as it always did.
    finally:
        os.close(fd)


def _errno_of(exc: lmdb.Error) -> int:
    """The errno behind an lmdb failure, for the advice the store logs: lmdb reports system errors by their
    message only."""
    if isinstance(exc, lmdb.MapFullError):
        return errno.ENOSPC  # no room in the map (its own advice says what to do)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
        if os.strerror(code) in str(exc):
            return code
    return errno.EIO


def _describe(header: dict) -> str:
    from .layout import KVLayout

    try:
        layout = str(KVLayout.from_dict(header["layout"]))
    except (KeyError, TypeError, ValueError):
        layout = repr(header.get("layout"))
    return f"{layout} (disk format {header.get('format')}, codec {header.get('codec')!r})"


def now() -> float:
    return time.time()
