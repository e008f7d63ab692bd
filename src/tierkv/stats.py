"""Counters kept by the tier manager and the frozen snapshots ``BlockStore.stats()`` returns."""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator

__all__ = ["TierStats", "StoreStats", "TierCounters", "LatencyStats", "LatencyHistogram"]

# Latency buckets: log-spaced, 4 per doubling from 1 us up, the last one open-ended. A quantile is reported as
# the upper edge of the bucket it falls in (at most 19% above the true value), never above the largest sample.
_BUCKET_BASE_S = 1e-6
_BUCKETS_PER_DOUBLING = 4
_N_BUCKETS = 4 * 36  # up to 2**36 us (about 19 hours)


def bucket_upper_bound(i: int) -> float:
    """Upper edge of latency bucket ``i`` in seconds (``inf`` for the last one)."""
    return math.inf if i >= _N_BUCKETS - 1 else _BUCKET_BASE_S * 2.0 ** (i / _BUCKETS_PER_DOUBLING)


@dataclass(frozen=True)
class LatencyStats:
    """One operation's latency distribution since the store opened. Seconds; quantiles are bucket upper edges
    (at most 19% above the true value) capped at the largest sample."""

    count: int
    total_s: float
    max_s: float
    p50_s: float
    p99_s: float
    buckets: tuple[int, ...]  # samples per bucket (see bucket_upper_bound), for exporters

    @property
    def mean_s(self) -> float:
        return self.total_s / self.count if self.count else 0.0


class LatencyHistogram:
    """A thread-safe latency histogram with fixed log-spaced buckets: O(1) to record, no sample kept."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * _N_BUCKETS
        self._count = 0
        self._total = 0.0
        self._max = 0.0

    def record(self, seconds: float) -> None:
        if seconds <= _BUCKET_BASE_S:
            i = 0
        else:
            i = min(_N_BUCKETS - 1, math.ceil(math.log2(seconds / _BUCKET_BASE_S) * _BUCKETS_PER_DOUBLING))
        with self._lock:
            self._counts[i] += 1
            self._count += 1
            self._total += seconds
            self._max = max(self._max, seconds)

    @contextmanager
    def timing(self) -> Iterator[None]:
        """Record how long the ``with`` block takes, whether it returns or raises."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(time.perf_counter() - start)

    def snapshot(self) -> LatencyStats:
        with self._lock:
            counts, count, total, peak = tuple(self._counts), self._count, self._total, self._max
        return LatencyStats(count=count, total_s=total, max_s=peak, p50_s=_quantile(counts, count, 0.5, peak),
                            p99_s=_quantile(counts, count, 0.99, peak), buckets=counts)


def _quantile(counts: tuple[int, ...], count: int, q: float, peak: float) -> float:
    if count == 0:
        return 0.0
    rank = max(1, math.ceil(q * count))
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            return min(bucket_upper_bound(i), peak)
    return peak


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
    not_admitted: int = 0   # blocks pushed down to this tier but refused by its admission rule (fell off)
    failed_commits: int = 0  # index commits that failed (map full, I/O error): retried at the next commit
    open_faults: int = 0    # faults found when the tier was opened (unreadable or missing index, truncated
                            # data file, space that could not be reserved); each is logged with what to do


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
    not_admitted: int = 0
    failed_commits: int = 0
    open_faults: int = 0

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
    orphaned: int = 0     # blocks freed because their prefix fell off the last tier (prefix-aware policies)
    blocks: int = 0       # distinct blocks stored now (a block may have copies in several tiers)
    prefetched: int = 0   # blocks prefetch() brought up into the top tier
    pending_writes: int = 0  # blocks staged for the disk tier whose write-behind has not landed yet
    # Latency per operation: "lookup", "lookup_tokens", "put", "prefetch", "get.<tier>" (a get call, by the
    # lowest tier any of its blocks came from; "get.miss" when it raised BlockNotFound), "demote.<tier>" (one
    # batch of blocks pushed down into that tier to make room above, as long as the caller waits for it) and
    # "writeback.<tier>" (one write-behind batch reaching that tier, in the background).
    latency: dict[str, LatencyStats] = field(default_factory=dict)

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
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("tiers", "latency")}
        out["tiers"] = {name: {**asdict(t), "hit_rate": t.hit_rate} for name, t in self.tiers.items()}
        out["latency"] = {op: {"count": l.count, "mean_s": l.mean_s, "p50_s": l.p50_s, "p99_s": l.p99_s,
                               "max_s": l.max_s} for op, l in self.latency.items()}
        out.update(corrupt=self.corrupt, failed_writes=self.failed_writes, hit_rate=self.hit_rate)
        return out
