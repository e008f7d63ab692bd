"""The tier manager: where each block lives, when it moves, and the two-phase life of every copy.

Policy decides order (``policy/``), tiers move bytes (``tiers/``); this module decides *which* block goes
*where* and keeps the bookkeeping consistent under concurrency. It never looks inside a block.

A block (``Entry``) may have one copy per tier. Each copy is in one state:

- ``writing``: bytes are being written into its slot; nobody may read or evict it.
- ``ready``: complete; readable; evictable when no reader has it pinned (``pins == 0``).
- ``evicting``: chosen by the policy; its bytes are being copied down a tier, after which its slot is handed
  directly to the block that needed the room. Readers wait for the copy below instead.

The manager lock guards all bookkeeping; byte movement (memcpy, disk I/O) runs outside it. Nobody ever
waits while holding a slot somebody else needs: eviction takes only unpinned ready copies and falls through
to the next tier when it cannot, so readers waiting for a ``writing`` copy always see it finish.

Writes into the disk tier are write-behind (``tierkv.writeback``): the bytes are staged in memory and the caller
moves on, so a put that pushes blocks out of a full memory tier does not wait for the SSD; the disk copy stays
``writing`` until its write lands. Device<->host copies run on per-thread CUDA copy streams
(``tierkv.transfer``), never the default stream.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ._memory import ALIGNMENT, ScratchBuffers, aligned_empty, copy_bytes
from .codec import Codec, NoneCodec, transcode
from .errors import BlockNotFound
from .faultlog import FailureLog
from .policy import make_policy
from .prefix_index import make_prefix_index
from .stats import LatencyHistogram, StoreStats, TierCounters, TierStats
from .tiers.base import CorruptBlock, Tier
from .tiers.memory import MemoryTier
from .transfer import CopyStreams
from .writeback import StagedBatch, WriteBehind

__all__ = ["TierManager", "Snapshot", "TierSnapshot"]

log = logging.getLogger("tierkv")

READY, WRITING, EVICTING = "ready", "writing", "evicting"
# Largest single read or write of consecutive disk slots: a few MiB is what NVMe needs to reach full speed
# (and at most IOV_MAX = 1024 buffers for one vectored write).
READ_RUN_NBYTES = WRITE_RUN_NBYTES = 4 << 20
_WRITE_RUN_MAX_BUFFERS = 1024
_WAIT_SLICE_S = 1.0  # readers re-check in-flight copies at least this often


class Copy:
    """One tier's copy of a block."""

    __slots__ = ("tier", "slot", "state", "pins", "detached")

    def __init__(self, tier: int, slot: int, state: str) -> None:
        self.tier = tier
        self.slot = slot
        self.state = state
        self.pins = 0           # readers copying out of this slot right now
        self.detached = False   # no longer the entry's copy; the slot is freed when the last pin goes


class Entry:
    """A block and its copies. ``alive`` turns False when it is deleted or lost; work in flight on a dead
    entry frees what it holds when it finishes."""

    __slots__ = ("key", "copies", "alive", "placing", "stamp", "uses", "parent", "children")

    def __init__(self, key: bytes, stamp: int) -> None:
        self.key = key
        self.uses = 1  # puts and get hits, for the disk tier's admission rule
        self.parent: bytes | None = None  # prefix-aware policies: the key put just before this one
        self.children: set[bytes] = set()
        self.stamp = stamp  # last use on the manager's logical clock: one recency order across all tiers
        self.copies: dict[int, Copy] = {}
        self.alive = True
        self.placing = False  # put() is still finding it a tier: readers wait, nobody drops it


@dataclass
class Move:
    """Bytes bound for a tier: either in hand (``data``, 1-D uint8, the block as ``data_codec`` stores it) or
    another tier's copy (``source``)."""

    entry: Entry
    data: torch.Tensor | None = None
    data_codec: Codec | None = None
    source: Copy | None = None
    dest: Copy | None = None
    ready: "torch.cuda.Event | None" = None  # CUDA ``data``: the caller's work that produces it


@dataclass(frozen=True)
class TierSnapshot:
    name: str
    capacity_slots: int
    free_slots: int
    used_slots: int


@dataclass(frozen=True)
class Snapshot:
    """Bookkeeping at one instant, for tests and debugging: ``copies`` maps key -> [(tier, slot, state)]."""

    tiers: list[TierSnapshot]
    copies: dict[bytes, list[tuple[str, int, str]]]


@dataclass
class _Totals:
    puts: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    dropped: int = 0
    deletes: int = 0
    orphaned: int = 0
    prefetched: int = 0


MAX_COPY_THREADS = 8            # host-memory copy threads per store: enough to approach DRAM bandwidth
HOST_RUN_NBYTES = 4 << 20       # longest host-memory run moved by one memcpy (several runs feed the threads)
COPY_SPLIT_NBYTES = 1 << 20     # ... each given at least this much of a batch, so a thread's start pays off


def _fan_out(runs: list[list[int]], failures: list[BaseException | None], errors: list[BaseException | None]
             ) -> None:
    """A run's task failed as a whole: that failure becomes each of its items' error (items that succeeded or
    failed alone inside the run keep what the task recorded)."""
    for run, failure in zip(runs, failures):
        if failure is not None:
            for i in run:
                errors[i] = failure


def _attempt(task: Callable[[], None]) -> BaseException | None:
    """Run one byte-moving task; its exception (reported per block by the caller, never swallowed) or None."""
    try:
        task()
        return None
    except Exception as exc:  # noqa: BLE001
        return exc


