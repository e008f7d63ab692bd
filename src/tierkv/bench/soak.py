"""Soak / load: many threads on one store at full tier pressure for a bounded time, watching what must not grow.

``run_soak`` opens a real store (by default device + host + disk in ``workdir``, each a few dozen to a few
hundred blocks) and fills every tier before the clock starts, so blocks constantly move down a tier and fall off
the last one. ``threads`` workers then run what an inference engine does, mixed:

- ``put`` of new prompt chains (each starts with one of a few shared system-prompt blocks), and ``put_async``;
- ``lookup`` + ``get`` of a prompt put earlier: the distance back is exponential, so hits come from every tier
  and some prompts are gone (a partial or empty prefix); half the gets fill a per-thread ``out`` buffer, half
  allocate; ``get_async``; ``prefetch`` followed by a ``get``;
- ``lookup_tokens`` and ``in``; ``delete`` of a prompt's tail; a ``flush`` every ``flush_every_s``.

A block's bytes are a pure function of its key (8-byte words ``seed(key) + i * C``), so every block any get
returns is checked in full: a block of another key, or bytes from another offset, is a verification failure.
``BlockNotFound`` for a key that ``lookup`` had promised is counted as a race (evicted or deleted in between),
not an error; any other exception is an error.

Once per ``sample_every_s`` the main thread samples RSS (``/proc/self/status`` VmRSS; VmHWM, reset through
``/proc/self/clear_refs`` before the store opens, for the peak between samples), open file descriptors
(``/proc/self/fd``), threads (``threading.active_count()`` and the OS count), ops/s and GB/s of the interval and
each tier's used bytes. The report (JSON-able) compares:

- memory: ``overhead = peak RSS - baseline RSS - (memory tiers + write-behind arena)``, the baseline taken just
  before the store opens, against a budget made of the caller's request buffers, the store's per-thread scratch,
  its bookkeeping per block and what malloc keeps of freed get results (:func:`overhead_budget`); the disk tier
  is not in RSS (O_DIRECT I/O bypasses the page cache, and page cache is not RSS anyway). Beside RSS, what
  malloc has handed out (glibc ``mallinfo2``) at the end against the end of warm-up and, after ``close``,
  against before the store opened, and the number of Python objects: these tell a leak from fragmentation;
- file descriptors and threads at the end of warm-up against the end of the run, and after ``close``;
- throughput of the first against the last window (20 % of the run each, one minute for runs of 3 minutes or
  more): ``last / first`` near 1 means no degradation over time.

``python -m tierkv.bench.soak --duration 120 --threads 16``: a progress line per sample, a table at the end, the
report in ``bench-results/soak.json``. Exit status 1 when a get returned wrong bytes, an operation raised
something unexpected, a thread hung, or memory, file descriptors or threads outgrew their bounds; throughput is
reported, never judged by the exit status (shared machines are noisy).
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import math
import os
import random
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

import tierkv
from tierkv._memory import round_up
from tierkv.config import parse_bytes
from tierkv.manager import READ_RUN_NBYTES

from .progress import Progress
from .report import describe_machine, write_json

__all__ = ["run_soak", "default_config", "overhead_budget", "format_summary", "Workload", "main", "FD_SLACK",
           "THREAD_SLACK", "ALLOCATOR_SLACK_BYTES", "ALLOCATOR_CHURN_FACTOR", "BOOKKEEPING_BYTES_PER_BLOCK",
           "HEAP_SLACK_BYTES", "OBJECT_SLACK", "THROUGHPUT_TARGET"]

GB = 1e9
MiB = 1 << 20
VOCAB = 128_256
_WORD_STEP = np.uint64(0x9E3779B97F4A7C15)  # odd: word i of a block differs from word j != i of any block

# Default capacities in blocks: small, so that every tier is full within seconds and blocks fall off the end.
DEFAULT_BLOCKS = {"device": 32, "host": 64, "disk": 256, "writeback": 16}
# The command line's: 384 MiB of memory tiers and write-behind at the default 512 KiB blocks, a 1 GiB disk tier.
CLI_BLOCKS = {"device": 128, "host": 512, "disk": 2048, "writeback": 128}

# Bounds of the checks. Growth is counted from the end of warm-up, when every lazily started thread (I/O pool,
# async lanes, write-behind, torch's intra-op pool) runs and every file is open.
FD_SLACK = 4      # open file descriptors the end of the run may have above the start (or after close, above
                  # before open): the interpreter may open a file now and then (imports, /proc reads)
THREAD_SLACK = 2  # OS threads the end of the run may have above the start
# Memory malloc keeps after it was freed. Every get without ``out`` returns a new buffer of up to a chain of
# blocks that the caller frees soon after ("churn": at most ``threads * (1 + async_depth) * max_chain`` blocks at
# once). glibc raises its mmap threshold to the largest block freed, so after the first such free these buffers come
# from per-thread arenas, which keep the freed memory for reuse, fragmented: 2.0-2.7x the churn measured here
# (16 threads; MALLOC_MMAP_THRESHOLD_=131072 brings it to ~0, at the price of a page fault per 4 KiB of each new
# buffer). The budget allows ALLOCATOR_CHURN_FACTOR times the churn plus ALLOCATOR_SLACK_BYTES for the rest
# (Python objects of the run: futures, exceptions, frames; small buffers).
ALLOCATOR_SLACK_BYTES = 32 * MiB
ALLOCATOR_CHURN_FACTOR = 4
# The store's bookkeeping per block it can hold (Entry and Copy objects, dict and policy slots, the native prefix
# index, the disk tier's maps, lmdb pages): a few hundred bytes measured; 4 KiB is the budget.
BOOKKEEPING_BYTES_PER_BLOCK = 4096
# malloc'd bytes still held at the end of the run (workers gone, store open) above the end of warm-up, and after
# close above before open: caches of torch, numpy and the interpreter; a leak of the blocks of one get per
# operation would be gigabytes.
HEAP_SLACK_BYTES = 16 * MiB
OBJECT_SLACK = 20_000  # objects Python tracks, same comparison: one leaked object per operation is 100k+
THROUGHPUT_TARGET = 0.8  # last/first window ratio shown as PASS (information: never fails the run)

_SCRATCH_THREADS = 3  # store threads beyond the I/O pool that may keep a scratch buffer: two lanes, write-behind


@dataclass(frozen=True)
class Workload:
    """Shape of the requests. Probabilities are per iteration of a worker; what is left over is lookups."""

    system_prompts: int = 8     # shared prefixes (one block chain each), hot: they stay near the top
    system_blocks: int = 2      # blocks of a system prompt
    max_own_blocks: int = 6     # a prompt adds 1..max_own_blocks blocks of its own
    async_depth: int = 2        # futures a worker keeps outstanding (put_async, get_async, prefetch)
    p_put: float = 0.25
    p_get: float = 0.30
    p_put_async: float = 0.08
    p_get_async: float = 0.08
    p_prefetch: float = 0.07
    p_delete: float = 0.05
    reach: float = 0.6          # mean distance back of a get, in prompts, as a share of what all tiers hold

    @property
    def max_chain(self) -> int:
        return self.system_blocks + self.max_own_blocks


def default_config(layout: tierkv.KVLayout, workdir: str | os.PathLike, blocks: dict[str, int] | None = None,
                   **overrides: Any) -> dict[str, Any]:
    """StoreConfig keyword arguments for a soak: device + host + disk (in ``workdir``) + write-behind, sized in
    blocks by ``blocks`` (default ``DEFAULT_BLOCKS``); ``overrides`` win."""
    blocks = DEFAULT_BLOCKS if blocks is None else blocks
    nbytes = layout.block_nbytes
    slot = round_up(nbytes)
    config: dict[str, Any] = dict(device_bytes=blocks["device"] * nbytes, host_bytes=blocks["host"] * nbytes,
                                  disk_path=str(Path(workdir) / "soak-store"), disk_bytes=blocks["disk"] * slot,
                                  writeback_bytes=blocks["writeback"] * slot)
    config.update(overrides)
    return config


def overhead_budget(layout: tierkv.KVLayout, config: tierkv.StoreConfig, threads: int,
                    workload: Workload = Workload()) -> dict[str, int]:
    """What the soak process may hold beyond its baseline and the configured memory (bytes), by component, all
    in chains of ``max_chain`` blocks (``slot``: a block rounded up to 4 KiB):

    - ``requests``: the caller's buffers, ``threads * (4 + 2 * async_depth)`` chains: per worker a source and an
      ``out`` buffer, ``async_depth + 1`` sources for put_async, one get result and ``async_depth`` get_async
      results in flight;
    - ``scratch``: the store's per-thread buffers, ``(threads + io_threads + 3) * (min(READ_RUN_NBYTES, chain of
      slots) + slot)`` (a run of disk slots read in one request, one staging slot; the 3 are the two async lanes
      and the write-behind thread), plus one chain of prefetch rows;
    - ``bookkeeping``: ``BOOKKEEPING_BYTES_PER_BLOCK`` per block all tiers can hold;
    - ``allocator``: ``ALLOCATOR_SLACK_BYTES + ALLOCATOR_CHURN_FACTOR * threads * (1 + async_depth)`` chains:
      freed get results that malloc keeps for reuse (see ALLOCATOR_CHURN_FACTOR).
    """
    nbytes, chain = layout.block_nbytes, workload.max_chain
    slot = round_up(nbytes)
    store_threads = threads + config.io_threads + _SCRATCH_THREADS
    blocks = (config.device_bytes + config.host_bytes) // nbytes + (config.disk_bytes // slot if config.disk_path
                                                                     else 0)
    depth = workload.async_depth
    parts = {
        "requests": threads * (4 + 2 * depth) * chain * nbytes,
        "scratch": store_threads * (min(READ_RUN_NBYTES, chain * slot) + slot) + chain * nbytes,
        "bookkeeping": BOOKKEEPING_BYTES_PER_BLOCK * blocks,
        "allocator": ALLOCATOR_SLACK_BYTES + ALLOCATOR_CHURN_FACTOR * threads * (1 + depth) * chain * nbytes,
    }
    parts["total"] = sum(parts.values())
    return parts


# ------------------------------------------------------------------------------------------------ process probes

def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile (bytes) and Threads from /proc/self/status; empty off Linux."""
    wanted = {"VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"}
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in wanted:
                    parts = value.split()
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _load_mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_mallinfo2 = _load_mallinfo2()


