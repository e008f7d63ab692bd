"""Relevance: recency, reuse and position in the prefix tree, for prompts that share prefixes.

Score of a block in a tier (the lowest leaves first)::

    score = stamp + min(reuses, MAX_REUSES) * max(tier_blocks, MIN_WEIGHT)

``stamp`` is the block's last use on the store's clock; ``reuses`` counts the uses this tier has seen since
the block arrived (touches); ``tier_blocks`` is the most blocks the tier has held (about its capacity once
warm). A block used again is thus worth up to MAX_REUSES tier-fulls of recency: a shared system prompt
outlives a stream of one-off prompts that would flush it under plain LRU, yet still ages out once nobody uses
it.

Position in the prefix tree comes from the manager (``prefix_aware``): the keys of one put or get are
stamped head-most-recent, and a prefix is used whenever anything after it is, so an ancestor always scores at
least as high as its descendants and leaves leave first. A block that falls off the last tier takes its
cached descendants with it (they could never be found by a prefix lookup again).
"""
from __future__ import annotations

import heapq
from typing import Callable

from .base import EvictionPolicy

MAX_REUSES = 3
MIN_WEIGHT = 16  # ticks per reuse while the tier is still filling


class RelevancePolicy(EvictionPolicy):
    prefix_aware = True

    def __init__(self) -> None:
        self._score: dict[bytes, int] = {}
        self._reuses: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []
        self._peak = 0  # most blocks held at once: the tier's size in blocks, once warm

    def insert(self, key: bytes, stamp: int) -> None:
        self._reuses[key] = 0
        self._set(key, stamp)
        self._peak = max(self._peak, len(self._score))

    def touch(self, key: bytes, stamp: int) -> None:
        if key not in self._score:
            return
        self._reuses[key] = min(self._reuses[key] + 1, MAX_REUSES)
        self._set(key, stamp + self._reuses[key] * max(self._peak, MIN_WEIGHT))

    def remove(self, key: bytes) -> None:
        self._score.pop(key, None)
        self._reuses.pop(key, None)

    def evict(self, n: int, protected: Callable[[bytes], bool], newer_than: int | None = None
              ) -> list[bytes] | None:
        if n <= 0:
            return []
        chosen: list[tuple[int, bytes]] = []
        skipped: list[tuple[int, bytes]] = []
        while self._heap and len(chosen) < n:
            score, key = self._heap[0]
            if self._score.get(key) != score:
                heapq.heappop(self._heap)  # stale: removed or rescored since
                continue
            if newer_than is not None and score >= newer_than:
                break  # everything left is worth at least as much as the block that needs room
            heapq.heappop(self._heap)
            (skipped if protected(key) else chosen).append((score, key))
        for item in skipped + (chosen if len(chosen) < n else []):
            heapq.heappush(self._heap, item)
        if len(chosen) < n:
            return None
        for _, key in chosen:
            self.remove(key)
        return [key for _, key in chosen]

    def _set(self, key: bytes, score: int) -> None:
        self._score[key] = score
        heapq.heappush(self._heap, (score, key))
        if len(self._heap) > 2 * len(self._score) + 64:  # drop stale entries once they dominate
            self._heap = [(s, k) for k, s in self._score.items()]
            heapq.heapify(self._heap)

    def order(self) -> list[bytes]:
        """Keys, first to leave first (for tests and debugging)."""
        return [key for _, key in sorted((s, k) for k, s in self._score.items())]

    def __len__(self) -> int:
        return len(self._score)

    def __contains__(self, key: bytes) -> bool:
        return key in self._score
