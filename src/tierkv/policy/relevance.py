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

from typing import Callable

from .lru import LRUPolicy

MAX_REUSES = 3
MIN_WEIGHT = 16  # ticks per reuse while the tier is still filling


class RelevancePolicy(LRUPolicy):
    """LRU's heap ordered by score instead of stamp (see the module docstring)."""

    prefix_aware = True

    def __init__(self) -> None:
        super().__init__()
        self._reuses: dict[bytes, int] = {}
        self._peak = 0  # most blocks held at once: the tier's size in blocks, once warm

    def insert(self, key: bytes, stamp: int) -> None:
        self._reuses[key] = 0
        super().insert(key, stamp)
        self._peak = max(self._peak, len(self))

    def touch(self, key: bytes, stamp: int) -> None:
        if key not in self._reuses:
            return
        self._reuses[key] = min(self._reuses[key] + 1, MAX_REUSES)
        super().touch(key, stamp + self._reuses[key] * max(self._peak, MIN_WEIGHT))

    def remove(self, key: bytes) -> None:
        self._reuses.pop(key, None)
        super().remove(key)

    def evict(self, n: int, protected: Callable[[bytes], bool], newer_than: int | None = None
              ) -> list[bytes] | None:
        chosen = super().evict(n, protected, newer_than)
        for key in chosen or ():
            del self._reuses[key]
        return chosen
