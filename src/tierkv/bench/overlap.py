"""The asynchronous engine: what a put waits for, and how much tier traffic hides behind compute.

Two measurements, each taken against its own reference in the same run:

- **put on a full memory tier**: a host+disk store whose host tier is full; every put pushes as many blocks
  down to disk. Mean put latency with write-behind (the default) against ``writeback_bytes=0`` (the put writes
  the disk itself), and the total time including the final ``drain`` (write-behind must not cost throughput).
- **overlap with a simulated compute stream**: an engine loop of steps. Each step issues its tier traffic
  asynchronously (``put_async`` of the step's new blocks, ``prefetch`` of blocks a later step needs), runs a
  stand-in for a forward pass (one matrix product on the store's device, sized so one step of compute takes as
  long as one step of traffic), then waits for its futures. With C the compute alone, T the traffic alone and B
  both together (each ending with ``drain``), the hidden share of the traffic is ``(C + T - B) / min(C, T)``:
  1 when the traffic is completely hidden, 0 when nothing overlaps. Measured for device->host traffic (a
  device+host store; ``put_async`` pushes device blocks to host) and for disk traffic (a host+disk store:
  write-behind of demoted blocks plus prefetch reads from disk).

On a CPU-only machine the "device" tier is host memory and its traffic is memcpy, which competes with the
compute for the same cores; on a GPU it is DMA on the copy engines.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tierkv

from .progress import Progress

__all__ = ["bench_async"]

BATCH = 8        # blocks a step puts (and prefetches)
STEPS = 12       # engine steps per overlap run
PUT_BATCHES = 12  # puts in the latency run


def _store(layout: tierkv.KVLayout, workdir: Path, name: str, device: int, host: int, disk: int, threads: int,
           writeback: bool = True) -> tierkv.BlockStore:
    nbytes = layout.block_nbytes
    slot = (nbytes + 4095) // 4096 * 4096
    config = tierkv.StoreConfig(device_bytes=device * nbytes, host_bytes=host * nbytes,
                                disk_path=str(workdir / name) if disk else None, disk_bytes=disk * slot,
                                io_threads=threads, **({} if writeback else {"writeback_bytes": 0}))
    return tierkv.BlockStore(layout, config)


class Blocks:
    """Random blocks and fresh keys for them; block ``i`` has content ``data[i % len(data)]``."""

    def __init__(self, layout: tierkv.KVLayout, rng: np.random.Generator, count: int) -> None:
        raw = torch.from_numpy(rng.integers(0, 256, size=(BATCH, layout.block_nbytes), dtype=np.uint8))
        self.data = raw.view(layout.dtype).view(BATCH, *layout.block_shape)
        self.keys = [rng.bytes(16) for _ in range(count)]

    def batch(self, i: int) -> tuple[list[bytes], torch.Tensor]:
        return self.keys[i * BATCH:(i + 1) * BATCH], self.data

    def check(self, store: tierkv.BlockStore, batch: int, what: str) -> list[str]:
        keys, data = self.batch(batch)
        got = store.get(keys)
        same = torch.equal(got.reshape(-1).view(torch.uint8).cpu(), data.reshape(-1).view(torch.uint8))
        return [] if same else [f"{what}: blocks read back differ from what was put"]


# -- put latency -----------------------------------------------------------------------------------------------
def _put_latency(layout: tierkv.KVLayout, workdir: Path, threads: int, writeback: bool, rng: np.random.Generator
                 ) -> tuple[dict[str, float], list[str]]:
    host = 4 * BATCH
    blocks = Blocks(layout, rng, host + PUT_BATCHES * BATCH)
    name = f"put-{'wb' if writeback else 'sync'}-{time.monotonic_ns()}"
    with _store(layout, workdir, name, 0, host, host + PUT_BATCHES * BATCH + 1, threads, writeback) as store:
        for i in range(host // BATCH):  # fill the host tier
            store.put(*blocks.batch(i))
        latencies = []
        start = time.perf_counter()
        for i in range(host // BATCH, host // BATCH + PUT_BATCHES):
            t0 = time.perf_counter()
            store.put(*blocks.batch(i))
            latencies.append(time.perf_counter() - t0)
        store.drain()
        total = time.perf_counter() - start
        failures = blocks.check(store, 0, "put latency run")  # the first blocks went all the way to disk
    return {"mean_put_s": float(np.mean(latencies)), "p50_put_s": float(np.median(latencies)),
            "max_put_s": float(np.max(latencies)), "total_s": total}, failures


# -- overlap ---------------------------------------------------------------------------------------------------
class Compute:
    """A stand-in forward pass on ``device``: one product of two n x n float32 matrices. One call, so the thread
    holds no Python lock while it computes (many small calls would measure the GIL's hand-offs instead)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._resize(256)

    def _resize(self, n: int) -> None:
        self.n = n
        self.a = torch.randn(n, n, device=self.device)
        self.b = torch.randn(n, n, device=self.device)

    def run(self) -> None:
        torch.mm(self.a, self.b)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def calibrate(self, seconds: float) -> None:
        """Choose n so that one ``run`` takes about ``seconds`` (time grows as n**3; a warm-up first, then
        three refinements)."""
        self.run()
        for _ in range(3):
            t0 = time.perf_counter()
            self.run()
            elapsed = max(time.perf_counter() - t0, 1e-6)
            self._resize(max(64, min(8192, round(self.n * (seconds / elapsed) ** (1 / 3)))))


def _traffic(kind: str, layout: tierkv.KVLayout, workdir: Path, threads: int, rng: np.random.Generator,
             tag: str) -> tuple[tierkv.BlockStore, Blocks, Callable[[int], list]]:
    """A warmed store for one kind of traffic and the step function that issues one step's async work."""
    if kind == "device->host":
        device, host, disk = 2 * BATCH, (STEPS + 3) * BATCH, 0
        warm = device // BATCH
    else:  # disk: host holds 4 batches; earlier batches wait on disk for their prefetch
        warm = 8
        device, host, disk = 0, 4 * BATCH, (warm + STEPS + 1) * BATCH
    blocks = Blocks(layout, rng, (warm + STEPS) * BATCH)
    store = _store(layout, workdir, f"{kind.replace('->', '-')}-{tag}-{time.monotonic_ns()}", device, host, disk,
                   threads)
    for i in range(warm):
        store.put(*blocks.batch(i))
    store.drain()

    def step(i: int) -> list:
        futures = [store.put_async(*blocks.batch(warm + i))]
        if kind == "disk":
            futures.append(store.prefetch(blocks.batch(i)[0]))  # a batch that went down to disk earlier
        return futures

    return store, blocks, step


def _loop(store: tierkv.BlockStore, step: Callable[[int], list] | None, compute: Compute | None) -> float:
    start = time.perf_counter()
    for i in range(STEPS):
        futures = step(i) if step is not None else []
        if compute is not None:
            compute.run()
        for f in futures:
            f.result()
    if step is not None:
        store.drain()
    return time.perf_counter() - start


def _overlap(kind: str, layout: tierkv.KVLayout, workdir: Path, threads: int, rng: np.random.Generator
             ) -> tuple[dict[str, float], list[str]]:
    store, blocks, step = _traffic(kind, layout, workdir, threads, rng, "alone")
    with store:
        traffic_s = _loop(store, step, None)
        failures = blocks.check(store, 0, f"{kind} traffic run")
        compute = Compute(store.device)
    compute.calibrate(traffic_s / STEPS)
    compute_s = _loop(store, None, compute)
    store, blocks, step = _traffic(kind, layout, workdir, threads, rng, "both")
    with store:
        both_s = _loop(store, step, compute)
        failures += blocks.check(store, 0, f"{kind} overlapped run")
        moved = {name: t.bytes_read + t.bytes_written for name, t in store.stats().tiers.items()}
    hidden = (compute_s + traffic_s - both_s) / min(compute_s, traffic_s)
    return {"compute_s": compute_s, "traffic_s": traffic_s, "both_s": both_s,
            "hidden_share": max(0.0, min(1.0, hidden)), "bytes_moved": moved}, failures


def bench_async(layout: tierkv.KVLayout, threads: int, workdir: Path, rng: np.random.Generator, progress: Progress
                ) -> tuple[dict[str, Any], list[tuple[str, ...]], list[str]]:
    """Both measurements: (JSON results, table rows, verification failures)."""
    results: dict[str, Any] = {"batch_blocks": BATCH, "steps": STEPS, "put_batches": PUT_BATCHES}
    failures: list[str] = []
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the compute stand-in gets one core; the store's threads the rest
    try:
        runs: dict[str, list[dict[str, float]]] = {"write_behind": [], "synchronous": []}
        for _ in range(2):  # interleaved, best of two: the disk's speed drifts on shared machines
            for mode, writeback in (("write_behind", True), ("synchronous", False)):
                figures, f = _put_latency(layout, workdir, threads, writeback, rng)
                runs[mode].append(figures)
                failures += f
        progress.step("async: put latency")
        for mode, figures in runs.items():
            results[mode] = min(figures, key=lambda r: r["mean_put_s"])
        for kind in ("device->host", "disk"):
            results[kind], f = _overlap(kind, layout, workdir, threads, rng)
            failures += f
            progress.step(f"async: {kind} overlap")
    finally:
        torch.set_num_threads(torch_threads)
    wb, sync = results["write_behind"], results["synchronous"]
    rows = [("put, full host tier: ms write-behind vs sync", f"{wb['mean_put_s'] * 1e3:.1f}",
             f"{sync['mean_put_s'] * 1e3:.1f}", f"{sync['mean_put_s'] / wb['mean_put_s']:.1f}x", "-", "info"),
            ("  same puts + drain: total s", f"{wb['total_s']:.2f}", f"{sync['total_s']:.2f}",
             f"{sync['total_s'] / wb['total_s']:.2f}x", "-", "info")]
    for kind in ("device->host", "disk"):
        r = results[kind]
        rows.append((f"{kind} traffic hidden behind compute", f"{100 * r['hidden_share']:.0f}%",
                     f"C {r['compute_s']:.2f} T {r['traffic_s']:.2f} B {r['both_s']:.2f} s", "-", "-", "info"))
    return results, rows, failures
