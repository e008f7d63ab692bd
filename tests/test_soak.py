"""Soak: eight threads on one store at full tier pressure for ten seconds (tierkv.bench.soak).

Every tier is full before the clock starts, so blocks move down and fall off the disk tier all the time. The run
must return only right bytes, raise nothing unexpected, keep its file descriptors and threads flat, stay within
its memory budget, and leave no thread of the store behind once closed. Throughput is not asserted: this
machine is shared and noisy (the benchmark reports it: ``python -m tierkv.bench.soak``).
"""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

import tierkv
from tierkv.bench.soak import FD_SLACK, THREAD_SLACK, Contents, Workload, main, overhead_budget, run_soak

THREADS = 8
DURATION_S = 10.0
# 64 KiB blocks: big enough that the bytes a get returns dominate Python's per-call overhead, so that keeping
# every get result alive would outgrow the memory budget many times over within the run (checked below).
LAYOUT = tierkv.KVLayout(num_layers=4, num_kv_heads=2, head_dim=128, block_tokens=16, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir = tmp_path_factory.mktemp("soak")
    return run_soak(LAYOUT, {}, threads=THREADS, duration_s=DURATION_S, workdir=workdir, seed=7,
                    sample_every_s=0.5)


def test_every_block_returned_is_right_and_nothing_unexpected_is_raised(report: dict) -> None:
    assert report["verify_failures"] == 0, report["verify_samples"]
    assert report["errors"] == {}, report["error_samples"]
    assert not report["hung"] and not report["stalls"], "a worker hung (deadlock?)"
    assert report["closed"]
    assert report["final_check"]["not_found"] == 0 and report["final_check"]["blocks_checked"] > 0
    assert report["failures"] == [], report["failures"]


def test_the_run_kept_every_tier_full_and_hit_every_tier(report: dict) -> None:
    ops = report["ops"]
    for op in ("put", "put_async", "get", "get_async", "prefetch", "lookup", "lookup_tokens", "delete", "flush"):
        assert ops[op] > 0, f"no {op} completed: {ops}"
    assert all(report["hits"][tier] > 0 for tier in ("device", "host", "disk")), report["hits"]
    assert report["stats"]["dropped"] > 0, "no block fell off the disk tier: the soak was not at full pressure"
    running = [s for s in report["samples"][1:] if not s.get("final")]
    for tier in ("device", "host", "disk"):
        mean = sum(s["used_share"][tier] for s in running) / len(running)
        assert mean > 0.8, f"{tier} tier only {mean:.0%} full on average"


def test_file_descriptors_and_threads_do_not_grow(report: dict) -> None:
    fds, threads_os, threads_py = report["fds"], report["threads_os"], report["threads_py"]
    assert fds["max"] <= fds["start"] + FD_SLACK, fds
    assert fds["end"] <= fds["start"] + FD_SLACK, fds
    assert threads_os["max"] <= threads_os["start"] + THREAD_SLACK, threads_os
    assert threads_os["end"] <= threads_os["start"] + THREAD_SLACK, threads_os
    assert threads_py["max"] <= threads_py["start"] + THREAD_SLACK, threads_py


def test_close_releases_every_file_and_thread_the_store_opened(report: dict) -> None:
    fds, threads_py = report["fds"], report["threads_py"]
    assert fds["after_close"] <= fds["before_open"] + FD_SLACK, fds
    assert report["store_threads_after_close"] == []
    assert threads_py["after_close"] <= threads_py["before_open"], threads_py
    assert not [t.name for t in threading.enumerate() if t.name.startswith(("tierkv-", "soak-"))]


def test_memory_stays_within_the_capacities_plus_the_documented_overhead(report: dict) -> None:
    memory = report["memory"]
    capacity = memory["capacity"]["memory_bytes"]
    budget = memory["budget"]["total"]
    config = tierkv.StoreConfig(**report["config"]["store"])
    assert budget == overhead_budget(LAYOUT, config, THREADS, Workload())["total"]
    assert memory["peak_rss_bytes"] - memory["baseline_rss_bytes"] <= capacity + budget, memory
    # The bound must be able to see a leak: had the run kept every block a get returned, RSS would have grown by
    # bytes_got, more than the bound allows. Twice the bound, not more: the volume a 10 s run moves depends on
    # the machine (a clean CI clone returned 4.0x the bound, this VM 5-6x), and that is no property of the store.
    assert report["bytes_got"] > 2 * (capacity + budget), (report["bytes_got"], capacity + budget)


def test_the_content_check_catches_a_block_of_another_key_or_offset() -> None:
    contents = Contents(LAYOUT.block_nbytes)
    scratch = np.empty(contents.words, dtype=np.uint64)
    a, b = b"\x01" * 16, b"\x02" + b"\x01" * 15
    row = np.empty(LAYOUT.block_nbytes, dtype=np.uint8)
    contents.fill(a, row)
    assert contents.same(a, row, scratch)
    assert not contents.same(b, row, scratch)
    shifted = np.roll(row, 8)  # right words, wrong offsets
    assert not contents.same(a, shifted, scratch)
    row[12345] ^= 1
    assert not contents.same(a, row, scratch)


def test_the_command_line_writes_its_report(tmp_path, capsys) -> None:
    out = tmp_path / "soak.json"
    tiny = ["--layers", "1", "--kv-heads", "1", "--head-dim", "64", "--block-tokens", "16",  # 2 KiB blocks
            "--device-bytes", "64KiB", "--host-bytes", "128KiB", "--disk-bytes", "1MiB", "--writeback-bytes", "64KiB"]
    assert main([*tiny, "--duration", "1", "--threads", "3", "--sample-every", "0.5", "--disk-dir", str(tmp_path),
                 "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["passed"] and saved["ops_total"] > 0 and len(saved["samples"]) >= 3
    table = capsys.readouterr().out
    for figure in ("peak RSS", "overhead", "open fds", "throughput first", "last / first"):
        assert figure in table