def _heap() -> tuple[int, int]:
    """(bytes malloc has handed out and not had back, bytes it holds free for reuse): glibc only, else (0, 0).

    RSS alone cannot tell a leak from the allocator keeping freed memory: the first grows with what the program
    holds, the second with fragmentation (glibc raises its mmap threshold to the largest block freed, after
    which blocks of a few hundred KiB come from per-thread arenas whose holes it keeps)."""
    if _mallinfo2 is None:
        return 0, 0
    m = _mallinfo2()
    return m.uordblks + m.hblkhd, m.fordblks


def _fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the descriptor listdir itself holds
    except OSError:
        return -1


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so it reports the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _store_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("tierkv-"))


def _probe() -> dict[str, Any]:
    status = _proc_status()
    in_use, free = _heap()
    return {"rss_bytes": status.get("VmRSS", 0), "hwm_bytes": status.get("VmHWM", 0),
            "rss_anon_bytes": status.get("RssAnon", 0), "rss_file_bytes": status.get("RssFile", 0),
            "heap_in_use_bytes": in_use, "heap_free_bytes": free,
            "fds": _fd_count(), "threads_os": status.get("Threads", 0),
            "threads_py": threading.active_count(), "store_threads": len(_store_threads())}


# ------------------------------------------------------------------------------------------------ contents

class Contents:
    """Block bytes as a pure function of the key: 8-byte words ``seed + i * C`` (mod 2**64), ``seed`` the key's
    first 8 bytes. A block of another key differs in every word, a word from another offset differs too."""

    def __init__(self, block_nbytes: int) -> None:
        if block_nbytes % 8:
            raise ValueError(f"expected a layout whose block is a multiple of 8 bytes, got {block_nbytes} bytes")
        self.words = block_nbytes // 8
        self.ramp = np.arange(self.words, dtype=np.uint64) * _WORD_STEP

    @staticmethod
    def _seed(key: bytes) -> np.uint64:
        return np.uint64(int.from_bytes(key[:8], "little"))

    def fill(self, key: bytes, row: np.ndarray) -> None:
        np.add(self.ramp, self._seed(key), out=row.view(np.uint64))

    def same(self, key: bytes, row: np.ndarray, scratch: np.ndarray) -> bool:
        np.add(self.ramp, self._seed(key), out=scratch)
        return bool(np.array_equal(row.view(np.uint64), scratch))


def _rows(blocks: torch.Tensor) -> np.ndarray:
    """``[n, *block_shape]`` blocks as an ``[n, block_nbytes]`` uint8 numpy view (copied to the CPU if needed)."""
    if blocks.device.type != "cpu":
        blocks = blocks.cpu()
    return blocks.reshape(blocks.shape[0], -1).view(torch.uint8).numpy()


