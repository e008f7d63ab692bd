"""Counters kept by the tier manager and the frozen snapshots ``BlockStore.stats()`` returns."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["TierStats", "StoreStats", "TierCounters"]


@dataclass
class TierCounters:
    """Mutable per-tier counters; changed only under the manager's lock."""

    hits: int = 0           # blocks served to get() from this tier
    misses: int = 0         # blocks asked of get() that this tier did not hold
    evictions: int = 0      # blocks that left this tier to make room
    promotions: int = 0     # blocks copied into this tier from a lower tier on get()
    bytes_read: int = 0     # bytes read out of this tier (get, demotion, flush)
    bytes_written: int = 0  # bytes written into this tier (put, demotion, promotion, flush)
    corrupt: int = 0        # copies whose checksum failed on read (dropped)
    failed_writes: int = 0  # writes that failed (ENOSPC, EIO, ...): that copy was dropped
    failed_reads: int = 0   # reads that failed (EIO, short read): that copy was dropped


@dataclass(frozen=True)
class TierStats:
    """One tier's counters at the time ``stats()`` was called. Bytes are bytes; blocks are blocks."""

    name: str
    hits: int
    misses: int
    evictions: int
    promotions: int
    bytes_read: int
    bytes_written: int
    corrupt: int
    failed_writes: int
    failed_reads: int
    used_blocks: int
    capacity_blocks: int
    used_bytes: int
    capacity_bytes: int

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any get."""
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0


@dataclass(frozen=True)
class StoreStats:
    """Per-tier statistics (``tiers``, top tier first) and store-wide totals.

    A block served from a lower tier is a hit of that tier and a miss of every tier above it; ``misses`` at the
    store level counts blocks no tier could return. ``dropped`` counts blocks that fell off the last tier.
    """

    tiers: dict[str, TierStats]
    puts: int = 0         # blocks newly stored by put()
    gets: int = 0         # blocks asked of get()
    hits: int = 0         # blocks get() returned
    misses: int = 0       # blocks get() could not return (BlockNotFound)
    dropped: int = 0      # blocks that fell off the last tier (or found no tier with room)
    deletes: int = 0      # blocks removed by delete()
    blocks: int = 0       # distinct blocks stored now (a block may have copies in several tiers)

    def __getitem__(self, tier: str) -> TierStats:
        return self.tiers[tier]

    @property
    def corrupt(self) -> int:
        """Copies dropped because their checksum failed, all tiers."""
        return sum(t.corrupt for t in self.tiers.values())

    @property
    def failed_writes(self) -> int:
        return sum(t.failed_writes for t in self.tiers.values())

    @property
    def evictions(self) -> int:
        return sum(t.evictions for t in self.tiers.values())

    @property
    def hit_rate(self) -> float:
        asked = self.hits + self.misses
        return self.hits / asked if asked else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tiers"}
        out["tiers"] = {name: {**asdict(t), "hit_rate": t.hit_rate} for name, t in self.tiers.items()}
        out.update(corrupt=self.corrupt, failed_writes=self.failed_writes, hit_rate=self.hit_rate)
        return out
