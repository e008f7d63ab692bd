"""Disk tier: fixed 4096-aligned slots in one preallocated data file, an lmdb index, xxh3-64 checksums.

Directory layout (created owner-only): ``blocks.data`` (slot i at byte ``i * slot_nbytes``), ``index.lmdb/``
(key -> slot, size, codec, checksum, last access), ``LOCK`` (held while a store has the directory open).
``disk_path`` is resolved once; none of these names is followed through a symlink (see ``tierkv._fs``).
"""
from __future__ import annotations

import errno
import fcntl
import itertools
import logging
import os
import shutil
import threading
import weakref

import lmdb
import torch
import xxhash

from .._fs import open_private_file, private_directory
from .._memory import ALIGNMENT, aligned_empty, copy_bytes, round_up
from ..errors import StoreInUse
from ..codec import Codec
from ..index import CORRUPT_INDEX_ERRORS, DiskIndex, IndexRecord, now
from ..io import open_data_file
from ..io.posix import free_space
from ..layout import KVLayout
from .base import CorruptBlock, SlotAllocator, SlottedTier, Tier

__all__ = ["DiskTier"]

log = logging.getLogger("tierkv.disk")

DATA_FILE = "blocks.data"
INDEX_DIR = "index.lmdb"
LOCK_FILE = "LOCK"


# The lock fds of the disk tiers open in this process. A fork()ed child inherits them (O_CLOEXEC covers only
# exec), and a flock lasts while any process holds its file open: a child outliving an owner killed by SIGKILL
# would keep the directory locked ("already open by another store") until it exits. So children close their
# copies right after fork; closing a copy does not unlock the parent's lock, only dropping the last one does.
_lock_fds: dict[int, "weakref.ref[DiskTier]"] = {}
_fork_hook_registered = False


def _drop_inherited_locks() -> None:
    for fd, ref in list(_lock_fds.items()):
        tier = ref()
        if tier is not None:
            tier._lock_fd = -1  # this child never held it; its close() must not unlock the parent's lock
        try:
            os.close(fd)
        except OSError:
            pass
    _lock_fds.clear()


def checksum(buf: torch.Tensor) -> int:
    return xxhash.xxh3_64_intdigest(memoryview(buf.numpy()).cast("B"))