class Prompts:
    """Prompt ``i``: system prompt ``i % system_prompts`` then 1..max_own_blocks blocks of its own, its tokens a
    pure function of ``(seed, i)``, so any thread can rebuild any prompt's keys without keeping them."""

    def __init__(self, layout: tierkv.KVLayout, seed: int, workload: Workload) -> None:
        self.block_tokens = layout.block_tokens
        self.seed = seed
        self.workload = workload
        rng = np.random.default_rng([seed, 0x5043])
        self.system = [rng.integers(0, VOCAB, workload.system_blocks * layout.block_tokens, dtype=np.uint32)
                       for _ in range(workload.system_prompts)]
        self._next = 0
        self._lock = threading.Lock()

    def new(self) -> int:
        with self._lock:
            i = self._next
            self._next += 1
            return i

    @property
    def latest(self) -> int:
        return self._next - 1

    def tokens(self, i: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, i])
        own = int(rng.integers(1, self.workload.max_own_blocks + 1))
        return np.concatenate([self.system[i % len(self.system)],
                               rng.integers(0, VOCAB, own * self.block_tokens, dtype=np.uint32)])

    def keys(self, i: int) -> list[bytes]:
        return tierkv.block_keys(self.tokens(i), self.block_tokens)


# ------------------------------------------------------------------------------------------------ workers

_OPS = ("put", "put_async", "get", "get_async", "prefetch", "lookup", "lookup_tokens", "contains", "delete",
        "flush")


@dataclass
class _Counters:
    """One worker's counters; only that worker writes them, the sampler sums them."""

    ops: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_OPS, 0))
    blocks_put: int = 0   # blocks newly stored
    blocks_got: int = 0   # blocks returned by get / get_async and verified
    races: int = 0        # BlockNotFound for a key lookup had promised (evicted or deleted in between)

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())


