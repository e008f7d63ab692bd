"""Relevance: recency, how often a block comes back, and position in the prefix tree, for shared prefixes.

Score of a block in a tier (the lowest leaves first)::

    score = stamp + seen * SAMPLE * tier_blocks

- ``stamp``: the block's last use on the store's clock.
- ``seen``: how many times this tier has seen the key lately, arrivals and uses, *including visits before the
  block last left the tier*, as of its last arrival, use or halving (at most MAX_SEEN). It comes from a
  count-min sketch: SKETCH_ROWS rows of at least SKETCH_WIDTH * tier_blocks one-byte counters (a power of
  two), so memory stays bounded and a collision can only overcount. Every counter halves once the tier has
  had SAMPLE * tier_blocks events (arrivals, uses, and arrivals it refused), as in TinyLFU, and resident
  scores are recomputed then: a block nobody uses any more loses half its credit per sample (a block seen
  once, all of it).
- ``tier_blocks``: the most blocks the tier has held (its size, once warm), at least MIN_TIER_BLOCKS.

One sighting is thus worth SAMPLE tier-fulls of clock ticks: how often a block comes back ranks first and
recency breaks ties between blocks seen about as often. A shared system prompt, or a document asked about
again and again, keeps its place against a stream of one-off prompts; a conversation that returns after the
cache turned over is recognised, because the sketch still counts its earlier visits.

The block that needs room (``newer_than``, its last use) is scored as a block seen once: its arrival is all
this tier knows of it. A resident leaves for it only if ``score < newer_than + SAMPLE * tier_blocks``, so a
block seen ``n`` times keeps its place against a newcomer last used up to ``(n - 1) * SAMPLE * tier_blocks``
ticks after it, and a block seen once gives way to any newer one, as under LRU.

Position in the prefix tree comes from the manager (``prefix_aware``): the keys of one put or get are
stamped head-most-recent, and a prefix is used whenever anything after it is, so of blocks a tier has seen
alike an ancestor scores at least as high as its descendants and leaves leave first. A block that falls off
the last tier takes its cached descendants with it (no prefix lookup could find them again); that also
covers an ancestor a tier knew less well than its descendants (it lived in a faster tier while they were
used in this one).
"""
from __future__ import annotations

import hashlib
from typing import Callable

from .base import EvictionPolicy
from .lru import LRUPolicy

SAMPLE = 10  # tier-fulls of events between halvings; one sighting is worth this many tier-fulls of ticks
MAX_SEEN = 7  # counters saturate here: three halvings take the most credit a block can have down to one
SKETCH_ROWS = 4
SKETCH_WIDTH = 8  # counters per row per tier block
MIN_TIER_BLOCKS = 16  # the tier size assumed while it is still filling
_HALVE = bytes(i >> 1 for i in range(256))


class FrequencySketch:
    """Count-min sketch of small counters: how often a key was seen, within bounded memory."""

    def __init__(self, width: int) -> None:
        self._rows = [bytearray(width) for _ in range(SKETCH_ROWS)]

    def widen(self, width: int) -> None:
        """Grow to at least ``width`` counters per row, keeping every key's count: a row doubled is indexed by
        one more hash bit, and both halves start as the old row."""
        while len(self._rows[0]) < width:
            self._rows = [row + row for row in self._rows]

    def count(self, key: bytes) -> int:
        return min(row[i] for row, i in zip(self._rows, self._slots(key)))

    def add(self, key: bytes) -> int:
        """Count one sighting of ``key``; returns its new count. Only the smallest counters grow (conservative
        update), which keeps collisions from inflating other keys."""
        slots = self._slots(key)
        least = min(row[i] for row, i in zip(self._rows, slots))
        if least < MAX_SEEN:
            least += 1
            for row, i in zip(self._rows, slots):
                row[i] = max(row[i], least)
        return least

    def halve(self) -> None:
        for row in self._rows:
            row[:] = row.translate(_HALVE)

    def _slots(self, key: bytes) -> list[int]:
        # blake2b, not hash(): keys may be any bytes, and the order must not change between runs
        digest = int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little")
        mask = len(self._rows[0]) - 1
        return [(digest >> (32 * r)) & mask for r in range(SKETCH_ROWS)]


class RelevancePolicy(EvictionPolicy):
    """An LRU heap ordered by score instead of stamp (see the module docstring)."""

    prefix_aware = True

    def __init__(self) -> None:
        self._order = LRUPolicy()  # key -> score, lowest first
        self._stamps: dict[bytes, int] = {}
        self._sketch = FrequencySketch(SKETCH_WIDTH * MIN_TIER_BLOCKS)
        self._peak = 0  # most blocks held at once: the tier's size in blocks, once warm
        self._events = 0  # since the last halving

    def insert(self, key: bytes, stamp: int) -> None:
        self._stamps[key] = stamp
        self._peak = max(self._peak, len(self._stamps))
        self._sketch.widen(SKETCH_WIDTH * self._tier_blocks())
        self._order.insert(key, self._score(stamp, self._sketch.add(key)))
        self._count_event()

    def touch(self, key: bytes, stamp: int) -> None:
        if key not in self._stamps:
            return
        self._stamps[key] = stamp
        self._order.touch(key, self._score(stamp, self._sketch.add(key)))
        self._count_event()

    def remove(self, key: bytes) -> None:
        self._stamps.pop(key, None)
        self._order.remove(key)

    def evict(self, n: int, protected: Callable[[bytes], bool], newer_than: int | None = None
              ) -> list[bytes] | None:
        # The newcomer is scored as a block seen once: its arrival is all this tier knows of it.
        bar = None if newer_than is None else self._score(newer_than, 1)
        chosen = self._order.evict(n, protected, bar)
        if chosen is None:
            self._count_event()  # a refused arrival is traffic too: a tier that refuses everything still ages
            return None
        for key in chosen:
            del self._stamps[key]
        return chosen

    def order(self) -> list[bytes]:
        """Keys, lowest score first (for tests and debugging)."""
        return self._order.order()

    def seen(self, key: bytes) -> int:
        """How often this tier has seen ``key`` lately, by the sketch (for tests and debugging)."""
        return self._sketch.count(key)

    def _tier_blocks(self) -> int:
        return max(self._peak, MIN_TIER_BLOCKS)

    def _score(self, stamp: int, seen: int) -> int:
        return stamp + seen * SAMPLE * self._tier_blocks()

    def _count_event(self) -> None:
        self._events += 1
        if self._events < SAMPLE * self._tier_blocks():
            return
        self._events = 0
        self._sketch.halve()
        order = LRUPolicy()  # rebuilt rather than re-pushed: no stale entry may tie with a new score
        for key, stamp in self._stamps.items():
            order.insert(key, self._score(stamp, self._sketch.count(key)))
        self._order = order

    def __len__(self) -> int:
        return len(self._stamps)

    def __contains__(self, key: bytes) -> bool:
        return key in self._stamps
