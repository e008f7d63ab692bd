"""Prometheus exporter for a store's statistics (needs the ``prometheus`` extra: ``pip install 'tierkv[prometheus]'``).

    import prometheus_client, tierkv.prometheus
    tierkv.prometheus.register(store)          # on prometheus_client's default registry
    prometheus_client.start_http_server(9400)

Every scrape reads ``store.stats()`` once; nothing is sampled in between. Names (``tierkv_`` prefix by default):
per tier, with label ``tier``: ``tier_hits_total``, ``tier_misses_total``, ``tier_evictions_total``,
``tier_promotions_total``, ``tier_read_bytes_total``, ``tier_written_bytes_total``, ``tier_corrupt_total``,
``tier_failed_writes_total``, ``tier_failed_reads_total``, ``tier_not_admitted_total``,
``tier_failed_commits_total``, ``tier_open_faults_total``, gauges
``tier_used_blocks``, ``tier_capacity_blocks``, ``tier_used_bytes``, ``tier_capacity_bytes``, ``tier_hit_rate``;
store-wide ``puts_total``, ``gets_total``, ``hits_total``, ``misses_total``, ``dropped_total``,
``deletes_total``, ``orphaned_total``, ``prefetched_total``, gauges ``blocks`` and ``pending_writes``; and the
histogram ``latency_seconds`` with labels ``op`` (lookup, lookup_tokens, put, prefetch, get, demote, writeback)
and ``tier`` (get: the tier the blocks came from, or "miss"; demote and writeback: the tier blocks went to; empty
otherwise). See docs/metrics.md.
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from .errors import StoreClosed
from .stats import bucket_upper_bound

__all__ = ["StoreCollector", "register"]

_TIER_COUNTERS = [("hits", "hits", "blocks served to get() from this tier"),
                  ("misses", "misses", "blocks asked of get() that this tier did not hold"),
                  ("evictions", "evictions", "blocks that left this tier to make room"),
                  ("promotions", "promotions", "blocks copied into this tier from a lower one on get()"),
                  ("read_bytes", "bytes_read", "bytes read out of this tier"),
                  ("written_bytes", "bytes_written", "bytes written into this tier"),
                  ("corrupt", "corrupt", "copies dropped because their checksum failed"),
                  ("failed_writes", "failed_writes", "writes that failed (that copy was dropped)"),
                  ("failed_reads", "failed_reads", "reads that failed (that copy was dropped)"),
                  ("not_admitted", "not_admitted", "blocks refused by this tier's admission rule"),
                  ("failed_commits", "failed_commits", "index commits that failed (retried at the next one)"),
                  ("open_faults", "open_faults", "faults found when the tier was opened (see the log)")]
_TIER_GAUGES = [("used_blocks", "blocks stored in this tier"), ("capacity_blocks", "blocks this tier can hold"),
                ("used_bytes", "bytes of slots in use"), ("capacity_bytes", "bytes of slots in all"),
                ("hit_rate", "hits / (hits + misses) of this tier")]
_STORE_COUNTERS = [("puts", "blocks newly stored by put()"), ("gets", "blocks asked of get()"),
                   ("hits", "blocks get() returned"), ("misses", "blocks get() could not return"),
                   ("dropped", "blocks that fell off the last tier"), ("deletes", "blocks removed by delete()"),
                   ("orphaned", "blocks freed because their prefix fell off the last tier"),
                   ("prefetched", "blocks prefetch() brought up into the top tier")]


class StoreCollector:
    """A prometheus_client collector reading one store's ``stats()`` at each scrape."""

    def __init__(self, store, prefix: str = "tierkv") -> None:
        self._store = store
        self._prefix = prefix

    def describe(self) -> list[Metric]:
        # Lets every registry (not only the default one) refuse a second collector with the same names.
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._store.stats()
        except StoreClosed:  # a closed store exports nothing rather than failing the whole scrape
            return
        p = self._prefix
        for name, attr, doc in _TIER_COUNTERS:
            family = CounterMetricFamily(f"{p}_tier_{name}", doc, labels=["tier"])
            for tier in stats.tiers.values():
                family.add_metric([tier.name], getattr(tier, attr))
            yield family
        for name, doc in _TIER_GAUGES:
            family = GaugeMetricFamily(f"{p}_tier_{name}", doc, labels=["tier"])
            for tier in stats.tiers.values():
                family.add_metric([tier.name], getattr(tier, name))
            yield family
        for name, doc in _STORE_COUNTERS:
            yield CounterMetricFamily(f"{p}_{name}", doc, value=getattr(stats, name))
        yield GaugeMetricFamily(f"{p}_blocks", "distinct blocks stored now", value=stats.blocks)
        yield GaugeMetricFamily(f"{p}_pending_writes", "blocks staged for the disk tier, not yet written",
                                value=stats.pending_writes)
        latency = HistogramMetricFamily(f"{p}_latency_seconds", "latency of store operations",
                                        labels=["op", "tier"])
        for key, summary in stats.latency.items():
            op, _, tier = key.partition(".")
            buckets, seen = [], 0
            for i, count in enumerate(summary.buckets):
                seen += count
                if i % 4 == 0 and i < len(summary.buckets) - 1:  # one bucket edge per doubling
                    buckets.append((repr(bucket_upper_bound(i)), seen))
            buckets.append(("+Inf", summary.count))
            latency.add_metric([op, tier], buckets, summary.total_s)
        yield latency


def register(store, registry: CollectorRegistry | None = None, prefix: str = "tierkv") -> StoreCollector:
    """Export ``store``'s statistics on ``registry`` (prometheus_client's default one when None). Two stores in
    one process need two registries or two prefixes."""
    collector = StoreCollector(store, prefix)
    (REGISTRY if registry is None else registry).register(collector)
    return collector
