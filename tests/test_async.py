"""The asynchronous engine: put_async / get_async / prefetch futures, write-behind to disk, and shutdown.

Blocking points are made deterministic with gates (threading.Event) instead of sleeps: a disk whose writes
wait for a gate shows whether a caller waits for the disk; a load lane held by a gate shows ordering.
"""
from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest
import torch

import tierkv
from tierkv.io.posix import PosixFile
from conftest import assert_bit_equal, check_invariants, make_blocks, make_keys, make_tier_setup, settle

JOIN_S = 30  # generous: only a deadlock should ever reach it


class GatedDisk:
    """Patches the POSIX data file so that writes wait until ``open()`` is called; counts write requests."""

    def __init__(self, monkeypatch):
        self.gate = threading.Event()
        self.requests: list[int] = []  # blocks per write request
        self.waiting = threading.Event()  # set once a write is held at the gate
        real_write, real_writev = PosixFile.pwrite, PosixFile.pwritev

        def pwrite(file, buf, offset):
            self._hold(1)
            return real_write(file, buf, offset)

        def pwritev(file, bufs, offset):
            self._hold(len(bufs))
            return real_writev(file, bufs, offset)

        monkeypatch.setattr(PosixFile, "pwrite", pwrite)
        monkeypatch.setattr(PosixFile, "pwritev", pwritev)

    def _hold(self, blocks: int) -> None:
        self.requests.append(blocks)
        self.waiting.set()
        assert self.gate.wait(JOIN_S), "the gate was never opened"

    def open(self) -> None:
        self.gate.set()


def in_thread(fn, *args):
    """Run ``fn`` in a thread; returns (thread, result dict with "value" or "error")."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # reported by the test
            result["error"] = exc

    thread = threading.Thread(target=run, name="tierkv-test-caller")
    thread.start()
    return thread, result


def hold_lane(store, lane: str) -> threading.Event:
    """Occupy one of the store's async lanes until the returned event is set."""
    release = threading.Event()
    store._submit(lane, lambda: release.wait(JOIN_S))
    return release


# -- futures -------------------------------------------------------------------------------------------------
def test_put_async_and_get_async_round_trip(tier_config, layout):
    keys, blocks = make_keys(5, seed=1), make_blocks(5, layout, seed=2)
    with tier_config.open() as store:
        assert store.put_async(keys, blocks).result(JOIN_S) == 5
        assert store.put_async(keys[:2], blocks[:2]).result(JOIN_S) == 0  # already stored: refreshed
        assert_bit_equal(store.get_async(keys).result(JOIN_S), blocks)
        out = torch.empty_like(blocks)
        assert store.get_async(keys[1:3], out[:2]).result(JOIN_S) is not None
        assert_bit_equal(out[:2], blocks[1:3])
        check_invariants(store, {k: b for k, b in zip(keys, blocks)})


def test_get_async_of_a_missing_key_fails_its_future(store, layout):
    keys = make_keys(2, seed=3)
    store.put(keys[:1], make_blocks(1, layout, seed=4))
    future = store.get_async(keys)
    with pytest.raises(tierkv.BlockNotFound) as info:
        future.result(JOIN_S)
    assert keys[1].hex() in str(info.value)


def test_bad_arguments_raise_at_once_and_change_nothing(store, layout):
    keys, blocks = make_keys(2, seed=5), make_blocks(2, layout, seed=6)
    with pytest.raises(ValueError, match="expected blocks of shape"):
        store.put_async(keys, blocks[:, :1])
    with pytest.raises(TypeError, match="expected blocks of dtype"):
        store.put_async(keys, blocks.float())
    with pytest.raises(ValueError, match="expected 16-byte keys"):
        store.get_async([b"short"])
    with pytest.raises(TypeError, match="expected keys as bytes"):
        store.prefetch(["not bytes"])
    assert store.lookup(keys) == 0 and store.stats().puts == 0


def test_nan_in_a_lossy_store_fails_the_put_future(tmp_path):
    layout = tierkv.KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=4, dtype=torch.bfloat16)
    config = tierkv.StoreConfig(device_bytes=0, host_bytes=8 * layout.block_nbytes, host_codec="fp8")
    with tierkv.BlockStore(layout, config) as store:
        blocks = torch.randn(1, *layout.block_shape).to(layout.dtype)
        blocks[0, 0, 0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="finite"):
            store.put_async(make_keys(1, seed=7), blocks).result(JOIN_S)
        assert store.stats().puts == 0


def test_a_load_waits_for_an_earlier_put_async_of_its_keys(tier_config, layout):
    """Read your writes: with the save lane held, a put_async is queued; a get_async and a plain get of the
    same keys wait for it instead of missing."""
    keys, blocks = make_keys(3, seed=8), make_blocks(3, layout, seed=9)
    with tier_config.open() as store:
        release = hold_lane(store, "save")
        put = store.put_async(keys, blocks)
        got = store.get_async(keys)
        caller, result = in_thread(store.get, keys)
        assert not put.done() and not got.done()
        release.set()
        assert put.result(JOIN_S) == 3
        assert_bit_equal(got.result(JOIN_S), blocks)
        caller.join(JOIN_S)
        assert "error" not in result, result
        assert_bit_equal(result["value"], blocks)


