from __future__ import annotations

import heapq
from typing import Callable

from .base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Least recently used first: the block idle the longest leaves first.

    A heap of ``(stamp, key)`` with lazy deletion: touches push a new entry and the stale one is skipped when
    it surfaces, so every operation is O(log n) amortised.
    """

    def __init__(self) -> None:
        self._stamps: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

    def insert(self, key: bytes, stamp: int) -> None:
        self._stamps[key] = stamp
        self._push(key, stamp)

    def touch(self, key: bytes, stamp: int) -> None:
        if key in self._stamps and self._stamps[key] != stamp:
            self._stamps[key] = stamp
            self._push(key, stamp)

    def remove(self, key: bytes) -> None:
        self._stamps.pop(key, None)

    def evict(self, n: int, protected: Callable[[bytes], bool], newer_than: int | None = None
              ) -> list[bytes] | None:
        if n <= 0:
            return []
        chosen: list[tuple[int, bytes]] = []
        skipped: list[tuple[int, bytes]] = []
        while self._heap and len(chosen) < n:
            stamp, key = self._heap[0]
            if self._stamps.get(key) != stamp:
                heapq.heappop(self._heap)  # stale: removed or touched since
                continue
            if newer_than is not None and stamp >= newer_than:
                break  # everything left is at least as recent as the block that needs room
            heapq.heappop(self._heap)
            (skipped if protected(key) else chosen).append((stamp, key))
        for item in skipped + (chosen if len(chosen) < n else []):
            heapq.heappush(self._heap, item)
        if len(chosen) < n:
            return None
        for _, key in chosen:
            del self._stamps[key]
        return [key for _, key in chosen]

    def _push(self, key: bytes, stamp: int) -> None:
        heapq.heappush(self._heap, (stamp, key))
        if len(self._heap) > 2 * len(self._stamps) + 64:  # drop stale entries once they dominate
            self._heap = [(s, k) for k, s in self._stamps.items()]
            heapq.heapify(self._heap)

    def order(self) -> list[bytes]:
        """Keys, least recently used first (for tests and debugging)."""
        return [key for _, key in sorted((s, k) for k, s in self._stamps.items())]

    def __len__(self) -> int:
        return len(self._stamps)

    def __contains__(self, key: bytes) -> bool:
        return key in self._stamps
