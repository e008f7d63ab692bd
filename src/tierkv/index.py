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

import json
import os
import struct
import threading
import time
from dataclasses import dataclass

import lmdb

from .errors import LayoutMismatch

__all__ = ["DiskIndex", "IndexRecord", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_HEADER_KEY = b"header"
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


class DiskIndex:
    """lmdb environment at ``<dir>/index.lmdb`` with a header (layout, format) and one record per block."""

    def __init__(self, directory: str, header: dict, max_records: int) -> None:
        path = os.path.join(directory, "index.lmdb")
        # Commits are not fsynced one by one (a synced commit costs ~0.5 ms); flush()/close() sync explicitly.
        self._env = lmdb.open(path, map_size=max(64 << 20, max_records * 512), max_dbs=2, subdir=True,
                              sync=False, metasync=False, mode=0o700)
        self._meta = self._env.open_db(b"meta")
        self._blocks = self._env.open_db(b"blocks")
        self._lock = threading.Lock()
        self._pending: dict[bytes, IndexRecord | None] = {}
        # Slots whose old record's removal is staged and not yet committed: not to be overwritten before it is.
        self._unlinked: set[int] = set()
        self._check_header(path, header)

    def _check_header(self, path: str, header: dict) -> None:
        expected = {"format": FORMAT_VERSION, **header}
        with self._env.begin(write=True, db=self._meta) as txn:
            raw = txn.get(_HEADER_KEY)
            if raw is None:
                txn.put(_HEADER_KEY, json.dumps(expected, sort_keys=True).encode())
                return
        found = json.loads(raw)
        if found != expected:
            self.close()
            raise LayoutMismatch(f"disk tier at {os.path.dirname(path)} was written with {_describe(found)}; "
                                 f"expected {_describe(expected)}. Use another disk_path or the same layout.")

    def records(self) -> dict[bytes, IndexRecord]:
        with self._env.begin(db=self._blocks) as txn:
            return {bytes(k): IndexRecord.unpack(bytes(v)) for k, v in txn.cursor()}

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
        with self._lock:
            self._commit_locked()
            if durable:
                self._env.sync(True)

    def _commit_locked(self) -> None:
        batch, self._pending = self._pending, {}
        if batch:
            try:
                with self._env.begin(write=True, db=self._blocks) as txn:
                    for key, record in batch.items():
                        if record is None:
                            txn.delete(key)
                        else:
                            txn.put(key, record.pack())
            except BaseException:
                self._pending = batch  # not committed: kept for the next try (and the fence stays up)
                raise
        # Every removal staged so far is committed (or superseded by a newer record of its key, committed too).
        self._unlinked.clear()

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None  # type: ignore[assignment]


def _describe(header: dict) -> str:
    from .layout import KVLayout

    try:
        layout = str(KVLayout.from_dict(header["layout"]))
    except (KeyError, TypeError, ValueError):
        layout = repr(header.get("layout"))
    return f"{layout} (disk format {header.get('format')}, codec {header.get('codec')!r})"


def now() -> float:
    return time.time()