class TierManager:
    """Places blocks in an ordered list of tiers (top = fastest) and moves them between tiers.

    All public methods are thread-safe. ``data``/``out`` tensors are ``[n, block_nbytes]`` uint8 (raw blocks);
    each tier stores blocks as its codec says, and blocks are converted as they cross between codecs.
    """

    def __init__(self, tiers: Sequence[Tier], policy: str, io_threads: int, disk_admit_uses: int = 1,
                 writeback_bytes: int = 0) -> None:
        assert tiers, "a tier manager needs at least one tier"
        self.tiers = list(tiers)
        layout = self.tiers[0].codec.layout
        assert all(t.codec.layout == layout for t in self.tiers), "tiers disagree on the block layout"
        self._raw = NoneCodec(layout)  # what callers pass to put and get back from get
        self._scratch = ScratchBuffers()
        self._prefetch_scratch = ScratchBuffers()  # prefetch's rows; _scratch serves the reads that fill them
        gpu = next((t.device for t in self.tiers if t.device.type == "cuda"), torch.device("cpu"))
        self._streams = CopyStreams(gpu)
        # Write-behind for tiers behind I/O (the disk), at most writeback_bytes staged, never more than it holds.
        self._writeback = {t: WriteBehind(tier.slot_nbytes, min(writeback_bytes // tier.slot_nbytes,
                                                                tier.capacity_slots),
                                          name=f"tierkv-writeback-{tier.name}")
                           for t, tier in enumerate(self.tiers)
                           if not tier.addressable and writeback_bytes >= tier.slot_nbytes}
        self._policies = [make_policy(policy) for _ in self.tiers]
        # The keys of one put form a prefix chain (ARCHITECTURE.md); a prefix-aware policy wants it used.
        self._prefix_aware = bool(getattr(self._policies[0], "prefix_aware", False))
        self._counters = [TierCounters() for _ in self.tiers]
        self._totals = _Totals()
        self._admit_uses = disk_admit_uses
        # Uses of blocks the admission rule refused, so a prompt that comes back counts its earlier visits;
        # bounded, oldest forgotten first.
        self._ghosts: OrderedDict[bytes, int] = OrderedDict()
        total_slots = sum(t.capacity_slots for t in self.tiers)
        self._ghost_limit = max(4096, total_slots)
        # Fixed set of histograms, made once: recording needs no lookup lock (see StoreStats.latency for names).
        ops = ["lookup", "lookup_tokens", "put", "prefetch", "get.miss"] + [f"get.{t.name}" for t in self.tiers]
        ops += [f"demote.{t.name}" for t in self.tiers[1:]]
        ops += [f"writeback.{self.tiers[t].name}" for t in self._writeback]
        self._latency = {op: LatencyHistogram() for op in ops}
        self._entries: dict[bytes, Entry] = {}
        # The keys of _entries again, in the native prefix index: lookups walk it without taking the manager
        # lock (it has its own reader-writer lock), and lookup_tokens hashes a prompt inside it in one call.
        self._index = make_prefix_index(total_slots)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._failures = FailureLog(log)  # one line per kind of failure, then a summary at most once a minute
        self._clock = 0
        # Disk I/O of a batch runs on a pool. Host-memory copies of a large batch are spread over a few copy
        # threads, each one plain memcpy per block (see _run_copies); GPU copies are DMA and stay on one thread.
        needs_io = any(not t.addressable for t in self.tiers)
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="tierkv-io") if needs_io else None
        self._copy_threads = min(MAX_COPY_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else (os.cpu_count() or 1))
        self._copy_pool = (ThreadPoolExecutor(self._copy_threads - 1, thread_name_prefix="tierkv-copy")
                           if self._copy_threads > 1 else None)
        self._recover()

    def _recover(self) -> None:
        for t, tier in enumerate(self.tiers):
            for key, slot in tier.recover():  # least recently used first
                entry = self._entries.get(key)
                if entry is None:
                    entry = self._new_entry(key)
                entry.copies[t] = Copy(t, slot, READY)
                entry.uses = max(entry.uses, self._admit_uses)  # on disk already: it was admitted once
                self._policies[t].insert(key, entry.stamp)
            self._counters[t].open_faults = tier.open_faults  # recovery may have found some too
        self._commit()  # what recovery dropped from the index (counted like any commit when it fails)

    # -- public operations ----------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], data: torch.Tensor, ready: "torch.cuda.Event | None" = None) -> int:
        """Store blocks not already present; refresh the recency of those that are. Returns how many were new.
        ``ready``: for CUDA ``data``, an event marking the caller's work that produces it."""
        with self._latency["put"].timing():
            return self._put(keys, data, ready)

    def _put(self, keys: Sequence[bytes], data: torch.Tensor, ready: "torch.cuda.Event | None") -> int:
        moves: list[Move] = []
        rows: Sequence[int] = range(len(keys))
        if len(set(keys)) != len(keys):
            # A key named twice in one put: its first block is stored and the later ones are ignored, whatever
            # order the policy walks the batch in (the chain keeps each key at its first place, with no cycle).
            first: dict[bytes, int] = {}
            for i, key in enumerate(keys):
                first.setdefault(key, i)
            rows = sorted(first.values())
            keys = [keys[i] for i in rows]
        with self._lock:
            # Prefix-aware: the head of the chain is stamped last (most recent), so tails leave before heads.
            order = range(len(keys) - 1, -1, -1) if self._prefix_aware else range(len(keys))
            for i in order:
                key = keys[i]
                entry = self._entries.get(key)
                if entry is not None:
                    self._touch(entry)
                    continue
                entry = self._new_entry(key)
                entry.placing = True
                moves.append(Move(entry, data=data[rows[i]], data_codec=self._raw, ready=ready))
            self._totals.puts += len(moves)
            if self._prefix_aware:
                self._link_chain(keys, {id(m.entry) for m in moves})
        try:
            self._place_in_chunks(0, moves)
        finally:
            with self._lock:
                for move in moves:
                    move.entry.placing = False
                    self._drop_if_empty(move.entry)
                self._changed.notify_all()
            self._commit()
        return len(moves)

    def get(self, keys: Sequence[bytes], out: torch.Tensor, ready: "torch.cuda.Event | None" = None) -> None:
        """Copy every block of ``keys`` into ``out[i]`` and promote lower-tier hits to the top tier.

        ``ready``: for a CUDA ``out``, an event marking the caller's last use of it. Raises ``BlockNotFound``
        for the first key that is missing or whose bytes fail their checksum; ``out`` is then partly written.
        """
        if not keys:
            return
        start = time.perf_counter()
        origin = "miss"
        try:
            origin = self.tiers[self._serve(self._pin_for_read(keys), out, ready, request=True)].name
        finally:
            self._latency[f"get.{origin}"].record(time.perf_counter() - start)

    def prefetch(self, keys: Sequence[bytes]) -> int:
        """Promote the blocks of ``keys`` held below the top tier to it, as ``get`` would, without returning them
        or counting hits; missing keys are skipped. Returns how many of ``keys`` the top tier holds afterwards."""
        with self._latency["prefetch"].timing():
            pinned = self._pin_for_read(keys, missing_ok=True)
            with self._lock:
                # A prefetch announces a use: refresh recency now, so promoted blocks outrank what they displace
                # (without counting a use, which admission reserves for real requests).
                entries = [entry for entry, _ in pinned]
                for entry in reversed(entries) if self._prefix_aware else entries:
                    self._touch(entry, use=False)
                for _, copy in pinned:
                    if copy.tier == 0:
                        self._unpin(copy)
                before = self._in_top(keys)
            lower = [(entry, copy) for entry, copy in pinned if copy.tier > 0]
            if lower:
                nbytes = self._raw.nbytes
                rows = self._prefetch_scratch.get(len(lower) * nbytes).view(len(lower), nbytes)
                self._serve(lower, rows, None, request=False)
            with self._lock:
                after = self._in_top(keys)
                self._totals.prefetched += max(0, after - before)
            return after

    def _in_top(self, keys: Sequence[bytes]) -> int:
        """How many of ``keys`` have a ready copy in the top tier (caller holds the lock)."""
        count = 0
        for key in set(keys):
            entry = self._entries.get(key)
            copy = entry.copies.get(0) if entry is not None else None
            count += copy is not None and copy.state == READY
        return count

    def _serve(self, pinned: list[tuple[Entry, Copy]], out: torch.Tensor, ready: "torch.cuda.Event | None",
               request: bool) -> int:
        """Load pinned copies into the rows of ``out``, unpin them and promote lower-tier ones to the top tier;
        returns the lowest tier (largest index) any came from.

        ``request``: a get: count hits and misses, refresh recency, and raise ``BlockNotFound`` for the first
        copy that could not be read. Otherwise (prefetch) unreadable copies are only dropped and counted.
        """
        # Encoded disk copies that the top tier stores the same way are promoted as read, never re-quantized.
        top = self.tiers[0].codec
        stash: list[torch.Tensor | None] = [None] * len(pinned)
        keep = [i for i, (_, c) in enumerate(pinned)
                if self.tiers[c.tier].codec.lossy and self.tiers[c.tier].codec.name == top.name
                and not self.tiers[c.tier].addressable]
        if keep:
            slot_nbytes = max(self.tiers[pinned[i][1].tier].slot_nbytes for i in keep)
            rows = aligned_empty(len(keep) * slot_nbytes, pinned=True).view(len(keep), slot_nbytes)
            for row, i in zip(rows, keep):
                stash[i] = row
        errors = self._load_all(pinned, out, stash, ready)
        failed: list[tuple[Entry, str]] = []
        with self._lock:
            used: list[Entry] = []
            for (entry, copy), error in zip(pinned, errors):
                if error is None:
                    if request:
                        self._count_hit(copy.tier)
                    used.append(entry)
                else:
                    failed.append((entry, self._read_failed(entry, copy, error, request)))
                self._unpin(copy)
            if request:
                for entry in reversed(used) if self._prefix_aware else used:  # a prefix is at least as recent
                    self._touch(entry)
            self._changed.notify_all()
        self._raise_unexpected(errors)
        if failed and request:
            self._commit()
            entry, reason = failed[0]
            raise BlockNotFound(entry.key, reason)
        promotions = [Move(entry, data=out[i], data_codec=self._raw) if stash[i] is None
                      else Move(entry, data=stash[i], data_codec=self.tiers[copy.tier].codec)
                      for i, (entry, copy) in enumerate(pinned)
                      if copy.tier > 0 and entry.alive and errors[i] is None]
        if promotions:
            self._promote(promotions)
        self._commit()
        return max((copy.tier for _, copy in pinned), default=0)

    def lookup(self, keys: Sequence[bytes]) -> int:
        with self._latency["lookup"].timing():
            return self._index.longest_prefix(keys)

    def lookup_tokens(self, token_ids: Any, block_tokens: int, root: bytes) -> int:
        """Leading full blocks of ``token_ids`` present, hashing (chained from ``root``) and probing in one call."""
        with self._latency["lookup_tokens"].timing():
            return self._index.longest_prefix_tokens(token_ids, block_tokens, root)

    def contains(self, key: bytes) -> bool:
        return key in self._index

    def locate(self, keys: Sequence[bytes]) -> list[str | None]:
        """For each key, the tier a ``get`` would read it from: its fastest ready copy, or for a block still
        being written (a write-behind demotion), the tier it is going to; None when it is not stored."""
        with self._lock:
            found: list[str | None] = []
            for key in keys:
                entry = self._entries.get(key)
                copy = None if entry is None else self._best_ready(entry) or min(
                    entry.copies.values(), key=lambda c: c.tier, default=None)
                found.append(None if copy is None else self.tiers[copy.tier].name)
            return found

    def delete(self, keys: Sequence[bytes]) -> int:
        """Forget blocks in every tier (persistently). Missing keys are ignored. Returns how many were present."""
        removed = 0
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None:
                    continue
                removed += 1
                self._forget(entry)
            self._totals.deletes += removed
        self._commit()
        return removed

    def flush(self) -> None:
        """Copy every resident block that has no copy in the persistent tier there, then sync that tier.

        Flushing only copies: to make room it evicts disk copies of blocks that also live in memory, never a
        block's last copy nor one it has just written, so it never changes what ``get`` can return. Blocks that
        do not fit stay in memory only.
        """
        persistent = [t for t, tier in enumerate(self.tiers) if tier.persistent]
        if persistent:
            target = persistent[0]
            moves: list[Move] = []
            with self._lock:
                for entry in self._entries.values():
                    if target in entry.copies:
                        continue
                    source = self._best_ready(entry, only_addressable=True)
                    if source is not None:
                        source.pins += 1
                        moves.append(Move(entry, source=source))
            flushing = {move.entry.key for move in moves}

            def spare(key: bytes) -> bool:
                return key in flushing or len(self._entries[key].copies) == 1

            try:
                self._place(target, moves, spare=spare)
            finally:
                with self._lock:
                    for move in moves:
                        self._unpin(move.source)
                    self._changed.notify_all()
        self.drain()  # what this flush and earlier demotions staged, written before the durable commit
        self._commit(durable=True)

    def drain(self) -> None:
        """Wait until every write-behind batch begun before this call has reached its tier (or failed, counted)."""
        for behind in self._writeback.values():
            behind.drain()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            try:
                for behind in self._writeback.values():
                    behind.close()
            finally:
                if self._pool is not None:
                    self._pool.shutdown(wait=True)
                if self._copy_pool is not None:
                    self._copy_pool.shutdown(wait=True)
                for tier in self.tiers:
                    tier.close()

    # -- introspection --------------------------------------------------------------------------------------
    def stats(self) -> StoreStats:
        with self._lock:
            tiers = {}
            for tier, c in zip(self.tiers, self._counters):
                used = tier.capacity_slots - tier.free_slots
                tiers[tier.name] = TierStats(
                    name=tier.name, hits=c.hits, misses=c.misses, evictions=c.evictions, promotions=c.promotions,
                    bytes_read=c.bytes_read, bytes_written=c.bytes_written, corrupt=c.corrupt,
                    failed_writes=c.failed_writes, failed_reads=c.failed_reads,
                    not_admitted=c.not_admitted, failed_commits=c.failed_commits, open_faults=c.open_faults,
                    used_blocks=used, capacity_blocks=tier.capacity_slots,
                    used_bytes=used * tier.slot_nbytes, capacity_bytes=tier.capacity_slots * tier.slot_nbytes)
            t = self._totals
            return StoreStats(tiers=tiers, puts=t.puts, gets=t.gets, hits=t.hits, misses=t.misses,
                              dropped=t.dropped, deletes=t.deletes, orphaned=t.orphaned, blocks=len(self._entries),
                              prefetched=t.prefetched,
                              pending_writes=sum(b.pending for b in self._writeback.values()),
                              latency={op: h.snapshot() for op, h in self._latency.items()})

    def snapshot(self) -> Snapshot:
        with self._lock:
            tiers = [TierSnapshot(t.name, t.capacity_slots, t.free_slots, t.capacity_slots - t.free_slots)
                     for t in self.tiers]
            copies = {key: [(self.tiers[c.tier].name, c.slot, c.state) for c in entry.copies.values()]
                      for key, entry in self._entries.items()}
            return Snapshot(tiers, copies)

    def read_copy(self, key: bytes, tier_name: str) -> torch.Tensor:
        """The stored bytes of ``key``'s copy in one tier, once it is complete (tests and debugging)."""
        with self._lock:
            t = next(i for i, tier in enumerate(self.tiers) if tier.name == tier_name)
            while (copy := self._entries[key].copies[t]).state == WRITING:
                self._changed.wait(_WAIT_SLICE_S)
            copy.pins += 1
        try:
            out = torch.empty(self.tiers[t].payload_nbytes, dtype=torch.uint8)
            with self._streams.copying(to_device=False):
                self.tiers[t].read(copy.slot, out)
            return out
        finally:
            with self._lock:
                self._unpin(copy)

    # -- reading --------------------------------------------------------------------------------------------
    def _pin_for_read(self, keys: Sequence[bytes], missing_ok: bool = False) -> list[tuple[Entry, Copy]]:
        """Pin the fastest ready copy of every key, waiting for copies in flight. Raises BlockNotFound (counted
        as a get's miss) unless ``missing_ok``, which skips missing keys and counts nothing."""
        pinned: list[tuple[Entry, Copy]] = []
        with self._lock:
            if not missing_ok:
                self._totals.gets += len(keys)
            try:
                for key in keys:
                    while True:
                        entry = self._entries.get(key)
                        if entry is None and missing_ok:
                            break
                        if entry is None:
                            self._count_miss()
                            raise BlockNotFound(key)
                        copy = self._best_ready(entry)
                        if copy is not None:
                            copy.pins += 1
                            pinned.append((entry, copy))
                            break
                        assert entry.copies or entry.placing, f"live block {key.hex()} has no copy"
                        # Being written or moved down a tier: it becomes readable when that finishes.
                        self._changed.wait(_WAIT_SLICE_S)
            except BaseException:
                for _, copy in pinned:
                    self._unpin(copy)
                raise
        return pinned

    def _load_all(self, pinned: list[tuple[Entry, Copy]], out: torch.Tensor, stash: list[torch.Tensor | None],
                  ready: "torch.cuda.Event | None" = None) -> list[BaseException | None]:
        """Load every pinned copy into its row of ``out`` (see _load); per copy, None or why it failed.

        Copies in consecutive slots of a disk tier, asked for in order (a prompt put in one batch), are read
        in one request of up to READ_RUN_NBYTES each."""
        runs: list[list[int]] = []
        host_out = out.device.type == "cpu" and out.is_contiguous()
        for i, (_, copy) in enumerate(pinned):
            tier = self.tiers[copy.tier]
            if (runs and host_out and isinstance(tier, MemoryTier) and tier.device.type == "cpu"
                    and not tier.codec.lossy and tier.packed and stash[i] is None
                    and (len(runs[-1]) + 1) * tier.slot_nbytes <= HOST_RUN_NBYTES):
                # A host-memory run: consecutive slots into consecutive rows, one memcpy (see _host_runs).
                j = runs[-1][-1]
                last = pinned[j][1]
                if last.tier == copy.tier and copy.slot == last.slot + 1 and i == j + 1 and stash[j] is None:
                    runs[-1].append(i)
                    continue
            if runs and not tier.addressable and (len(runs[-1]) + 1) * tier.slot_nbytes <= READ_RUN_NBYTES:
                run = runs[-1]
                last = pinned[run[-1]][1]
                # Slots ascending or descending with the keys (a batch is placed most recent first).
                step = copy.slot - last.slot
                if (last.tier == copy.tier and step in (1, -1)
                        and (len(run) == 1 or last.slot - pinned[run[-2]][1].slot == step)):
                    run.append(i)
                    continue
            runs.append([i])
        errors: list[BaseException | None] = [None] * len(pinned)

        def load_run(run: list[int]) -> None:
            if len(run) == 1:
                self._load(pinned[run[0]][1], out[run[0]], stash[run[0]])
                return
            tier = self.tiers[pinned[run[0]][1].tier]
            if tier.addressable:  # a host-memory run
                copy_bytes(out[run[0]:run[-1] + 1].reshape(-1), tier.rows(pinned[run[0]][1].slot, len(run)))
                return
            for i, error in zip(run, self._load_run([pinned[i][1] for i in run], out, run, stash)):
                errors[i] = error

        tasks = [(lambda run=run: load_run(run)) for run in runs]
        disk = any(not self.tiers[c.tier].addressable for _, c in pinned)
        if not disk and self._on_host(out.device, [self.tiers[c.tier].device for _, c in pinned]):
            failures = self._run_copies(tasks, len(pinned) * out.shape[1] // max(1, len(runs)))
        else:
            failures = self._run(tasks, parallel=disk, to_device=out.device.type == "cuda", after=[ready])
        _fan_out(runs, failures, errors)
        return errors

    def _load_run(self, copies: list[Copy], out: torch.Tensor, rows: list[int],
                  stash: list[torch.Tensor | None]) -> list[BaseException | None]:
        """Consecutive slots of one disk tier, read in one request into a scratch buffer, then decoded (or
        copied) into their rows of ``out``."""
        tier = self.tiers[copies[0].tier]
        first = min(c.slot for c in copies)
        direct = self._direct_run(tier, copies, out, rows)
        buf = direct if direct is not None else self._scratch.get(len(copies) * tier.slot_nbytes)
        by_slot = tier.read_run(first, len(copies), buf)
        results = [by_slot[c.slot - first] for c in copies]
        for j, (row, result) in enumerate(zip(rows, results)):
            if result is not None:
                continue
            at = (copies[j].slot - first) * tier.slot_nbytes
            stored = buf[at:at + tier.payload_nbytes]
            try:
                if stash[row] is not None:
                    copy_bytes(stash[row][:tier.payload_nbytes], stored)
                if direct is None:
                    transcode(stored, tier.codec, out[row], self._raw)
            except Exception as exc:  # noqa: BLE001 - reported for this block alone, like any read failure
                results[j] = exc
        return results

    @staticmethod
    def _direct_run(tier: Tier, copies: list[Copy], out: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
        """The rows of ``out`` a run can be read straight into, skipping the scratch buffer and its copy (about
        a fifth of a cold read's time on one I/O thread): raw blocks that fill their slots exactly, slots
        ascending with consecutive rows, into page-aligned host memory. None when any of that does not hold."""
        n = len(copies)
        if (tier.codec.lossy or tier.slot_nbytes != out.shape[1] or out.device.type != "cpu"
                or not out.is_contiguous() or rows != list(range(rows[0], rows[0] + n))
                or any(copies[j].slot != copies[0].slot + j for j in range(n))):
            return None
        run = out[rows[0]:rows[0] + n].reshape(-1)
        return run if run.data_ptr() % ALIGNMENT == 0 else None

    def _load(self, copy: Copy, out: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Copy a pinned copy into ``out`` as a raw block, decoding on the way; ``keep`` (when given, at least
        a slot long) receives the stored bytes for a promotion that stores them the same way."""
        tier = self.tiers[copy.tier]
        if not tier.codec.lossy:
            tier.read(copy.slot, out)
        elif tier.addressable:
            transcode(tier.view(copy.slot), tier.codec, out, self._raw)
        else:
            buf = keep if keep is not None else self._scratch.get(tier.slot_nbytes)
            tier.read(copy.slot, buf)
            transcode(buf[:tier.payload_nbytes], tier.codec, out, self._raw)

    def _read_failed(self, entry: Entry, copy: Copy, error: BaseException, request: bool = True) -> str:
        """Drop a copy that could not be read back (never return its bytes), counted as a miss of the get
        (``request``) that asked for it; returns the reason."""
        tier = self.tiers[copy.tier]
        counters = self._counters[copy.tier]
        if isinstance(error, CorruptBlock):
            counters.corrupt += 1
            reason = f"its {tier.name} copy failed its checksum and was dropped"
            self._failures.report((tier.name, "corrupt"), (
                f"{_where(tier)}: block {entry.key.hex()} failed its checksum ({error}); dropped and reported as a "
                "miss, never returned. Repeated corruption points at failing storage: check the device."))
        else:
            counters.failed_reads += 1
            reason = f"reading its {tier.name} copy failed ({error}); the copy was dropped"
            kind, advice = _advice(error)
            self._failures.report((tier.name, "read", kind), (
                f"{_where(tier)}: reading block {entry.key.hex()} failed ({error}); the copy was dropped and the "
                f"block reported as a miss. {advice}"))
        if request:
            self._count_miss()
        if entry.copies.get(copy.tier) is copy:
            self._detach(entry, copy, free_slot=True)
        self._drop_if_empty(entry, evicted=False)  # a lost block, not one pushed out for room
        return reason

    def _promote(self, moves: list[Move]) -> None:
        """Copy lower-tier hits into the top tier. Memory tiers then give up their copy (each block costs one
        memory slot); persistent tiers keep theirs, so a later demotion needs no rewrite."""
        with self._lock:
            moves = [m for m in moves if m.entry.alive and 0 not in m.entry.copies]
        self._place_in_chunks(0, moves)
        with self._lock:
            for move in moves:
                entry = move.entry
                top = entry.copies.get(0)
                if top is None or top.state != READY or not entry.alive:
                    continue
                self._counters[0].promotions += 1
                for t, copy in list(entry.copies.items()):
                    if t > 0 and copy.state == READY and not self.tiers[t].persistent:
                        self._detach(entry, copy, free_slot=True)
            self._changed.notify_all()

    # -- placing --------------------------------------------------------------------------------------------
    def _place_in_chunks(self, t: int, moves: list[Move]) -> None:
        # A batch larger than the tier would otherwise push its own blocks straight past it; in chunks the
        # size of the tier, later (more recent) blocks push out earlier ones, as their recency says.
        chunk = max(1, self.tiers[t].capacity_slots)
        for start in range(0, len(moves), chunk):
            self._place(t, moves[start:start + chunk])

    def _place(self, t: int, moves: list[Move], spare: Callable[[bytes], bool] | None = None,
               demoted: bool = False) -> None:
        """Give each move a ready copy in tier ``t`` or, when it has no room, a lower tier (or nothing).

        Called without the lock. Room is made by demoting the policy's victims one tier down first; their slots
        pass straight to the moves that needed them. Keys for which ``spare`` is true are not evicted (from ``t``
        or the tiers below). ``demoted``: the moves are blocks pushed out of a tier above, which a tier with
        write-behind writes in the background; a put's own blocks and a flush's copies are written before this
        returns (the caller waits for them anyway, and they go to disk straight from their own memory).
        """
        if not moves or t == len(self.tiers):
            return
        tier = self.tiers[t]
        writes: list[Move] = []
        handovers: list[tuple[Entry, Copy]] = []
        with self._lock:
            # One move per block (a get may name a key twice); blocks gone or already here need nothing.
            unique = {id(m.entry): m for m in reversed(moves)}
            candidates = [m for m in unique.values() if m.entry.alive and t not in m.entry.copies]
            if tier.persistent and spare is None and self._admit_uses > 1:
                # Admission: blocks used fewer times than the rule asks fall off here instead of wearing the SSD
                # (flush passes ``spare`` and writes everything it was asked to).
                refused = [m for m in candidates if m.entry.uses < self._admit_uses]
                if refused:
                    self._counters[t].not_admitted += len(refused)
                    for move in refused:
                        self._ghosts[move.entry.key] = move.entry.uses
                        self._ghosts.move_to_end(move.entry.key)
                    while len(self._ghosts) > self._ghost_limit:
                        self._ghosts.popitem(last=False)
                    candidates = [m for m in candidates if m.entry.uses >= self._admit_uses]
            candidates.sort(key=lambda m: m.entry.stamp, reverse=True)  # the most recent get room first
            overflow = self._claim_slots(t, candidates, writes, handovers, spare)
        behind = self._writeback.get(t)
        if overflow and behind is not None and behind.pending:
            # Copies still on their way to this tier can be neither read nor evicted yet; a tier full of them
            # would push out the newcomers instead. Let them land (the one case where a caller waits for the
            # disk: it has fallen a whole tier behind), then choose again.
            behind.drain()
            with self._lock:
                overflow = [m for m in overflow if m.entry.alive and t not in m.entry.copies]
                overflow = self._claim_slots(t, overflow, writes, handovers, spare)
        try:
            try:
                if handovers and t + 1 < len(self.tiers):  # victims' bytes leave their slots before new ones land
                    with self._latency[f"demote.{self.tiers[t + 1].name}"].timing():
                        self._place(t + 1, [Move(victim, source=copy) for victim, copy in handovers], spare,
                                    demoted=True)
            finally:
                if handovers:
                    with self._lock:
                        for victim, copy in handovers:
                            self._detach(victim, copy, free_slot=False)  # the slot now belongs to a writing copy
                            self._counters[t].evictions += 1
                            self._drop_if_empty(victim)
                        self._changed.notify_all()
            self._place(t + 1, overflow, spare, demoted)
        finally:
            self._write(t, writes, demoted)  # even after a failure below, no copy may stay "writing" forever

    def _claim_slots(self, t: int, candidates: list[Move], writes: list[Move],
                     handovers: list[tuple[Entry, Copy]], spare: Callable[[bytes], bool] | None) -> list[Move]:
        """Give ``candidates`` (most recent first) ``writing`` copies in tier ``t``: free slots first, then the
        slots of policy victims (marked ``evicting``, appended to ``handovers``). Claimed moves are appended to
        ``writes``; returns the rest (caller holds the lock)."""
        tier = self.tiers[t]
        free = min(tier.free_slots, len(candidates))
        slots = [tier.allocate() for _ in range(free)]
        assert None not in slots, f"{tier.name} tier reported a free slot it did not have"
        # Which blocks get room is the policy's choice; which free slot each gets is not: slots follow the
        # blocks' order in memory, so a batch lands in runs that one memcpy or one pwritev moves (and a prompt
        # read back in order is read in runs too).
        for slot, move in zip(sorted(slots), sorted(candidates[:free], key=lambda m: self._source(m)[0].data_ptr())):
            move.dest = move.entry.copies[t] = Copy(t, slot, WRITING)
        writes += candidates[:free]
        overflow = candidates[free:]
        while overflow:
            # Displace a block only when it is worth less than the one that needs the room; a block
            # coming down that is older than everything here falls further instead.
            victim = self._choose_victim(t, overflow[0].entry.stamp, spare)
            if victim is None:
                break
            move = overflow.pop(0)
            entry, copy = victim
            copy.state = EVICTING
            handovers.append(victim)
            move.dest = move.entry.copies[t] = Copy(t, copy.slot, WRITING)
            writes.append(move)
        return overflow

    def _write(self, t: int, writes: list[Move], demoted: bool = False) -> None:
        """Fill the ``writing`` copies of ``writes`` in tier ``t``: each becomes ready, or is dropped and counted
        when its write fails. Blocks ``demoted`` into a tier with write-behind are only staged here (their
        sources may be handed on as soon as this returns) and written in the background."""
        if not writes:
            return
        behind = self._writeback.get(t) if demoted else None
        if behind is not None:
            # Jobs of a quarter of the arena: the next one is staged while the disk writes the last.
            job = max(1, behind.capacity_slots // 4)
            for start in range(0, len(writes), job):
                self._write_behind(t, writes[start:start + job], behind)
            return
        tier = self.tiers[t]
        sources = [self._source(move) for move in writes]
        errors: list[BaseException | None] = [None] * len(writes)
        if tier.addressable and self._on_host(tier.device, [src for src, _ in sources]):
            order = sorted(range(len(writes)), key=lambda i: writes[i].dest.slot)
            runs = self._host_runs(tier, [sources[i] for i in order], [writes[i].dest.slot for i in order])
            runs = [[order[k] for k in run] for run in runs]  # back to indices of writes
            _fan_out(runs, self._run_copies([lambda run=run: self._store_run(tier, writes, run) for run in runs],
                                            len(writes) * tier.slot_nbytes // len(runs)), errors)
        elif not tier.addressable and all(self._slot_sized(tier, *source) for source in sources):
            # Raw blocks that already fill aligned slots (a put from page-aligned host memory, a flush from a
            # host tier): written straight from where they are, consecutive slots in one pwritev.
            self._write_runs(tier, writes, [src for src, _ in sources], errors)
        else:
            errors = self._run([lambda move=move, source=source: self._store(tier, move.dest.slot, *source)
                                for move, source in zip(writes, sources)],
                               parallel=not tier.addressable, to_device=tier.device.type == "cuda",
                               after=[move.ready for move in writes])
        self._finish_writes(t, writes, errors)

    @staticmethod
    def _slot_sized(tier: Tier, src: torch.Tensor, codec: Codec) -> bool:
        """Whether ``src`` can be written to ``tier`` as it is: the tier's codec, host memory, a whole aligned slot."""
        return (codec.name == tier.codec.name and src.device.type == "cpu" and src.is_contiguous()
                and src.numel() * src.element_size() >= tier.slot_nbytes and src.data_ptr() % ALIGNMENT == 0)

    @staticmethod
    def _host_runs(tier: Tier, sources: list[tuple[torch.Tensor, Codec]], slots: list[int]) -> list[list[int]]:
        """Group a batch of host copies into runs of up to HOST_RUN_NBYTES that one memcpy can move: raw bytes of
        the tier's own codec, adjacent in the source (consecutive rows of one tensor, or consecutive slots of a
        tier) and bound for consecutive slots. Per-block bookkeeping then stops dominating small blocks (a 256 KiB
        block copies in ~25 us, about what the Python around one copy costs)."""
        payload = tier.payload_nbytes
        contiguous_tier = isinstance(tier, MemoryTier) and tier.packed
        runs: list[list[int]] = []
        for i, (src, codec) in enumerate(sources):
            if runs and contiguous_tier and (len(runs[-1]) + 1) * payload <= HOST_RUN_NBYTES:
                j = runs[-1][-1]
                prev = sources[j][0]
                if (codec.name == tier.codec.name and sources[j][1].name == codec.name and slots[i] == slots[j] + 1
                        and src.is_contiguous() and prev.is_contiguous()
                        and src.untyped_storage().data_ptr() == prev.untyped_storage().data_ptr()
                        and src.data_ptr() == prev.data_ptr() + payload):
                    runs[-1].append(i)
                    continue
            runs.append([i])
        return runs

    def _store_run(self, tier: Tier, writes: list[Move], run: list[int]) -> None:
        """Write a run from _host_runs: one copy for the whole run, or the block alone."""
        first = writes[run[0]]
        src, codec = self._source(first)
        if len(run) == 1:
            self._store(tier, first.dest.slot, src, codec)
            return
        nbytes = len(run) * tier.payload_nbytes
        whole = torch.empty(0, dtype=torch.uint8).set_(src.untyped_storage(), src.storage_offset(), (nbytes,))
        copy_bytes(tier.rows(first.dest.slot, len(run)), whole)

    def _source(self, move: Move) -> tuple[torch.Tensor, Codec]:
        """The bytes a move carries and how they are encoded."""
        if move.data is not None:
            return move.data, move.data_codec
        tier = self.tiers[move.source.tier]
        return tier.view(move.source.slot), tier.codec

    def _write_behind(self, t: int, writes: list[Move], behind: WriteBehind) -> None:
        """Stage ``writes`` (encoded as tier ``t`` stores them) in write-behind buffers and queue their I/O."""
        tier = self.tiers[t]
        batch = behind.begin(len(writes))  # waits while the disk is writeback_bytes behind
        interrupted = OSError(errno.ECANCELED, "staging for write-behind was interrupted")
        staged: list[BaseException | None] = [interrupted] * len(writes)
        try:
            tasks = [lambda move=move, buf=buf: transcode(*self._source(move), buf[:tier.payload_nbytes], tier.codec)
                     for move, buf in zip(writes, batch.bufs)]
            if self._on_host(torch.device("cpu"), [self._source(move)[0] for move in writes]):
                staged = self._run_copies(tasks, tier.slot_nbytes)
            else:
                staged = self._run(tasks, parallel=False, to_device=False, after=[move.ready for move in writes])
        finally:
            behind.submit(batch, lambda: self._write_staged(t, writes, batch, staged))

    def _write_staged(self, t: int, writes: list[Move], batch: StagedBatch,
                      staged: list[BaseException | None]) -> None:
        """Write-behind job: staged blocks into their slots, consecutive slots in one request each."""
        tier = self.tiers[t]
        errors = list(staged)
        with self._latency[f"writeback.{tier.name}"].timing():
            self._write_runs(tier, writes, batch.bufs, errors)
            self._finish_writes(t, writes, errors)
        self._commit()

    def _write_runs(self, tier: Tier, writes: list[Move], bufs: list[torch.Tensor],
                    errors: list[BaseException | None]) -> None:
        """Write ``bufs`` (whole, aligned slots) into the disk slots of ``writes`` whose ``errors`` entry is None,
        consecutive slots in one request each, on the I/O pool; fills in ``errors``."""
        runs: list[list[int]] = []
        for i in sorted((i for i, e in enumerate(errors) if e is None), key=lambda i: writes[i].dest.slot):
            run = runs[-1] if runs else None
            if (run is not None and writes[run[-1]].dest.slot + 1 == writes[i].dest.slot
                    and (len(run) + 1) * tier.slot_nbytes <= WRITE_RUN_NBYTES
                    and len(run) < _WRITE_RUN_MAX_BUFFERS):
                run.append(i)
            else:
                runs.append([i])

        def write_run(run: list[int]) -> None:
            results = tier.write_run(writes[run[0]].dest.slot, [bufs[i] for i in run])
            for i, result in zip(run, results):
                errors[i] = result

        _fan_out(runs, self._run([lambda run=run: write_run(run) for run in runs], parallel=True), errors)

    def _finish_writes(self, t: int, writes: list[Move], errors: list[BaseException | None]) -> None:
        """Bookkeeping once the bytes of ``writes`` have landed in tier ``t`` (or failed to)."""
        tier = self.tiers[t]
        with self._lock:
            for move, error in zip(writes, errors):
                entry, copy = move.entry, move.dest
                if error is None:
                    copy.state = READY
                    self._counters[t].bytes_written += tier.payload_nbytes
                    if move.source is not None:
                        self._counters[move.source.tier].bytes_read += self.tiers[move.source.tier].payload_nbytes
                    if entry.alive:
                        tier.bind(entry.key, copy.slot)
                        self._policies[t].insert(entry.key, entry.stamp)
                    else:
                        self._detach(entry, copy, free_slot=True)
                else:
                    self._counters[t].failed_writes += 1
                    kind, advice = _advice(error)
                    self._failures.report((tier.name, "write", kind), (
                        f"{_where(tier)}: writing block {entry.key.hex()} failed ({error}). {advice} The block "
                        "stays in the tiers above where it still has a copy; otherwise it is a miss."))
                    self._detach(entry, copy, free_slot=True)
                    # A write-behind copy may have been the block's last one: its source left when it was staged.
                    self._drop_if_empty(entry)
            self._changed.notify_all()
        self._raise_unexpected(errors)

    def _store(self, tier: Tier, slot: int, src: torch.Tensor, codec: Codec) -> None:
        """Write one block held as ``codec`` into ``tier``'s ``slot``, converting it to the tier's codec."""
        if codec.name == tier.codec.name:
            tier.write(slot, src)
        elif tier.addressable:
            transcode(src, codec, tier.view(slot), tier.codec)
        else:
            buf = self._scratch.get(tier.slot_nbytes)  # a whole slot: the disk tier writes it without staging
            transcode(src, codec, buf[:tier.payload_nbytes], tier.codec)
            tier.write(slot, buf)

    def _choose_victim(self, t: int, newer_than: int, spare: Callable[[bytes], bool] | None
                       ) -> tuple[Entry, Copy] | None:
        """The least valuable unpinned ready copy in tier ``t`` worth less than a block last used at
        ``newer_than``, now marked for eviction by the policy; None when there is none (caller holds the lock)."""
        def protected(key: bytes) -> bool:
            return self._entries[key].copies[t].pins > 0 or (spare is not None and spare(key))

        keys = self._policies[t].evict(1, protected, newer_than)
        if not keys and t > 0:
            # Every block here is worth more than the newcomer, but a copy that duplicates a ready copy higher
            # up costs nothing to drop: the block stays cached, and the tier holds one more distinct block.
            def needed(key: bytes) -> bool:
                return protected(key) or self._best_ready(self._entries[key]).tier == t

            keys = self._policies[t].evict(1, needed)
        if not keys:
            return None
        entry = self._entries[keys[0]]
        copy = entry.copies[t]
        assert copy.state == READY and copy.pins == 0, f"policy chose {entry.key.hex()} in state {copy.state}"
        return entry, copy

    # -- bookkeeping helpers (caller holds the lock) ----------------------------------------------------------
    def _best_ready(self, entry: Entry, only_addressable: bool = False) -> Copy | None:
        for t in sorted(entry.copies):
            copy = entry.copies[t]
            if copy.state == READY and (not only_addressable or self.tiers[t].addressable):
                return copy
        return None

    def _new_entry(self, key: bytes) -> Entry:
        entry = self._entries[key] = Entry(key, self._tick())
        entry.uses += self._ghosts.pop(key, 0)
        self._index.set(key, 1)
        return entry

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _touch(self, entry: Entry, use: bool = True) -> None:
        """Make ``entry`` the most recent block; ``use`` counts a use for the admission rule."""
        entry.uses += use
        entry.stamp = self._tick()
        for t, copy in entry.copies.items():
            if copy.state == READY:
                self._policies[t].touch(entry.key, entry.stamp)

    def _detach(self, entry: Entry, copy: Copy, free_slot: bool) -> None:
        """Make ``copy`` no longer the entry's copy in its tier; free its slot now or at the last unpin."""
        if entry.copies.get(copy.tier) is copy:
            del entry.copies[copy.tier]
        if self._entries.get(entry.key) is entry:
            self._policies[copy.tier].remove(entry.key)
        self.tiers[copy.tier].unbind(entry.key, copy.slot)
        copy.detached = True
        if free_slot and copy.pins == 0:
            self.tiers[copy.tier].free(copy.slot)

    def _unpin(self, copy: Copy) -> None:
        copy.pins -= 1
        assert copy.pins >= 0, "copy unpinned more often than pinned"
        if copy.detached and copy.pins == 0:
            self.tiers[copy.tier].free(copy.slot)

    def _drop_if_empty(self, entry: Entry, evicted: bool = True) -> None:
        """A live block with no copy left is gone; ``evicted`` ones (fell off the last tier, or found no room
        anywhere) count in ``dropped``."""
        if entry.alive and not entry.copies and not entry.placing:
            entry.alive = False
            if self._entries.get(entry.key) is entry:
                self._remove_entry(entry)
            if evicted:
                self._totals.dropped += 1
                if self._prefix_aware:
                    self._free_descendants(entry)

    def _link_chain(self, keys: Sequence[bytes], new: set[int]) -> None:
        """Record that each newly stored key of a put follows the key before it."""
        for parent_key, key in zip(keys, keys[1:]):
            entry, parent = self._entries.get(key), self._entries.get(parent_key)
            if entry is not None and parent is not None and id(entry) in new and parent is not entry:
                entry.parent = parent_key
                parent.children.add(key)

    def _free_descendants(self, root: Entry) -> None:
        """``root`` fell off the last tier: no prefix lookup can reach what was stored after it any more, so
        those blocks are freed too (counted in ``orphaned``)."""
        pending, seen = list(root.children), {root.key}
        while pending:
            key = pending.pop()
            entry = self._entries.get(key)
            if entry is None or entry.parent not in seen or key in seen:
                continue  # gone already, or re-stored under another prefix since
            seen.add(key)
            pending.extend(entry.children)
            self._forget(entry)
            self._totals.orphaned += 1

    def _forget(self, entry: Entry) -> None:
        """Remove a block from the store, every tier included (delete, orphans); in-flight copies are finished
        by the thread moving them, which sees ``alive`` False."""
        self._remove_entry(entry)
        entry.alive = False
        for copy in list(entry.copies.values()):
            if copy.state == READY:
                self._policies[copy.tier].remove(entry.key)
                self._detach(entry, copy, free_slot=True)

    def _remove_entry(self, entry: Entry) -> None:
        """Take ``entry`` out of the bookkeeping: the key map, the prefix index and its parent's children (a
        long-lived prefix, such as a system prompt, would otherwise collect the keys of every block ever
        stored after it)."""
        del self._entries[entry.key]
        self._index.discard(entry.key)
        parent = self._entries.get(entry.parent) if entry.parent is not None else None
        if parent is not None:
            parent.children.discard(entry.key)

    def _count_hit(self, t: int) -> None:
        self._totals.hits += 1
        self._counters[t].hits += 1
        self._counters[t].bytes_read += self.tiers[t].payload_nbytes
        for above in self._counters[:t]:
            above.misses += 1

    def _count_miss(self) -> None:
        self._totals.misses += 1
        for counters in self._counters:
            counters.misses += 1

    # -- execution ------------------------------------------------------------------------------------------
    def _run_copies(self, tasks: list[Callable[[], None]], task_nbytes: int) -> list[BaseException | None]:
        """Host-to-host copies of a batch; returns each one's exception or None.

        One memcpy runs on one core (see tierkv._memory.copy_bytes), which is far below what DRAM delivers, so a
        batch of at least COPY_SPLIT_NBYTES per thread is split over up to MAX_COPY_THREADS threads (the caller
        runs one share). Unlike torch's intra-op copy, the threads never wait for each other mid-copy, so busy
        cores slow a batch down instead of stalling it."""
        k = min(len(tasks), self._copy_threads, max(1, len(tasks) * task_nbytes // COPY_SPLIT_NBYTES))
        if k <= 1 or self._copy_pool is None:
            return [_attempt(task) for task in tasks]
        groups = [tasks[i::k] for i in range(k)]
        futures = [self._copy_pool.submit(lambda g=g: [_attempt(task) for task in g]) for g in groups[1:]]
        results: list[BaseException | None] = [None] * len(tasks)
        results[0::k] = [_attempt(task) for task in groups[0]]
        for i, future in enumerate(futures, 1):
            results[i::k] = future.result()
        return results

    @staticmethod
    def _on_host(dest: torch.device, sources: Sequence["torch.Tensor | torch.device"]) -> bool:
        """Whether a batch copies host memory to host memory (what _run_copies spreads over threads)."""
        return dest.type == "cpu" and all((s if isinstance(s, torch.device) else s.device).type == "cpu"
                                          for s in sources)

    def _run(self, tasks: list[Callable[[], None]], parallel: bool, to_device: bool = False,
             after: Sequence["torch.cuda.Event | None"] = ()) -> list[BaseException | None]:
        """Run byte-moving tasks (on the I/O pool when ``parallel``); returns each one's exception or None.

        On CUDA the copies run on the running thread's copy stream toward (``to_device``) or away from the
        device, after the events in ``after``, and have completed when this returns (see tierkv.transfer).
        """
        if parallel and self._pool is not None and len(tasks) > 1:
            def on_stream(task: Callable[[], None]) -> BaseException | None:
                with self._streams.copying(to_device, after):
                    return _attempt(task)

            return list(self._pool.map(on_stream, tasks))
        with self._streams.copying(to_device, after):  # one wait for the whole batch
            return [_attempt(task) for task in tasks]

    @staticmethod
    def _raise_unexpected(errors: list[BaseException | None]) -> None:
        """I/O errors and corruption are misses; anything else is a bug, raised once bookkeeping is consistent."""
        for error in errors:
            if error is not None and not isinstance(error, (OSError, CorruptBlock)):
                raise error

    def _commit(self, durable: bool = False) -> None:
        """Commit every tier's index. A commit that fails (index map full, I/O error, failed fsync) is counted
        and logged, never raised: the blocks stay readable in this process and the tier retries the records at
        its next commit; only a restart before one succeeds misses them."""
        for t, tier in enumerate(self.tiers):
            try:
                tier.commit(durable)
            except OSError as error:
                with self._lock:
                    self._counters[t].failed_commits += 1
                kind, advice = _advice(error)
                self._failures.report((tier.name, "commit", kind), (
                    f"{_where(tier)}: committing the index failed ({error}). {advice} Blocks stay readable in this "
                    "process and their records are retried at the next commit; until one succeeds a restart does "
                    "not find them. If this persists with space free, the index is damaged: close the store and "
                    "delete its index.lmdb (the disk tier then starts empty)."))


def _where(tier: Tier) -> str:
    path = tier.describe().get("path")
    return f"{tier.name} tier at {path}" if path else f"{tier.name} tier"


def _advice(error: BaseException) -> tuple[str, str]:
    """The kind of an I/O failure (one log line per kind) and what an operator can do about it."""
    advice = getattr(error, "advice", None)
    if advice:
        return "other", advice
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "full", "The disk is full: free space on that filesystem or lower disk_bytes."
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return "read-only", ("The disk is not writable: remount the filesystem read-write or fix the permissions "
                             "of disk_path.")
    return "io", "Check the device and the kernel log (dmesg)."