def test_async_operations_on_one_lane_run_in_submission_order(store, layout):
    keys, blocks = make_keys(4, seed=10), make_blocks(4, layout, seed=11)
    done: list[int] = []
    futures = [store.put_async(keys[i:i + 1], blocks[i:i + 1]) for i in range(4)]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda _, i=i: done.append(i))
    for f in futures:
        f.result(JOIN_S)
    assert done == [0, 1, 2, 3]


# -- prefetch ------------------------------------------------------------------------------------------------
def test_prefetch_brings_blocks_up_without_counting_hits(tmp_path, layout):
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys, blocks = make_keys(8, seed=12), make_blocks(8, layout, seed=13)
    with setup.open(device=2, host=2, disk=8) as store:
        store.put(keys, blocks)  # the first six were pushed down to host and disk
        settle(store)
        before = store.stats()
        assert store.prefetch(keys[:2] + [make_keys(1, seed=14)[0]]).result(JOIN_S) == 2  # a missing key: skipped
        after = store.stats()
        assert (after.hits, after.misses, after.gets) == (before.hits, before.misses, before.gets)
        assert after.prefetched == 2
        copies = store._manager.snapshot().copies
        assert [{t for t, _, _ in copies[k]} for k in keys[:2]] == [{"device", "disk"}] * 2  # disk keeps its copy
        assert_bit_equal(store.get(keys[:2]), blocks[:2])
        assert store.stats().tiers["device"].hits == before.tiers["device"].hits + 2
        assert store.stats().latency["get.device"].count == before.latency["get.device"].count + 1
        check_invariants(store, {k: b for k, b in zip(keys, blocks)})


def test_prefetch_of_blocks_already_on_top_moves_nothing(store, layout):
    keys = make_keys(3, seed=15)
    store.put(keys, make_blocks(3, layout, seed=16))
    top = store.tier_names[0]
    written = store.stats().tiers[top].bytes_written
    assert store.prefetch(keys).result(JOIN_S) == 3
    assert store.stats().tiers[top].bytes_written == written
    assert store.stats().prefetched == 0


def test_prefetch_reads_a_lossy_disk_block_once_and_serves_it_from_the_top(tmp_path):
    layout = tierkv.KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, block_tokens=4, dtype=torch.bfloat16)
    config = tierkv.StoreConfig(device_bytes=4 * layout.block_nbytes, host_bytes=0, disk_codec="fp8",
                                disk_path=str(tmp_path / "d"), disk_bytes=16 * 4096)
    keys = make_keys(6, seed=17, layout=layout)
    blocks = torch.randn(6, *layout.block_shape).to(layout.dtype)
    with tierkv.BlockStore(layout, config) as store:
        store.put(keys, blocks)
        settle(store)
        assert store.prefetch(keys[:2]).result(JOIN_S) == 2
        reads = store.stats().tiers["disk"].bytes_read
        got = store.get(keys[:2])
        assert store.stats().tiers["disk"].bytes_read == reads, "the get was served from the top tier"
        error = (got.double() - blocks[:2].double()).norm() / blocks[:2].double().norm()
        assert float(error) < 0.04


# -- write-behind --------------------------------------------------------------------------------------------
def test_a_put_that_pushes_blocks_to_disk_does_not_wait_for_the_disk(tmp_path, layout, monkeypatch):
    disk = GatedDisk(monkeypatch)
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys, blocks = make_keys(6, seed=18), make_blocks(6, layout, seed=19)
    with setup.open(device=2, host=2, disk=8) as store:
        caller, result = in_thread(store.put, keys, blocks)  # two blocks must go down to the (stuck) disk
        caller.join(JOIN_S)
        assert not caller.is_alive() and result.get("value") == 6, f"put waited for the disk: {result}"
        assert disk.waiting.wait(JOIN_S), "the demoted blocks were never written"
        assert store.stats().pending_writes == 2
        assert all(k in store for k in keys), "blocks on their way to disk are still in the store"
        reader, got = in_thread(store.get, keys[:1])  # waits for the write to land, then reads it back
        reader.join(0.2)
        assert reader.is_alive(), "a block was read before its write landed"
        disk.open()
        reader.join(JOIN_S)
        assert "error" not in got, got
        assert_bit_equal(got["value"], blocks[:1])
        settle(store)
        assert store.stats().pending_writes == 0
        check_invariants(store, {k: b for k, b in zip(keys, blocks)})