def _is_corrupt_index(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the index files are damaged."""
    return isinstance(_root_cause(exc), CORRUPT_INDEX_ERRORS)


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


class DiskTier(SlottedTier):
    addressable = False
    persistent = True
    name = "disk"
    device = torch.device("cpu")

    def __init__(self, path: str, capacity_bytes: int, layout: KVLayout, codec: Codec,
                 backend: str = "auto") -> None:
        self.codec = codec
        self.payload_nbytes = codec.nbytes
        self.slot_nbytes = round_up(self.payload_nbytes)
        self.capacity_slots = capacity_bytes // self.slot_nbytes
        self.path = path
        self.open_faults = 0
        real, owners = self._open_directory(path)
        try:
            data_path = os.path.join(real, DATA_FILE)
            had_data = os.path.isfile(data_path) and os.path.getsize(data_path) > 0
            self._index, self._found = self._open_index(real, {"layout": layout.to_dict(),
                                                               "slot_nbytes": self.slot_nbytes,
                                                               "codec": codec.name}, owners)
            if self._index.created and had_data and not self.open_faults:
                self._fault(f"{path}: {DATA_FILE} has no index ({INDEX_DIR} is missing or empty), so none of its "
                            "blocks can be verified: the disk tier starts empty and overwrites them. Nothing to do "
                            "unless the index was deleted by mistake.")
            try:
                self._file = open_data_file(data_path, self.capacity_slots * self.slot_nbytes, backend)
            except OSError as exc:
                self._index.close()
                raise ValueError(f"expected a writable disk_path with room for the data file, got {path!r}: "
                                 f"{exc.strerror or exc} ({free_space(data_path)} free)") from exc
            except BaseException:
                self._index.close()
                raise
        except BaseException:
            self._release_lock()
            raise
        if self._file.reserve_error is not None:
            self.open_faults += 1  # logged by the data file, with the free space
        self.backend = self._file.name
        self.direct_io = self._file.direct
        self._slots = SlotAllocator(self.capacity_slots)
        self._checksums = [0] * self.capacity_slots
        self._slot_key: dict[int, bytes] = {}
        self._key_slot: dict[bytes, int] = {}
        self._seq = itertools.count(1)  # next() is atomic under the GIL: I/O threads stage records too
        self._staging = threading.local()
        # Guards the key<->slot maps and the staging of their records: bind/unbind run under the manager's
        # lock, _verify (which restages a read block's last access) on I/O threads without it.
        self._binding = threading.Lock()
        # Staging buffers are pinned when CUDA exists, so device<->disk copies run at DMA speed.
        self._pin_staging = torch.cuda.is_available()

    # -- index at open --------------------------------------------------------------------------------------
    def _open_index(self, path: str, header: dict, owners: frozenset[int]
                    ) -> tuple[DiskIndex, dict[bytes, IndexRecord]]:
        """The index and its records. An index lmdb cannot read (garbage over its files, a damaged page) is moved
        aside to ``index.lmdb.corrupt`` and a new, empty one is made: without a trustworthy index no block of the
        data file can be verified, so the tier starts empty (fail closed) rather than refusing to open. Other
        failures (no space, permissions) are a ``ValueError`` naming the path: the directory is unusable."""
        try:
            try:
                index = DiskIndex(path, header, self.capacity_slots, owners)
                try:
                    return index, index.records()
                except BaseException:
                    index.close()
                    raise
            except Exception as exc:
                if not _is_corrupt_index(exc):
                    raise
                damage = exc
            aside = os.path.join(path, INDEX_DIR + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)  # keep only the latest one for inspection
            os.replace(os.path.join(path, INDEX_DIR), aside)
            self._fault(f"{path}: the disk index is unreadable ({_root_cause(damage)}); moved aside to {aside} and "
                        f"started an empty disk tier (its blocks cannot be verified without it). Check the device "
                        f"if this recurs; delete {aside} when done with it.")
            index = DiskIndex(path, header, self.capacity_slots, owners)
            return index, {}
        except lmdb.Error as exc:
            raise ValueError(f"expected a writable disk_path with room for the index, got {path!r}: {exc} "
                             f"({free_space(path)} free)") from exc
        except OSError as exc:
            raise ValueError(f"expected a writable disk_path, got {path!r}: the index could not be set up "
                             f"({exc})") from exc

    def _fault(self, message: str) -> None:
        """A fault found at open: counted (``stats()['disk'].open_faults``) and logged once, with what to do."""
        self.open_faults += 1
        log.warning(message)

    # -- directory, lock ------------------------------------------------------------------------------------
    def _open_directory(self, path: str) -> tuple[str, frozenset[int]]:
        """Resolve, create (0700) and lock ``path``; returns the resolved directory and who may own its files."""
        real, owners = private_directory(path)
        try:
            self._lock_fd = open_private_file(os.path.join(real, LOCK_FILE), os.O_RDWR | os.O_CREAT, "the LOCK file",
                                              owners)
        except OSError as exc:
            raise ValueError(f"expected a writable directory for disk_path, got {path!r}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreInUse(f"disk_path {path!r} is already open by another store; close it first or use "
                                 "another directory") from None
            raise
        global _fork_hook_registered
        if not _fork_hook_registered:
            os.register_at_fork(after_in_child=_drop_inherited_locks)
            _fork_hook_registered = True
        _lock_fds[self._lock_fd] = weakref.ref(self)
        if not os.access(real, os.W_OK):
            self._release_lock()
            raise ValueError(f"expected a writable directory for disk_path, got {path!r} (permission denied)")
        return real, owners

    def _release_lock(self) -> None:
        if self._lock_fd >= 0:
            _lock_fds.pop(self._lock_fd, None)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    # -- slots ----------------------------------------------------------------------------------------------
    def view(self, slot: int) -> torch.Tensor:
        raise TypeError("the disk tier is not addressable; use read()")

    def _staging_buffer(self) -> torch.Tensor:
        buf = getattr(self._staging, "buf", None)
        if buf is None:
            buf = self._staging.buf = aligned_empty(self.slot_nbytes, pinned=self._pin_staging)
        return buf

    def _direct_buffer(self, t: torch.Tensor) -> torch.Tensor | None:
        """A whole slot of ``t`` when the file can DMA straight into or out of it: aligned, contiguous host
        memory at least ``slot_nbytes`` long (callers that can, pass buffers that long)."""
        if (t.device.type == "cpu" and t.is_contiguous() and t.numel() >= self.slot_nbytes
                and t.data_ptr() % ALIGNMENT == 0):
            return t[:self.slot_nbytes]
        return None

    # -- data -----------------------------------------------------------------------------------------------
    def write(self, slot: int, src: torch.Tensor) -> None:
        buf = self._direct_buffer(src)
        if buf is None:
            buf = self._staging_buffer()
            copy_bytes(buf[:self.payload_nbytes], src[:self.payload_nbytes])
        digest = checksum(buf[:self.payload_nbytes])
        self._index.fence(range(slot, slot + 1))  # the slot's old record goes before its old bytes do
        self._file.pwrite(buf, slot * self.slot_nbytes)
        self._checksums[slot] = digest

    def write_run(self, first_slot: int, bufs: list[torch.Tensor]) -> list[BaseException | None]:
        """Consecutive slots in one vectored request (the buffers need not be adjacent in memory). When the
        request fails, the slots are written one by one, so one bad sector fails only its own block."""
        if len(bufs) == 1:
            return Tier.write_run(self, first_slot, bufs)
        whole = [buf[:self.slot_nbytes] for buf in bufs]
        assert all(b.numel() == self.slot_nbytes and b.data_ptr() % ALIGNMENT == 0 for b in whole), "write_run"
        digests = [checksum(b[:self.payload_nbytes]) for b in whole]
        self._index.fence(range(first_slot, first_slot + len(whole)))  # old records go before old bytes do
        try:
            self._file.pwritev(whole, first_slot * self.slot_nbytes)
        except OSError:
            return Tier.write_run(self, first_slot, bufs)
        for j, digest in enumerate(digests):
            self._checksums[first_slot + j] = digest
        return [None] * len(bufs)

    def read(self, slot: int, dst: torch.Tensor) -> None:
        buf = self._direct_buffer(dst)
        staged = buf is None
        if staged:
            buf = self._staging_buffer()
        self._file.pread(buf, slot * self.slot_nbytes)
        self._verify(slot, buf)
        if staged:
            copy_bytes(dst[:self.payload_nbytes], buf[:self.payload_nbytes])

    def read_run(self, first_slot: int, count: int, buf: torch.Tensor) -> list[BaseException | None]:
        """``count`` consecutive slots in one request (a few MiB per request is what NVMe, and this file system,
        need to reach full speed; half-size fp8 slots read one by one would not). Checksums are per slot, so a
        corrupt block fails alone; when the request itself fails, the slots are read one by one, so one bad
        sector fails only its own block."""
        assert buf.numel() >= count * self.slot_nbytes and buf.data_ptr() % ALIGNMENT == 0, "read_run buffer"
        try:
            self._file.pread(buf[:count * self.slot_nbytes], first_slot * self.slot_nbytes)
        except OSError as exc:
            if count == 1:
                return [exc]
            return Tier.read_run(self, first_slot, count, buf)
        results: list[BaseException | None] = []
        for j in range(count):
            try:
                self._verify(first_slot + j, buf[j * self.slot_nbytes:])
                results.append(None)
            except CorruptBlock as exc:
                results.append(exc)
        return results

    def _verify(self, slot: int, buf: torch.Tensor) -> None:
        """``buf`` holds what was read of ``slot``: check it against the slot's checksum (``CorruptBlock``
        when it differs) and record the access, so the LRU order survives a restart."""
        if checksum(buf[:self.payload_nbytes]) != self._checksums[slot]:
            raise CorruptBlock(f"slot {slot} of {self._file.path}: checksum mismatch")
        with self._binding:  # a key unbound meanwhile (deleted while this read ran) must stay unindexed
            key = self._slot_key.get(slot)
            if key is not None:
                self._stage(key, slot)

    # -- index ----------------------------------------------------------------------------------------------
    def _stage(self, key: bytes, slot: int) -> None:
        self._index.stage(key, IndexRecord(slot, self.payload_nbytes, self.codec.id,
                                           self._checksums[slot], now(), next(self._seq)))

    def bind(self, key: bytes, slot: int) -> None:
        with self._binding:
            self._slot_key[slot] = key
            self._key_slot[key] = slot
            self._stage(key, slot)

    def unbind(self, key: bytes, slot: int) -> None:
        with self._binding:
            if self._key_slot.get(key) == slot:
                del self._key_slot[key]
                # The committed record may still name this slot: the slot must not be rewritten before the
                # removal is committed (DiskIndex.fence), or a kill in between leaves the index lying.
                self._index.stage(key, None, unlinked_slot=slot)
            if self._slot_key.get(slot) == key:
                del self._slot_key[slot]

    def recover(self) -> list[tuple[bytes, int]]:
        """Load the index: drop records that point past the file, disagree with this format, or lose a slot
        to a newer record; return the survivors least recently used first."""
        owner: dict[int, tuple[bytes, IndexRecord]] = {}
        stale: list[bytes] = []
        # Slots past the end the data file had at open were lost with the bytes a truncation cut off: their
        # records would only fail their checksums (the file has been sized again with zeros).
        found_slots = self._file.found_size // self.slot_nbytes
        cut: list[bytes] = []
        found, self._found = self._found, {}
        for key, rec in found.items():
            if (len(key) != 16 or rec.slot >= self.capacity_slots or rec.nbytes != self.payload_nbytes
                    or rec.codec != self.codec.id):
                stale.append(key)
                continue
            if rec.slot >= found_slots:
                cut.append(key)
                continue
            previous = owner.get(rec.slot)
            if previous is not None:
                older = previous if previous[1].seq < rec.seq else (key, rec)
                stale.append(older[0])
                if older is previous:
                    owner[rec.slot] = (key, rec)
                continue
            owner[rec.slot] = (key, rec)
        for key in stale + cut:
            self._index.stage(key, None)  # committed by the tier manager's first commit (counted if it fails)
        if stale:
            log.warning("%s: dropped %d index records that no longer match the data file", self.path, len(stale))
        if cut:
            self._fault(f"{self._file.path} is shorter than its index says ({self._file.found_size} bytes): dropped "
                        f"the {len(cut)} blocks past its end (truncated by something other than tierkv?). The "
                        "disk tier keeps serving the rest.")
        survivors = sorted(owner.values(), key=lambda kr: (kr[1].last_access, kr[1].seq))
        self._slots.claim_all([rec.slot for _, rec in survivors])
        for key, rec in survivors:
            self._checksums[rec.slot] = rec.checksum
            self._slot_key[rec.slot] = key
            self._key_slot[key] = rec.slot
        self._seq = itertools.count(max((rec.seq for _, rec in survivors), default=0) + 1)
        return [(key, rec.slot) for key, rec in survivors]

    def commit(self, durable: bool = False) -> None:
        if durable:
            self._file.sync()  # data before the index that points at it
        self._index.commit(durable)

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "capacity_blocks": self.capacity_slots,
                "slot_nbytes": self.slot_nbytes, "codec": self.codec.name, "path": self.path, "backend": self.backend,
                "direct_io": self.direct_io}

    def close(self) -> None:
        try:
            self.commit(durable=True)
        except OSError as exc:
            # Closing is not an error (the tier manager counted the failed commits); say what it costs.
            log.warning("%s: closing with %d index records not committed (%s): those blocks are misses after a "
                        "restart.", self.path, self._index.pending, exc)
        finally:
            self._file.close()
            self._index.close()
            self._release_lock()
