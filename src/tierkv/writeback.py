"""Write-behind for the disk tier: a block pushed down to disk is staged in memory and written in the background.

Making room in a full memory tier must not wait for the SSD. The tier manager copies the leaving block into a
staging buffer (a memcpy, or a device-to-host copy), hands its memory slot to the block that needed it, and
queues the disk write here. The disk copy stays ``writing`` (unreadable, unevictable) until the write lands,
so readers wait for it and nobody sees half a block.

The staging arena is bounded (``writeback_bytes``): when the disk falls that far behind, the next demotion waits
for room, which is the back-pressure a full queue needs. Jobs run on one thread in the order they were
submitted; each fans its I/O out on the tier manager's I/O pool.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ._memory import aligned_empty

__all__ = ["WriteBehind", "StagedBatch"]

log = logging.getLogger("tierkv")


@dataclass
class StagedBatch:
    """Staging buffers reserved for one batch of writes: ``bufs[i]`` is a whole page-aligned slot."""

    ticket: int
    rows: list[int]
    bufs: list[torch.Tensor]


class WriteBehind:
    """A bounded arena of ``capacity_slots`` staging buffers of ``slot_nbytes`` and the thread that writes them.

    Memory (pinned when CUDA is available) and the thread are created on first use, never at construction.
    """

    def __init__(self, slot_nbytes: int, capacity_slots: int, name: str = "tierkv-writeback") -> None:
        assert capacity_slots >= 1, "write-behind needs room for at least one block"
        self.slot_nbytes = slot_nbytes
        self.capacity_slots = capacity_slots
        self._name = name
        self._arena: torch.Tensor | None = None
        self._free = list(range(capacity_slots - 1, -1, -1))
        self._cond = threading.Condition()
        self._jobs: deque[tuple[StagedBatch, Callable[[], None]] | None] = deque()
        self._open: set[int] = set()  # tickets of batches begun and not yet finished
        self._next_ticket = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> int:
        """Blocks staged and not yet written."""
        with self._cond:
            return self.capacity_slots - len(self._free)

    def begin(self, n: int) -> StagedBatch:
        """Reserve ``n`` staging buffers (at most ``capacity_slots``), waiting while the disk is behind. Every
        batch begun must be passed to :meth:`submit`, which releases its buffers once its job has run."""
        assert 0 < n <= self.capacity_slots, f"a batch of {n} blocks exceeds the write-behind arena"
        with self._cond:
            while len(self._free) < n:
                self._cond.wait()
            if self._arena is None:
                self._arena = aligned_empty(self.capacity_slots * self.slot_nbytes, pinned=True).view(
                    self.capacity_slots, self.slot_nbytes)
            rows = [self._free.pop() for _ in range(n)]
            ticket = self._next_ticket
            self._next_ticket += 1
            self._open.add(ticket)
        return StagedBatch(ticket, rows, [self._arena[r] for r in rows])

    def submit(self, batch: StagedBatch, job: Callable[[], None]) -> None:
        """Run ``job`` (the writes of ``batch``) on the write-behind thread after every job submitted before it."""
        with self._cond:
            self._jobs.append((batch, job))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every batch begun before this call has been written (or has failed, as its job counted).
        Raises the first unexpected exception a job raised since the last drain (a bug, not an I/O error)."""
        with self._cond:
            mark = self._next_ticket
            while any(t < mark for t in self._open):
                self._cond.wait()
            error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        """Write everything staged, then stop the thread."""
        try:
            self.drain()
        finally:
            with self._cond:
                thread = self._thread
                self._jobs.append(None)
                self._cond.notify_all()
            if thread is not None:
                thread.join()
            self._arena = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                item = self._jobs.popleft()
            if item is None:
                return
            batch, job = item
            try:
                job()
            except BaseException as exc:  # a bug in the job: kept for drain() to raise, never swallowed
                log.exception("tierkv write-behind job failed")
                with self._cond:
                    if self._error is None:
                        self._error = exc
            finally:
                with self._cond:
                    self._free.extend(batch.rows)
                    self._open.discard(batch.ticket)
                    self._cond.notify_all()