def test_write_behind_memory_is_bounded_and_pushes_back(tmp_path, layout, monkeypatch):
    """Room for two staged blocks: the third demotion waits until the disk has written the first two."""
    disk = GatedDisk(monkeypatch)
    setup = make_tier_setup("host+disk", tmp_path, layout)
    keys, blocks = make_keys(5, seed=20), make_blocks(5, layout, seed=21)
    slot = 4096
    with setup.open(host=2, disk=8, writeback_bytes=2 * slot) as store:
        store.put(keys[:4], blocks[:4])  # two demotions: exactly the arena
        assert disk.waiting.wait(JOIN_S)
        assert store.stats().pending_writes == 2
        caller, result = in_thread(store.put, keys[4:], blocks[4:])  # a third demotion: no room to stage it
        caller.join(0.2)
        assert caller.is_alive(), "a demotion was staged beyond writeback_bytes"
        disk.open()
        caller.join(JOIN_S)
        assert result.get("value") == 1, result
        settle(store)
        for k, b in zip(keys, blocks):
            assert_bit_equal(store.get([k]), b.unsqueeze(0))


def test_writeback_bytes_zero_writes_synchronously(tmp_path, layout):
    setup = make_tier_setup("host+disk", tmp_path, layout)
    keys, blocks = make_keys(4, seed=22), make_blocks(4, layout, seed=23)
    with setup.open(host=2, disk=8, writeback_bytes=0) as store:
        store.put(keys, blocks)
        stats = store.stats()  # no settle: the demotions were written before put returned
        assert stats.tiers["disk"].bytes_written == 2 * layout.block_nbytes and stats.pending_writes == 0
        assert "writeback.disk" not in stats.latency


def test_consecutive_disk_slots_are_written_in_one_request(tmp_path, layout, monkeypatch):
    disk = GatedDisk(monkeypatch)
    disk.open()
    setup = make_tier_setup("host+disk", tmp_path, layout)
    keys, blocks = make_keys(10, seed=24), make_blocks(10, layout, seed=25)
    with setup.open(host=2, disk=16) as store:
        store.put(keys, blocks)  # eight blocks pushed down, into slots 0..7
        settle(store)
        assert disk.requests and max(disk.requests) > 1 and sum(disk.requests) == 8, disk.requests
        assert len(disk.requests) < 8
    with setup.open(host=2, disk=16) as store:
        assert_bit_equal(store.get(keys[:8]), blocks[:8])


def test_flush_waits_for_blocks_still_being_written(tmp_path, layout, monkeypatch):
    disk = GatedDisk(monkeypatch)
    setup = make_tier_setup("host+disk", tmp_path, layout)
    keys, blocks = make_keys(4, seed=26), make_blocks(4, layout, seed=27)
    store = setup.open(host=2, disk=8)
    store.put(keys, blocks)
    assert disk.waiting.wait(JOIN_S)
    flusher, result = in_thread(store.flush)
    flusher.join(0.2)
    assert flusher.is_alive(), "flush returned while demoted blocks were still unwritten"
    disk.open()
    flusher.join(JOIN_S)
    assert "error" not in result, result
    store.close()
    with setup.open(host=2, disk=8) as again:
        assert_bit_equal(again.get(keys), blocks)


# -- shutdown ------------------------------------------------------------------------------------------------
def tierkv_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("tierkv-") and "test" not in t.name}


def test_close_finishes_submitted_puts_and_no_thread_outlives_the_store(tmp_path, layout):
    setup = make_tier_setup("device+host+disk", tmp_path, layout)
    keys, blocks = make_keys(24, seed=28), make_blocks(24, layout, seed=29)
    threads_before = tierkv_threads()
    store = setup.open(device=2, host=2, disk=32)
    futures = [store.put_async(keys[i:i + 3], blocks[i:i + 3]) for i in range(0, 24, 3)]
    store.prefetch(keys[:3])
    store.close()
    assert all(f.done() for f in futures) and sum(f.result() for f in futures) == 24
    assert tierkv_threads() <= threads_before, f"threads left behind: {tierkv_threads() - threads_before}"
    with pytest.raises(tierkv.StoreClosed):
        store.put_async(keys[:1], blocks[:1])
    with pytest.raises(tierkv.StoreClosed):
        store.prefetch(keys[:1])
    with setup.open(device=2, host=2, disk=32) as again:  # close persisted what the puts stored
        assert_bit_equal(again.get(keys), blocks)


def test_close_cancels_queued_prefetches_and_waits_for_running_loads(tmp_path, layout):
    setup = make_tier_setup("device+host", tmp_path, layout)
    keys, blocks = make_keys(4, seed=30), make_blocks(4, layout, seed=31)
    store = setup.open(device=2, host=4)
    store.put(keys, blocks)
    release = hold_lane(store, "load")
    get = store.get_async(keys[:2])
    prefetch = store.prefetch(keys[2:])
    closer, result = in_thread(store.close)
    closer.join(0.2)
    assert closer.is_alive(), "close returned while a submitted get was still queued"
    release.set()
    closer.join(JOIN_S)
    assert "error" not in result, result
    assert_bit_equal(get.result(0), blocks[:2])
    assert prefetch.cancelled()
    with pytest.raises(CancelledError):
        prefetch.result(0)