class _Run:
    """State shared by the workers and the sampler."""

    def __init__(self, store: tierkv.BlockStore, layout: tierkv.KVLayout, prompts: Prompts, workload: Workload,
                 reach_prompts: float, flush_every_s: float) -> None:
        self.store = store
        self.layout = layout
        self.prompts = prompts
        self.workload = workload
        self.contents = Contents(layout.block_nbytes)
        self.reach_prompts = max(1.0, reach_prompts)
        self.flush_every_s = flush_every_s
        self.stop = threading.Event()
        self.counters: list[_Counters] = []
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self.errors: collections.Counter[str] = collections.Counter()
        self.error_samples: list[dict[str, str]] = []
        self.verify_failures = 0
        self.verify_samples: list[dict[str, Any]] = []

    def error(self, op: str, exc: BaseException) -> None:
        name = f"{op}: {type(exc).__name__}"
        with self._lock:
            self.errors[name] += 1
            if len(self.error_samples) < 20:
                self.error_samples.append({"op": op, "error": repr(exc),
                                           "traceback": "".join(traceback.format_exception(exc))[-2000:]})

    def wrong(self, op: str, key: bytes, row: int, thread: str) -> None:
        with self._lock:
            self.verify_failures += 1
            if len(self.verify_samples) < 20:
                self.verify_samples.append({"op": op, "key": key.hex(), "row": row, "thread": thread})

    def flush_due(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._last_flush < self.flush_every_s:
                return False
            self._last_flush = now
            return True

    def totals(self) -> tuple[int, int, int]:
        """(ops, blocks put, blocks got) so far, all workers."""
        ops = put = got = 0
        for c in list(self.counters):
            ops += c.total_ops
            put += c.blocks_put
            got += c.blocks_got
        return ops, put, got


class _Worker:
    def __init__(self, run: _Run, index: int, seed: int) -> None:
        self.run = run
        self.rng = random.Random(seed * 1_000_003 + index)
        self.c = _Counters()
        run.counters.append(self.c)
        self.name = f"soak-worker-{index}"
        self.pending: collections.deque[tuple[str, Future, list[bytes]]] = collections.deque()
        # Per-thread buffers (part of the "requests" budget), allocated by the worker itself.
        self.src: torch.Tensor | None = None
        self.ring: collections.deque[torch.Tensor] = collections.deque()
        self.out: torch.Tensor | None = None
        self.scratch = np.empty(run.contents.words, dtype=np.uint64)

    # -- helpers ------------------------------------------------------------------------------------------------
    def buffer_nbytes(self) -> int:
        """Bytes of the buffers this worker keeps (CPU only: a GPU ``out`` is not in RSS)."""
        kept = [self.src, self.out, *self.ring]
        return sum(t.numel() * t.element_size() for t in kept if t is not None and t.device.type == "cpu")

    def _chain_buffer(self, device: torch.device | str = "cpu") -> torch.Tensor:
        layout = self.run.layout
        return torch.empty((self.run.workload.max_chain, *layout.block_shape), dtype=layout.dtype, device=device)

    def _blocks(self, keys: list[bytes], for_async: bool = False) -> torch.Tensor:
        """The blocks of ``keys`` in one of this worker's source buffers. A put_async's blocks must not change
        until its future is done: those rotate through ``async_depth + 1`` buffers, and a worker never has more
        than ``async_depth`` futures outstanding, so a buffer comes back only after its put finished (an engine
        puts from its own KV buffers; allocating per put would measure malloc instead)."""
        if for_async:
            if len(self.ring) <= self.run.workload.async_depth:
                self.ring.append(self._chain_buffer())
            else:
                self.ring.rotate(-1)  # the least recently used buffer to the end
            source = self.ring[-1]
        else:
            if self.src is None:
                self.src = self._chain_buffer()
            source = self.src
        blocks = source[:len(keys)]
        rows = _rows(blocks)
        for key, row in zip(keys, rows):
            self.run.contents.fill(key, row)
        return blocks

    def _check(self, op: str, keys: list[bytes], got: torch.Tensor) -> None:
        rows = _rows(got)
        for i, key in enumerate(keys):
            if not self.run.contents.same(key, rows[i], self.scratch):
                self.run.wrong(op, key, i, self.name)
        self.c.blocks_got += len(keys)

    def _older(self) -> int:
        """A prompt put earlier: the distance back is exponential, so hits come from every tier (and beyond)."""
        latest = self.run.prompts.latest
        return max(0, latest - int(self.rng.expovariate(1.0 / self.run.reach_prompts)))

    def _new_chain(self) -> list[bytes]:
        return self.run.prompts.keys(self.run.prompts.new())

    # -- operations ---------------------------------------------------------------------------------------------
    def _put(self) -> None:
        keys = self._new_chain() if self.rng.random() < 0.8 else self.run.prompts.keys(self._older())
        self.c.blocks_put += self.run.store.put(keys, self._blocks(keys))
        self.c.ops["put"] += 1

    def _get(self) -> None:
        store = self.run.store
        keys = self.run.prompts.keys(self._older())
        n = store.lookup(keys)
        self.c.ops["lookup"] += 1
        if not n:
            return
        keys = keys[:n]
        if self.rng.random() < 0.5:
            got = store.get(keys)
        else:
            if self.out is None:
                self.out = self._chain_buffer(store.device)
            got = store.get(keys, out=self.out[:n])
        self.c.ops["get"] += 1
        self._check("get", keys, got)

    def _submit(self, kind: str) -> None:
        store = self.run.store
        if kind == "put_async":
            keys = self._new_chain()
            future: Future = store.put_async(keys, self._blocks(keys, for_async=True))
        else:
            keys = self.run.prompts.keys(self._older())
            if kind == "get_async":
                n = store.lookup(keys)
                self.c.ops["lookup"] += 1
                if not n:
                    return
                keys = keys[:n]
                future = store.get_async(keys)
            else:
                future = store.prefetch(keys)
        self.pending.append((kind, future, keys))
        while len(self.pending) > self.run.workload.async_depth:
            self._resolve()

    def _resolve(self) -> None:
        kind, future, keys = self.pending.popleft()
        try:
            result = future.result(timeout=120)  # a deadlock shows as a hung worker, never as a silent wait
            self.c.ops[kind] += 1
            if kind == "put_async":
                self.c.blocks_put += result
            elif kind == "get_async":
                self._check("get_async", keys, result)
            else:  # prefetch: now get what it brought up, as an engine would
                self._get_keys(keys)
        except tierkv.BlockNotFound:
            self.c.races += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
            self.run.error(kind, exc)

    def _get_keys(self, keys: list[bytes]) -> None:
        store = self.run.store
        n = store.lookup(keys)
        self.c.ops["lookup"] += 1
        if n:
            got = store.get(keys[:n])
            self.c.ops["get"] += 1
            self._check("get", keys[:n], got)

    def _lookup(self) -> None:
        store, prompts = self.run.store, self.run.prompts
        i = self._older()
        if self.rng.random() < 0.5:
            store.lookup_tokens(prompts.tokens(i))
            self.c.ops["lookup_tokens"] += 1
        else:
            _ = prompts.keys(i)[-1] in store
            self.c.ops["contains"] += 1

    def _delete(self) -> None:
        keys = self.run.prompts.keys(self._older())
        tail = self.rng.randrange(self.run.workload.system_blocks, len(keys))  # never the shared system prompt
        self.run.store.delete(keys[tail:])
        self.c.ops["delete"] += 1

    # -- loop ---------------------------------------------------------------------------------------------------
    def __call__(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug of the driver: in the report, not only on stderr
            self.run.error("worker", exc)

    def _loop(self) -> None:
        w = self.run.workload
        table = [(w.p_put, "put", self._put), (w.p_get, "get", self._get),
                 (w.p_put_async, "put_async", lambda: self._submit("put_async")),
                 (w.p_get_async, "get_async", lambda: self._submit("get_async")),
                 (w.p_prefetch, "prefetch", lambda: self._submit("prefetch")),
                 (w.p_delete, "delete", self._delete)]
        while not self.run.stop.is_set():
            op, action = "lookup", self._lookup
            r = self.rng.random()
            for p, name, fn in table:
                if r < p:
                    op, action = name, fn
                    break
                r -= p
            if self.run.flush_due():
                op, action = "flush", self.run.store.flush
            try:
                action()
                if op == "flush":
                    self.c.ops["flush"] += 1
            except tierkv.BlockNotFound:
                self.c.races += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported, the soak goes on
                self.run.error(op, exc)
        while self.pending:
            self._resolve()


# ------------------------------------------------------------------------------------------------ the run

def run_soak(layout: tierkv.KVLayout, config_kwargs: dict[str, Any] | None = None, *, threads: int,
             duration_s: float, workdir: str | os.PathLike, seed: int = 0, progress: Any = None,
             sample_every_s: float = 1.0, warmup_s: float | None = None, flush_every_s: float | None = None,
             workload: Workload = Workload(), join_timeout_s: float = 120.0) -> dict[str, Any]:
    """Run ``threads`` workers on one store for ``duration_s`` seconds; return the report (JSON-able).

    ``config_kwargs``: StoreConfig keyword arguments over :func:`default_config` (device + host + disk in
    ``workdir``). ``progress``: an object with ``step(message)`` (a :class:`Progress`), called once per sample.
    ``warmup_s`` (default 10 % of the run, 2 samples at least, 30 s at most): growth of file descriptors and
    threads is counted from its end. ``flush_every_s`` (default a fifth of the run, 30 s at most): the interval
    between flushes. The report's ``failures`` lists what went wrong (empty: the soak passed); its ``checks``
    each bound with its figure.
    """
    if threads < 1 or duration_s <= 0 or sample_every_s <= 0:
        raise ValueError(f"expected threads >= 1, duration_s > 0 and sample_every_s > 0, got {threads}, "
                         f"{duration_s} and {sample_every_s}")
    config = tierkv.StoreConfig(**default_config(layout, workdir, **(config_kwargs or {})))
    warmup_s = min(max(2 * sample_every_s, 0.1 * duration_s), 30.0) if warmup_s is None else warmup_s
    flush_every_s = min(duration_s / 5, 30.0) if flush_every_s is None else flush_every_s
    window_s = 60.0 if duration_s >= 180 else 0.2 * duration_s

    gc.collect()
    before = _probe()  # also the baseline: nothing of the store exists yet
    peak_reset = _reset_peak_rss()
    baseline_rss = _proc_status().get("VmRSS", before["rss_bytes"])
    started_at = time.time()
    store = tierkv.BlockStore(layout, config)
    run: _Run | None = None
    try:
        prompts = Prompts(layout, seed, workload)
        tier_blocks = {t["name"]: t["capacity_blocks"] for t in store.tier_info()}
        total_blocks = sum(tier_blocks.values())
        mean_chain = workload.max_own_blocks / 2 + 0.5  # own blocks per prompt; system prompts are shared
        run = _Run(store, layout, prompts, workload, workload.reach * total_blocks / mean_chain, flush_every_s)
        prefill_s = _prefill(run, total_blocks)
        stats0 = store.stats()

        workers = [_Worker(run, i, seed) for i in range(threads)]
        pool = [threading.Thread(target=w, name=w.name, daemon=True) for w in workers]
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        samples.append(_sample(run, 0.0, (0, 0, 0), 0.0))
        for t in pool:
            t.start()
        stalls, objects_start = _sample_loop(run, samples, t0, duration_s, sample_every_s, warmup_s, progress)
        run.stop.set()
        hung = _join(pool, join_timeout_s)
        run_s = time.monotonic() - t0
        caller_buffers = sum(w.buffer_nbytes() for w in workers)
        if not hung:
            samples.append(_sample(run, run_s, samples[-1]["cumulative"], samples[-1]["t_s"], final=True))
            final_check = _final_check(run)
        else:
            final_check = {"skipped": "threads hung"}
        gc.collect()
        idle = _probe()
        idle["python_objects"] = len(gc.get_objects())
        stats1 = store.stats()
    except BaseException:  # interrupted (or a bug here): stop the workers, then close
        if run is not None:
            run.stop.set()
        _close(store, join_timeout_s)
        raise
    closed, close_s = False, None
    device = store.device
    if not hung:  # close() would wait for the hung calls
        start = time.perf_counter()
        closed = _close(store, join_timeout_s)
        close_s = time.perf_counter() - start
        # Drop what this function still holds (the workers' buffers, the closed store with its per-thread scratch),
        # so that what malloc still hands out after close is what the store left behind.
        del workers, pool, store
        run.store = None  # type: ignore[assignment]
    gc.collect()
    after = _probe()
    after_threads = _store_threads()
    return _report(layout, config, threads, duration_s, sample_every_s, warmup_s, window_s, flush_every_s,
                   workload, seed, started_at, before, baseline_rss, peak_reset, prefill_s, samples, stats0, stats1,
                   run, hung, stalls, final_check, idle, after, after_threads, closed, close_s, device, objects_start,
                   caller_buffers)


def _prefill(run: _Run, total_blocks: int) -> float:
    """Put new prompts until their blocks could fill every tier and then some, so the soak starts at full
    pressure (blocks already falling off the disk tier)."""
    start = time.perf_counter()
    filler = _Worker(run, -1, 0)
    run.counters.remove(filler.c)
    stored = 0
    while stored < total_blocks * 5 // 4:
        keys = run.prompts.keys(run.prompts.new())
        stored += run.store.put(keys, filler._blocks(keys))
    run.store.drain()
    return time.perf_counter() - start


def _sample(run: _Run, t: float, previous: tuple[int, int, int], previous_t: float,
            final: bool = False) -> dict[str, Any]:
    cumulative = run.totals()
    dt = max(t - previous_t, 1e-9)
    nbytes = run.layout.block_nbytes
    stats = run.store.stats()
    # CPU seconds of the whole process (all threads) and the load average: on a shared machine ops/s falls when
    # other processes take the cores, ops per CPU second does not.
    sample = {"t_s": t, **_probe(), "cumulative": cumulative, "cpu_s": time.process_time(),
              "loadavg_1m": os.getloadavg()[0],
              "ops_per_s": (cumulative[0] - previous[0]) / dt if t else 0.0,
              "gb_per_s": ((cumulative[1] - previous[1]) + (cumulative[2] - previous[2])) * nbytes / GB / dt
              if t else 0.0,
              "blocks": stats.blocks, "pending_writes": stats.pending_writes,
              "used_bytes": {name: s.used_bytes for name, s in stats.tiers.items()},
              "used_share": {name: s.used_blocks / s.capacity_blocks for name, s in stats.tiers.items()}}
    if final:
        sample["final"] = True
    return sample


def _sample_loop(run: _Run, samples: list[dict[str, Any]], t0: float, duration_s: float, every_s: float,
                 warmup_s: float, progress: Any) -> tuple[list[dict[str, Any]], int]:
    """Sample until ``duration_s``; returns the stalls (no operation finished for 30 s), each with the threads'
    stacks, and how many objects Python's garbage collector tracked at the end of warm-up."""
    stalls: list[dict[str, Any]] = []
    objects_start = -1
    last_progress = time.monotonic()
    n = 1
    while True:
        target = t0 + min(n * every_s, duration_s)
        time.sleep(max(0.0, target - time.monotonic()))
        t = time.monotonic() - t0
        prev = samples[-1]
        sample = _sample(run, t, prev["cumulative"], prev["t_s"])
        samples.append(sample)
        if objects_start < 0 and t >= warmup_s - 1e-6:
            objects_start = sample["python_objects"] = len(gc.get_objects())
        if sample["cumulative"][0] > prev["cumulative"][0]:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > 30 and len(stalls) < 3:
            stalls.append({"t_s": t, "stacks": _stacks()})
            last_progress = time.monotonic()
        if progress is not None:
            progress.step(_progress_line(sample))
        if t >= duration_s - 1e-6:
            return stalls, objects_start
        n += 1


def _progress_line(s: dict[str, Any]) -> str:
    used = " ".join(f"{name} {share:4.0%}" for name, share in s["used_share"].items())
    return (f"t={s['t_s']:5.0f}s {s['ops_per_s']:7.0f} ops/s {s['gb_per_s']:5.2f} GB/s rss "
            f"{s['rss_bytes'] / MiB:6.0f} MiB fds {s['fds']} threads {s['threads_os']} | {used}")


def _stacks(only: set[int] | None = None) -> dict[str, str]:
    names = {t.ident: t.name for t in threading.enumerate()}
    return {names.get(ident, str(ident)): "".join(traceback.format_stack(frame))[-3000:]
            for ident, frame in sys._current_frames().items() if only is None or ident in only}


def _join(pool: list[threading.Thread], timeout_s: float) -> dict[str, str]:
    """Join the workers; the stacks of those still running after ``timeout_s`` (a deadlock, or a lost wake-up)."""
    deadline = time.monotonic() + timeout_s
    for t in pool:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = {t.ident for t in pool if t.is_alive()}
    return _stacks(alive) if alive else {}


def _final_check(run: _Run) -> dict[str, Any]:
    """With the workers gone: every block of the last prompts that ``lookup`` reports is returned right."""
    run.store.drain()
    checker = _Worker(run, -2, 0)
    checked = races = 0
    latest = run.prompts.latest
    for i in range(max(0, latest - 63), latest + 1):
        keys = run.prompts.keys(i)
        n = run.store.lookup(keys)
        if n:
            try:
                checker._check("final", keys[:n], run.store.get(keys[:n]))
                checked += n
            except tierkv.BlockNotFound:
                races += 1  # nothing runs now: a promised block that cannot be read is a failure
    run.counters.remove(checker.c)
    return {"prompts": min(64, latest + 1), "blocks_checked": checked, "not_found": races}


def _close(store: tierkv.BlockStore, timeout_s: float) -> bool:
    """Close the store on a helper thread; False when it did not finish within ``timeout_s``."""
    done = threading.Thread(target=store.close, name="soak-close", daemon=True)
    done.start()
    done.join(timeout_s)
    return not done.is_alive()


# ------------------------------------------------------------------------------------------------ report

def _window_rates(samples: list[dict[str, Any]], window_s: float, nbytes: int) -> dict[str, Any]:
    """Ops/s and GB/s over the first and the last ``window_s`` of the run, from the cumulative counters at the
    sample nearest each window's inner edge."""
    end = samples[-1]
    first = min(samples[1:], key=lambda s: abs(s["t_s"] - window_s), default=end)
    last = min(samples[:-1], key=lambda s: abs(s["t_s"] - (end["t_s"] - window_s)), default=samples[0])

    def rate(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        dt = max(b["t_s"] - a["t_s"], 1e-9)
        ops = b["cumulative"][0] - a["cumulative"][0]
        blocks = (b["cumulative"][1] - a["cumulative"][1]) + (b["cumulative"][2] - a["cumulative"][2])
        cpu = b["cpu_s"] - a["cpu_s"]
        return {"from_s": a["t_s"], "to_s": b["t_s"], "ops": ops, "ops_per_s": ops / dt,
                "gb_per_s": blocks * nbytes / GB / dt, "cpu_share": cpu / dt,
                "ops_per_cpu_s": ops / cpu if cpu > 0 else None,
                "loadavg_1m": max(s["loadavg_1m"] for s in samples if a["t_s"] <= s["t_s"] <= b["t_s"])}

    first_rate, last_rate = rate(samples[0], first), rate(last, end)
    return {"window_s": window_s, "first": first_rate, "last": last_rate,
            "ratio_ops": last_rate["ops_per_s"] / first_rate["ops_per_s"] if first_rate["ops_per_s"] else None,
            "ratio_gb": last_rate["gb_per_s"] / first_rate["gb_per_s"] if first_rate["gb_per_s"] else None,
            "ratio_ops_per_cpu_s": (last_rate["ops_per_cpu_s"] / first_rate["ops_per_cpu_s"]
                                    if first_rate["ops_per_cpu_s"] and last_rate["ops_per_cpu_s"] else None)}


def _report(layout, config, threads, duration_s, sample_every_s, warmup_s, window_s, flush_every_s, workload, seed,
            started_at, before, baseline_rss, peak_reset, prefill_s, samples, stats0, stats1, run, hung, stalls,
            final_check, idle, after, after_threads, closed, close_s, device, objects_start,
            caller_buffers) -> dict[str, Any]:
    nbytes = layout.block_nbytes
    slot = round_up(nbytes)
    device_in_rss = device.type == "cpu"
    writeback_arena = (min(config.writeback_bytes // slot, config.disk_bytes // slot) * slot
                       if config.disk_path and config.writeback_bytes >= slot else 0)
    memory = (config.device_bytes if device_in_rss else 0) + config.host_bytes
    running = [s for s in samples if not s.get("final")]
    sampled_peak = max(max(s["rss_bytes"] for s in samples), idle["rss_bytes"])
    peak = max(sampled_peak, idle["hwm_bytes"]) if peak_reset else sampled_peak
    budget = overhead_budget(layout, config, threads, workload)
    overhead = peak - baseline_rss - memory - writeback_arena

    start = next((s for s in running if s["t_s"] >= warmup_s - 1e-6), running[-1])
    end = samples[-1]
    post = [s for s in samples if s["t_s"] >= start["t_s"]]

    def counts(name: str) -> dict[str, int]:
        return {"before_open": before[name], "start": start[name], "end": end[name],
                "max": max(s[name] for s in post), "idle": idle[name], "after_close": after[name],
                "growth": end[name] - start[name], "max_growth": max(s[name] for s in post) - start[name]}

    fds, threads_os, threads_py = counts("fds"), counts("threads_os"), counts("threads_py")
    ops = collections.Counter()
    races = blocks_put = blocks_got = 0
    for c in run.counters:
        ops.update(c.ops)
        races += c.races
        blocks_put += c.blocks_put
        blocks_got += c.blocks_got
    throughput = _window_rates(running, window_s, nbytes)
    hits = {name: stats1.tiers[name].hits - stats0.tiers[name].hits for name in stats1.tiers}
    store_errors = {name: {k: getattr(t, k) for k in ("corrupt", "failed_writes", "failed_reads") if getattr(t, k)}
                    for name, t in stats1.tiers.items()}
    store_errors = {k: v for k, v in store_errors.items() if v}

    checks = {
        "memory": {"figure": overhead, "bound": budget["total"], "ok": overhead <= budget["total"]},
        "fds": {"figure": fds["max_growth"], "bound": FD_SLACK, "ok": fds["max_growth"] <= FD_SLACK},
        "fds_after_close": {"figure": after["fds"] - before["fds"], "bound": FD_SLACK,
                            "ok": closed and after["fds"] - before["fds"] <= FD_SLACK},
        "threads": {"figure": threads_os["max_growth"], "bound": THREAD_SLACK,
                    "ok": threads_os["max_growth"] <= THREAD_SLACK and threads_py["max_growth"] <= THREAD_SLACK},
        "threads_after_close": {"figure": after_threads, "bound": [],
                                "ok": closed and not after_threads and after["threads_py"] <= before["threads_py"]},
        # Held, not kept free: what the run still holds at its end with the workers gone, against the end of
        # warm-up (a leak while the store is open) and, once closed, against before it opened.
        "python_objects": {"figure": idle["python_objects"] - objects_start, "bound": OBJECT_SLACK,
                           "ok": idle["python_objects"] - objects_start <= OBJECT_SLACK},
    }
    if _mallinfo2 is not None:
        held_open = idle["heap_in_use_bytes"] - start["heap_in_use_bytes"]
        held_closed = after["heap_in_use_bytes"] - before["heap_in_use_bytes"]
        checks["heap_open"] = {"figure": held_open, "bound": HEAP_SLACK_BYTES, "ok": held_open <= HEAP_SLACK_BYTES}
        checks["heap_after_close"] = {"figure": held_closed, "bound": HEAP_SLACK_BYTES,
                                      "ok": closed and held_closed <= HEAP_SLACK_BYTES}
    failures = [f"{name}: {c['figure']} over the bound {c['bound']}" for name, c in checks.items() if not c["ok"]]
    if run.verify_failures:
        failures.append(f"{run.verify_failures} blocks returned with wrong bytes, e.g. {run.verify_samples[:3]}")
    if run.errors:
        failures.append(f"unexpected exceptions: {dict(run.errors)}")
    if hung:
        failures.append(f"{len(hung)} threads still running long after the end: {sorted(hung)}")
    if stalls:
        failures.append(f"no operation finished for 30 s ({len(stalls)} times)")
    if store_errors:
        failures.append(f"store counted corrupt blocks or failed I/O: {store_errors}")
    if final_check.get("not_found"):
        failures.append(f"after the run, {final_check['not_found']} prompts that lookup reported could not be read")
    if not closed:
        failures.append("close() did not finish")
    tp = throughput
    checks["throughput"] = {"figure": tp["ratio_ops"], "bound": THROUGHPUT_TARGET, "info": True,
                            "ok": tp["ratio_ops"] is not None and tp["ratio_ops"] >= THROUGHPUT_TARGET}

    return {
        "benchmark": "tierkv.bench.soak",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "units": "bytes are bytes (MiB = 2**20 in the table), GB/s = 1e9 payload bytes per second of blocks "
                 "newly put plus blocks returned by get; times in seconds",
        "config": {"layout": layout.to_dict(), "block_nbytes": nbytes, "threads": threads, "duration_s": duration_s,
                   "sample_every_s": sample_every_s, "warmup_s": warmup_s, "flush_every_s": flush_every_s,
                   "seed": seed, "workload": asdict(workload), "store": asdict(config), "device": str(device),
                   "tier_blocks": {name: s.capacity_blocks for name, s in stats1.tiers.items()}},
        "machine": describe_machine(),
        "prefill_s": prefill_s,
        "run_s": samples[-1]["t_s"],
        "close_s": close_s,
        "memory": {"baseline_rss_bytes": baseline_rss, "peak_rss_bytes": peak, "sampled_peak_rss_bytes": sampled_peak,
                   "peak_from_vmhwm": peak_reset, "rss_idle_bytes": idle["rss_bytes"],
                   "rss_after_close_bytes": after["rss_bytes"],
                   "capacity": {"device_bytes": config.device_bytes, "device_in_rss": device_in_rss,
                                "host_bytes": config.host_bytes, "writeback_arena_bytes": writeback_arena,
                                "memory_bytes": memory + writeback_arena, "disk_bytes": config.disk_bytes},
                   "peak_minus_baseline_bytes": peak - baseline_rss,
                   "heap": {"available": _mallinfo2 is not None,
                            **{f"{name}_{kind}_bytes": probe[f"heap_{kind}_bytes"]
                               for name, probe in (("before_open", before), ("start", start), ("end", end),
                                                   ("idle", idle), ("after_close", after))
                               for kind in ("in_use", "free")},
                            "note": "in use: what malloc has handed out (memory tiers, arenas and buffers included); "
                                    "free: what it keeps for reuse. A leak grows the first, fragmentation the "
                                    "second"},
                   "overhead_bytes": overhead, "budget": budget,
                   # part of "requests": the source, out and put_async buffers the workers keep (an engine's own
                   # KV buffers), so overhead - caller_buffers is what the store and the allocator added
                   "caller_buffers_bytes": caller_buffers,
                   "formula": "overhead = peak RSS - baseline RSS - (device_bytes on CPU + host_bytes + write-behind "
                              "arena); budget = requests + scratch + bookkeeping + allocator (see overhead_budget)",
                   "note": "the disk tier is not in RSS: O_DIRECT bypasses the page cache, and page cache is never "
                           "RSS; lmdb's mapped index pages count as RssFile"},
        "python_objects": {"start": objects_start, "idle": idle["python_objects"]},
        "fds": fds, "threads_os": threads_os, "threads_py": threads_py,
        "store_threads_after_close": after_threads,
        "throughput": throughput,
        "ops": dict(ops), "ops_total": sum(ops.values()), "blocks_put": blocks_put, "blocks_got": blocks_got,
        "bytes_put": blocks_put * nbytes, "bytes_got": blocks_got * nbytes, "races": races,
        "hits": hits, "stats": stats1.as_dict() | {"latency": None},
        "errors": dict(run.errors), "error_samples": run.error_samples,
        "verify_failures": run.verify_failures, "verify_samples": run.verify_samples,
        "final_check": final_check, "hung": hung, "stalls": stalls, "closed": closed,
        "checks": checks, "failures": failures, "passed": not failures,
        "samples": samples,
    }


# ------------------------------------------------------------------------------------------------ command line

def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def format_summary(report: dict[str, Any]) -> str:
    """The soak's figures as an aligned table: figure, check (PASS/FAIL; BELOW for throughput, information only),
    value."""
    m, tp, cap = report["memory"], report["throughput"], report["memory"]["capacity"]
    checks = report["checks"]

    def verdict(name: str) -> str:
        c = checks[name]
        return ("PASS" if c["ok"] else "BELOW") if c.get("info") else ("PASS" if c["ok"] else "FAIL")

    dev = f"device {_mib(cap['device_bytes'])} + " if cap["device_in_rss"] else ""
    f, to, tp_ = report["fds"], report["threads_os"], report["threads_py"]
    ratio = "n/a" if tp["ratio_ops"] is None else f"{tp['ratio_ops']:.2f}"
    ratio_gb = "n/a" if tp["ratio_gb"] is None else f"{tp['ratio_gb']:.2f}"
    ratio_cpu = "n/a" if tp["ratio_ops_per_cpu_s"] is None else f"{tp['ratio_ops_per_cpu_s']:.2f}"

    def window(w: dict[str, Any]) -> str:
        per_cpu = "n/a" if w["ops_per_cpu_s"] is None else f"{w['ops_per_cpu_s']:.0f}"
        return (f"{w['ops_per_s']:.0f} ops/s, {w['gb_per_s']:.2f} GB/s; {per_cpu} ops per CPU second, "
                f"{w['cpu_share']:.2f} cores used, load average up to {w['loadavg_1m']:.1f}")
    hits = " / ".join(f"{n} {h}" for n, h in report["hits"].items())
    h = m["heap"]
    heap = (f"{_mib(h['before_open_in_use_bytes'])} -> {_mib(h['idle_in_use_bytes'])} -> "
            f"{_mib(h['after_close_in_use_bytes'])} (kept free at the end: {_mib(h['end_free_bytes'])})"
            if h["available"] else "n/a (not glibc)")
    rows = [
        ("baseline RSS (before open)", _mib(m["baseline_rss_bytes"]), ""),
        ("peak RSS", _mib(m["peak_rss_bytes"]), ""),
        ("memory capacities", f"{_mib(cap['memory_bytes'])} ({dev}host {_mib(cap['host_bytes'])} + write-behind "
                              f"{_mib(cap['writeback_arena_bytes'])})", ""),
        ("overhead = peak - baseline - capacities",
         f"{_mib(m['overhead_bytes'])} (budget {_mib(m['budget']['total'])}), of which the workers' own buffers "
         f"{_mib(m['caller_buffers_bytes'])}", verdict("memory")),
        ("malloc in use: before open -> idle -> closed", heap,
         ("PASS" if checks["heap_open"]["ok"] and checks["heap_after_close"]["ok"] else "FAIL")
         if "heap_open" in checks else ""),
        ("Python objects end of warm-up -> end", f"{report['python_objects']['start']} -> "
                                                  f"{report['python_objects']['idle']}", verdict("python_objects")),
        ("open fds start -> end (max)", f"{f['start']} -> {f['end']} ({f['max']}), after close {f['after_close']} "
                                       f"(before open {f['before_open']})", verdict("fds")),
        ("OS threads start -> end (max)", f"{to['start']} -> {to['end']} ({to['max']}), after close "
                                         f"{to['after_close']}", verdict("threads")),
        ("Python threads start -> end", f"{tp_['start']} -> {tp_['end']}, after close {tp_['after_close']} "
                                       f"(before open {tp_['before_open']})", verdict("threads_after_close")),
        (f"throughput first {tp['window_s']:.0f} s", window(tp["first"]), ""),
        (f"throughput last {tp['window_s']:.0f} s", window(tp["last"]), ""),
        ("last / first", f"{ratio} (ops/s), {ratio_gb} (GB/s), {ratio_cpu} (ops per CPU second)",
         verdict("throughput")),
        ("operations", f"{report['ops_total']} ({', '.join(f'{k} {v}' for k, v in report['ops'].items() if v)})", ""),
        ("blocks put / got (verified)", f"{report['blocks_put']} / {report['blocks_got']}", ""),
        ("hits by tier", hits, ""),
        ("races (evicted after lookup)", str(report["races"]), ""),
        ("errors / wrong blocks / hung", f"{sum(report['errors'].values())} / {report['verify_failures']} / "
                                         f"{len(report['hung'])}",
         "PASS" if not (report["errors"] or report["verify_failures"] or report["hung"]) else "FAIL"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a.ljust(width)}  {c or '':5}  {b}".rstrip() for a, b, c in rows)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierkv bench soak",
                                description="Soak: many threads on one store at full tier pressure; memory, file "
                                            "descriptors, threads and throughput over time.")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load after the prefill (default 120)")
    p.add_argument("--threads", type=int, default=16, help="worker threads (default 16)")
    p.add_argument("--layers", type=int, default=32, help="layers per block (default: 32, Llama-3-8B)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (default: 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default: 128)")
    p.add_argument("--block-tokens", type=int, default=4,
                   help="tokens per block (default: 4, 512 KiB blocks: many operations per second on a few cores)")
    p.add_argument("--dtype", default="bfloat16", help="block dtype name (default: bfloat16)")
    p.add_argument("--device-bytes", default=None, help=f"device tier (default {CLI_BLOCKS['device']} blocks)")
    p.add_argument("--host-bytes", default=None, help=f"host tier (default {CLI_BLOCKS['host']} blocks)")
    p.add_argument("--disk-bytes", default=None, help=f"disk tier (default {CLI_BLOCKS['disk']} blocks)")
    p.add_argument("--writeback-bytes", default=None,
                   help=f"write-behind arena (default {CLI_BLOCKS['writeback']} blocks)")
    p.add_argument("--io-threads", type=int, default=4, help="disk I/O threads (default 4)")
    p.add_argument("--policy", default="lru", help="eviction policy (default lru)")
    p.add_argument("--sample-every", type=float, default=1.0, help="seconds between samples (default 1)")
    p.add_argument("--disk-dir", default=None,
                   help="where the temporary disk-tier directory is made (default: current dir, else /tmp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/soak.json", help="JSON report (default bench-results/soak.json)")
    return p


@contextmanager
def _workdir(parent: str | None) -> Iterator[Path]:
    base = Path(parent) if parent else Path.cwd()
    if not os.access(base, os.W_OK):
        base = Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="tierkv-soak-", dir=base) as d:
        yield Path(d)


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    a = parser.parse_args(argv)
    try:
        layout = tierkv.KVLayout(num_layers=a.layers, num_kv_heads=a.kv_heads, head_dim=a.head_dim,
                                 block_tokens=a.block_tokens, dtype=a.dtype)
        sizes = {name: parse_bytes(value, f"--{name.replace('_', '-')}")
                 for name, value in (("device_bytes", a.device_bytes), ("host_bytes", a.host_bytes),
                                     ("disk_bytes", a.disk_bytes), ("writeback_bytes", a.writeback_bytes))
                 if value is not None}
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if a.threads < 1 or a.duration <= 0 or a.sample_every <= 0:
        parser.error(f"expected --threads >= 1, --duration > 0 and --sample-every > 0, got {a.threads}, "
                     f"{a.duration} and {a.sample_every}")
    out = Path(a.out)
    with _workdir(a.disk_dir) as workdir:
        config = default_config(layout, workdir, CLI_BLOCKS, io_threads=a.io_threads, policy=a.policy, **sizes)
        print(f"tierkv soak: {layout}, {layout.block_nbytes / MiB:.2f} MiB/block, {a.threads} threads, "
              f"{a.duration:.0f} s; device {_mib(config['device_bytes'])}, host {_mib(config['host_bytes'])}, "
              f"disk {_mib(config['disk_bytes'])} in {workdir}, write-behind {_mib(config['writeback_bytes'])}",
              flush=True)
        with Progress(math.ceil(a.duration / a.sample_every)) as progress:
            report = run_soak(layout, config, threads=a.threads, duration_s=a.duration, workdir=workdir, seed=a.seed,
                              progress=progress, sample_every_s=a.sample_every)
    write_json(out, report, default=str)
    print()
    print(format_summary(report))
    print(f"\nprefill {report['prefill_s']:.1f} s, run {report['run_s']:.1f} s, close {report['close_s'] or 0:.1f} s; "
          f"report in {out}")
    if report["failures"]:
        for failure in report["failures"]:
            print(f"!!! {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
