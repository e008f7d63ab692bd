"""The Prometheus exporter: real prometheus_client registry, real store, scraped as text."""
from __future__ import annotations

import pytest

import tierkv
from conftest import make_blocks, make_keys, make_tier_setup

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import tierkv.prometheus  # noqa: E402


def scrape(registry) -> dict[tuple[str, tuple], float]:
    text = prometheus_client.generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_scrape_reports_per_tier_counters_and_latency(tmp_path, layout):
    setup = make_tier_setup("host+disk", tmp_path, layout)
    keys = make_keys(4, seed=95)
    blocks = make_blocks(4, layout, seed=96)
    registry = prometheus_client.CollectorRegistry()
    with setup.open(host=2, disk=8) as store:
        tierkv.prometheus.register(store, registry)
        store.put(keys, blocks)       # two blocks pushed down to disk
        store.get(keys[:1])           # a disk hit (the oldest block)
        store.get(keys[3:])           # a host hit
        store.drain()                 # the write-behind batch has been recorded
        stats = store.stats()
        m = scrape(registry)
        assert m[("tierkv_tier_hits_total", (("tier", "disk"),))] == stats["disk"].hits == 1
        assert m[("tierkv_tier_hits_total", (("tier", "host"),))] == stats["host"].hits == 1
        assert m[("tierkv_tier_capacity_blocks", (("tier", "host"),))] == 2
        assert m[("tierkv_tier_written_bytes_total", (("tier", "disk"),))] == stats["disk"].bytes_written > 0
        assert m[("tierkv_puts_total", ())] == 4 and m[("tierkv_blocks", ())] == 4
        get_disk = (("op", "get"), ("tier", "disk"))
        assert m[("tierkv_latency_seconds_count", get_disk)] == 1
        assert m[("tierkv_latency_seconds_bucket", tuple(sorted((*get_disk, ("le", "+Inf")))))] == 1
        assert m[("tierkv_latency_seconds_sum", get_disk)] == pytest.approx(stats.latency["get.disk"].total_s)
        assert m[("tierkv_latency_seconds_count", (("op", "demote"), ("tier", "disk")))] >= 1
        assert m[("tierkv_latency_seconds_count", (("op", "writeback"), ("tier", "disk")))] >= 1
        assert store.prefetch(keys[:2]).result(30) == 2  # keys[1] comes up from disk
        store.drain()
        m = scrape(registry)
        assert m[("tierkv_prefetched_total", ())] == store.stats().prefetched == 1
        assert m[("tierkv_pending_writes", ())] == store.stats().pending_writes == 0
        assert m[("tierkv_latency_seconds_count", (("op", "prefetch"), ("tier", "")))] == 1
    assert scrape(registry) == {}, "a closed store exports nothing and does not break the scrape"


def test_two_stores_need_two_prefixes_on_one_registry(tmp_path, layout):
    registry = prometheus_client.CollectorRegistry()
    a = make_tier_setup("device", tmp_path / "a", layout).open()
    b = make_tier_setup("device", tmp_path / "b", layout).open()
    try:
        tierkv.prometheus.register(a, registry)
        with pytest.raises(ValueError):  # prometheus_client refuses duplicate metric names
            tierkv.prometheus.register(b, registry)
        tierkv.prometheus.register(b, registry, prefix="tierkv_b")
        m = scrape(registry)
        assert ("tierkv_b_blocks", ()) in m and ("tierkv_blocks", ()) in m
    finally:
        a.close()
        b.close()
