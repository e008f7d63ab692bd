"""Tier bandwidth benchmark (``tierkv bench tiers``): put/get GB/s of each tier beside a ceiling from the same run.

Each tier is measured on its own store and compared with the plainest way to move the same bytes on this
machine, timed in the same run, interleaved with the store's timings and with the same number of repeats
(best of k for both):

- host and device tiers: ``np.copyto`` between two preallocated buffers (``Tensor.copy_`` on a GPU);
- disk tier: raw ``os.pwritev``/``os.preadv`` of one block per call on an O_DIRECT file from a thread pool
  as large as the store's (``io_threads``), ``os.fdatasync`` at the end of the write;
- ``block_keys``: the native path against the pure-Python reference on a 128k-token prompt;
- ``codec``, ``lookup``, ``disk-codec``: quantize/dequantize kernels, ``lookup_tokens`` and the fp8 disk tier
- ``policy``: hit rate of the "relevance" eviction policy against "lru" on a multi-session serving trace
  (see :mod:`tierkv.bench.codec`);
- ``async``: put latency with write-behind against synchronous disk writes, and the share of device->host and
  disk traffic hidden behind a simulated compute stream (see :mod:`tierkv.bench.overlap`).

GB/s counts payload bytes moved once (1 GB = 1e9 bytes), never bytes read plus bytes written. The targets
printed next to each ratio are goals, not assertions: the exit status is nonzero only when a tier returned
different bytes than it was given.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

import tierkv
from tierkv import ops
from tierkv.config import parse_bytes
from tierkv.keys import block_keys_reference, root_key

from .codec import bench_codec, bench_disk_codec, bench_lookup
from .overlap import bench_async
from .policy import bench_policies
from .progress import Progress
from .report import describe_machine, filesystem_of, format_table, verification_status, write_json

__all__ = ["main"]

T = TypeVar("T")

GB = 1e9
ALIGN = 4096                 # O_DIRECT wants buffers, offsets and sizes aligned to the logical block size
SPARE_BLOCKS = 4             # capacity headroom so no measurement ever evicts
VOCAB = 128_256              # Llama-3 vocabulary: token ids in a realistic range
TIERS = ("host", "device", "disk", "keys", "codec", "lookup", "disk-codec", "policy", "async")
TARGETS = {                  # minimum ours/ceiling ratio per (tier, op); None = shown for information
    ("host", "put"): 0.80, ("host", "get_out"): 0.80,
    ("disk", "put"): 0.80, ("disk", "get_out"): 0.80,
}
KEYS_TARGET = 10.0           # native block_keys speed-up over the reference


# --------------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class Options:
    """What to measure; built from the command line by :func:`parse_args`."""

    layout: tierkv.KVLayout
    total_bytes: int          # payload bytes per measurement, rounded down to whole blocks
    threads: int              # store io_threads and raw-ceiling thread count
    repeats: int
    tiers: tuple[str, ...]
    disk_dir: str | None      # parent of the temporary disk directory
    out: Path
    prompt_tokens: int
    seed: int
    trace_requests: int = 1500  # requests in the policy trace

    @property
    def nblocks(self) -> int:
        return self.total_bytes // self.layout.block_nbytes


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierkv bench tiers",
        description="One layout: put/get GB/s of each tier beside memcpy / raw O_DIRECT ceilings from the same run, "
                    "and the component checks (block_keys, codecs, lookup_tokens, policy, write-behind).",
    )
    p.add_argument("--layers", type=int, default=32, help="layers per block (default: 32, Llama-3-8B)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads (default: 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default: 128)")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per block (default: 16)")
    p.add_argument("--dtype", default="bfloat16", help="block dtype name (default: bfloat16)")
    p.add_argument("--total-bytes", default="512MiB",
                   help="payload bytes per measurement, e.g. 512MiB or 2G (default: 512MiB)")
    p.add_argument("--threads", type=int, default=4,
                   help="disk I/O threads, for the store (io_threads) and the raw ceiling (default: 4)")
    p.add_argument("--repeats", type=int, default=5, help="repeats per path; best is reported (default: 5)")
    p.add_argument("--tiers", default=",".join(TIERS),
                   help=f"comma-separated subset of {','.join(TIERS)} (default: all)")
    p.add_argument("--disk-dir", default=None,
                   help="where the temporary disk-tier directory is made (default: current dir, else /tmp)")
    p.add_argument("--prompt-tokens", type=int, default=131072,
                   help="prompt length for the block_keys timing (default: 131072)")
    p.add_argument("--trace-requests", type=int, default=1500,
                   help="requests in the policy trace, replayed under lru and relevance (default: 1500)")
    p.add_argument("--seed", type=int, default=0, help="random seed for block contents and keys")
    p.add_argument("--out", default="bench-results/tier_bench.json",
                   help="JSON results path (default: bench-results/tier_bench.json)")
    return p


def parse_args(argv: list[str] | None) -> Options:
    """Parse and validate; a bad value exits through argparse with 'expected X, got Y'."""
    parser = _build_parser()
    a = parser.parse_args(argv)
    try:
        layout = tierkv.KVLayout(num_layers=a.layers, num_kv_heads=a.kv_heads, head_dim=a.head_dim,
                                 block_tokens=a.block_tokens, dtype=a.dtype)
        total = parse_bytes(a.total_bytes, "--total-bytes")
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    tiers = tuple(t.strip() for t in a.tiers.split(",") if t.strip())
    checks = [
        (total >= layout.block_nbytes, f"expected --total-bytes >= one block ({layout.block_nbytes}), got {total}"),
        (a.threads >= 1, f"expected --threads >= 1, got {a.threads}"),
        (a.repeats >= 1, f"expected --repeats >= 1, got {a.repeats}"),
        (a.prompt_tokens >= layout.block_tokens,
         f"expected --prompt-tokens >= --block-tokens ({layout.block_tokens}), got {a.prompt_tokens}"),
        (a.trace_requests >= 1, f"expected --trace-requests >= 1, got {a.trace_requests}"),
        (bool(tiers) and set(tiers) <= set(TIERS), f"expected --tiers from {','.join(TIERS)}, got {a.tiers!r}"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return Options(layout=layout, total_bytes=total, threads=a.threads, repeats=a.repeats,
                   tiers=tuple(t for t in TIERS if t in tiers), disk_dir=a.disk_dir, out=Path(a.out),
                   prompt_tokens=a.prompt_tokens, seed=a.seed, trace_requests=a.trace_requests)


# --------------------------------------------------------------------------------------------- buffers

def aligned_u8(nbytes: int) -> torch.Tensor:
    """A 1-D uint8 CPU tensor whose first byte is ``ALIGN``-aligned (O_DIRECT refuses unaligned buffers)."""
    base = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    offset = (-base.data_ptr()) % ALIGN
    return base[offset:offset + nbytes]  # the view keeps the over-allocated base alive


def fill_random(buf: torch.Tensor, rng: np.random.Generator) -> None:
    """Fill a 1-D uint8 CPU tensor with random bytes.

    numpy's uint64 generator in 64 MiB chunks: about 6x faster than torch's uint8 ``random_`` (randn for bf16 is
    slower still) and needs no buffer-sized temporary.
    """
    array = buf.numpy()
    chunk = 64 << 20
    for start in range(0, array.size, chunk):
        piece = array[start:start + chunk]
        words = piece.size // 8
        piece[:words * 8].view(np.uint64)[:] = rng.integers(0, 2**64 - 1, size=words, dtype=np.uint64,
                                                             endpoint=True)
        piece[words * 8:] = rng.integers(0, 256, size=piece.size - words * 8, dtype=np.uint8)


@dataclass
class Buffers:
    """Source blocks and a preallocated destination of the same shape ``[n, *block_shape]``.

    On the CPU both are page-aligned, so the raw O_DIRECT ceiling can use them too.
    """

    src: torch.Tensor
    out: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.src.numel() * self.src.element_size()

    def src_u8(self) -> torch.Tensor:
        return self.src.reshape(-1).view(torch.uint8)

    def out_u8(self) -> torch.Tensor:
        return self.out.reshape(-1).view(torch.uint8)

    def to(self, device: torch.device) -> "Buffers":
        """A copy on ``device`` (the GPU device tier reads and writes device memory)."""
        if device.type == "cpu":
            return self
        return Buffers(src=self.src.to(device), out=torch.zeros_like(self.out, device=device))


def make_buffers(layout: tierkv.KVLayout, nblocks: int, rng: np.random.Generator) -> Buffers:
    """Random source blocks and a zeroed (already page-faulted) destination, both on the CPU."""
    nbytes = nblocks * layout.block_nbytes
    src, out = aligned_u8(nbytes), aligned_u8(nbytes)
    fill_random(src, rng)
    out.zero_()  # touch every page now, so no timed copy pays first-touch faults
    shape = (nblocks, *layout.block_shape)
    return Buffers(src=src.view(layout.dtype).view(shape), out=out.view(layout.dtype).view(shape))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (a float compare would call NaN != NaN and -0 == +0)."""
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8).cpu(),
                                              b.reshape(-1).view(torch.uint8).cpu())


# --------------------------------------------------------------------------------------------- timing

def timed(fn: Callable[[], T], device: torch.device | None = None) -> tuple[float, T]:
    """Seconds ``fn`` took, and its result; waits for the GPU so queued work is counted."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PathResult:
    """One measured path: the store's timings beside its ceiling's, both over the same repeats."""

    tier: str
    op: str                   # put | get_out | get_fresh
    label: str                # as shown in the table
    nbytes: int               # payload bytes per repeat
    ceiling: str              # how the ceiling was measured
    target: float | None      # minimum ratio; None marks an informational row
    ours_s: list[float] = field(default_factory=list)
    ceiling_s: list[float] = field(default_factory=list)

    def ours_gbps(self) -> float:
        return self.nbytes / min(self.ours_s) / GB

    def ceiling_gbps(self) -> float:
        return self.nbytes / min(self.ceiling_s) / GB

    def ratio(self) -> float:
        return self.ours_gbps() / self.ceiling_gbps()

    def verdict(self) -> str:
        if self.target is None:
            return "info"
        return "PASS" if self.ratio() >= self.target else "BELOW"

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label, "bytes": self.nbytes,
            "ours_gbps": self.ours_gbps(), "ceiling_gbps": self.ceiling_gbps(), "ratio": self.ratio(),
            "target_ratio": self.target, "result": self.verdict(), "ceiling": self.ceiling,
            "ours_s": self.ours_s, "ceiling_s": self.ceiling_s,
        }

    def row(self) -> tuple[str, ...]:
        target = "-" if self.target is None else f">= {self.target:.0%}"
        return (self.label, f"{self.ours_gbps():.2f}", f"{self.ceiling_gbps():.2f}", f"{self.ratio():.0%}",
                target, self.verdict())


def round_summary(paths: dict[str, PathResult]) -> str:
    """The latest round's figures, for the progress line."""
    put, get = paths["put"], paths["get_out"]
    return f"put {put.nbytes / put.ours_s[-1] / GB:.2f} GB/s, get {get.nbytes / get.ours_s[-1] / GB:.2f} GB/s"


def store_paths(tier: str, nbytes: int, ceiling: str, put_label: str, get_label: str) -> dict[str, PathResult]:
    """The three rows every tier reports: put, get into ``out=``, and get with a fresh allocation."""
    return {
        "put": PathResult(tier, "put", f"{tier} {put_label}", nbytes, ceiling, TARGETS.get((tier, "put"))),
        "get_out": PathResult(tier, "get_out", f"{tier} {get_label} (out=)", nbytes, ceiling,
                              TARGETS.get((tier, "get_out"))),
        # No target: its ratio is informational, the get target is judged on get(out=).
        "get_fresh": PathResult(tier, "get_fresh", f"{tier} {get_label} (fresh)", nbytes, ceiling, None),
    }


# --------------------------------------------------------------------------------------------- store rounds

def fresh_keys(nblocks: int, block_tokens: int, rng: np.random.Generator) -> list[bytes]:
    """Keys no earlier repeat used: the chained keys of a random prompt (a realistic prefix chain)."""
    tokens = rng.integers(0, VOCAB, size=nblocks * block_tokens, dtype=np.uint32)
    return tierkv.block_keys(tokens, block_tokens=block_tokens)


def store_round(store: tierkv.BlockStore, keys: list[bytes], bufs: Buffers, paths: dict[str, PathResult],
                device: torch.device, *, flush: bool, verify: bool,
                before_read: Callable[[], None] = lambda: None) -> list[str]:
    """Time put (+ flush), get(out=) and get() of ``keys`` once; returns verification failures (if asked)."""
    def put() -> None:
        store.put(keys, bufs.src)
        if flush:
            store.flush()

    seconds, _ = timed(put, device)
    paths["put"].ours_s.append(seconds)
    if verify:
        bufs.out.zero_()  # so stale bytes from an earlier tier cannot pass for a correct read
    before_read()
    seconds, got = timed(lambda: store.get(keys, out=bufs.out), device)
    paths["get_out"].ours_s.append(seconds)
    failures = _check_get("get(keys, out=)", got, bufs, expect_out=True) if verify else []
    before_read()
    seconds, fresh = timed(lambda: store.get(keys), device)
    paths["get_fresh"].ours_s.append(seconds)
    if verify:
        failures += _check_get("get(keys)", fresh, bufs, expect_out=False)
    return failures


def _check_get(what: str, got: Any, bufs: Buffers, expect_out: bool) -> list[str]:
    """What is wrong with a get's result: not a tensor, not ``out`` when ``out=`` was given, other bytes."""
    if not isinstance(got, torch.Tensor):
        return [f"{what} returned {type(got).__name__}, expected a Tensor"]
    failures = []
    if expect_out and got.data_ptr() != bufs.out.data_ptr():
        failures.append(f"{what} returned a new tensor instead of filling and returning out")
    if got.dtype != bufs.src.dtype or tuple(got.shape) != tuple(bufs.src.shape):
        failures.append(f"{what} returned {got.dtype} {list(got.shape)}, "
                        f"expected {bufs.src.dtype} {list(bufs.src.shape)}")
    elif not same_bytes(got, bufs.src):
        failures.append(f"{what} returned different bytes than put stored")
    if expect_out and not same_bytes(bufs.out, bufs.src):
        failures.append(f"{what} left different bytes in out than put stored")
    return failures


def store_device(store: tierkv.BlockStore, config: tierkv.StoreConfig) -> torch.device:
    """The device ``get`` returns blocks on: the store's own answer, else the documented rule."""
    device = getattr(store, "device", None)
    if device is not None:
        return torch.device(device)
    use_cuda = torch.cuda.is_available() and config.device_bytes > 0
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


def stats_json(stats: Any) -> Any:
    """``store.stats()`` as plain JSON data, whatever mix of dataclasses, mappings and sequences it is."""
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return {f.name: stats_json(getattr(stats, f.name)) for f in dataclasses.fields(stats)}
    if isinstance(stats, dict):
        return {str(k): stats_json(v) for k, v in stats.items()}
    if isinstance(stats, (list, tuple)):
        return [stats_json(v) for v in stats]
    if isinstance(stats, (bytes, bytearray)):
        return bytes(stats).hex()
    if stats is None or isinstance(stats, (bool, int, float, str)):
        return stats
    if hasattr(stats, "_asdict"):
        return stats_json(stats._asdict())
    return repr(stats)


def count_field(data: Any, name: str) -> int:
    """Sum of every integer field called ``name`` anywhere in JSON data (e.g. evictions of every tier)."""
    if isinstance(data, dict):
        return sum(v if k == name and isinstance(v, int) else count_field(v, name) for k, v in data.items())
    if isinstance(data, list):
        return sum(count_field(v, name) for v in data)
    return 0


def tier_report(paths: dict[str, PathResult], failures: list[str], stats: Any, **extra: Any) -> dict[str, Any]:
    """One tier's JSON section; notes eviction, which would mean the figures measured more than a copy."""
    stats_data = stats_json(stats)
    notes = list(extra.pop("notes", []))
    evictions = count_field(stats_data, "evictions")
    if evictions:
        notes.append(f"{evictions} evictions during the measurement: capacity too small, figures include them")
    dropped = count_field(stats_data, "dropped")
    if dropped:
        notes.append(f"{dropped} blocks dropped off the last tier during the measurement")
    return {**extra, "verified": not failures, "verify_failures": failures, "notes": notes,
            "paths": {op: p.to_json() for op, p in paths.items()}, "stats": stats_data}


# --------------------------------------------------------------------------------------------- memory tiers

def copy_ceiling(bufs: Buffers) -> Callable[[], None]:
    """The plainest copy of the same bytes: ``np.copyto`` on the CPU, ``Tensor.copy_`` on a GPU."""
    if bufs.src.device.type == "cpu":
        src, dst = bufs.src_u8().numpy(), bufs.out_u8().numpy()
        return lambda: np.copyto(dst, src)
    return lambda: bufs.out.copy_(bufs.src)


def bench_memory_tier(tier: str, opts: Options, cpu_bufs: Buffers, rng: np.random.Generator,
                      progress: Progress) -> tuple[dict[str, Any], list[PathResult]]:
    """Host or device tier alone (the other tiers disabled), against a same-size memcpy."""
    layout = opts.layout
    capacity = (opts.nblocks + SPARE_BLOCKS) * layout.block_nbytes
    config = tierkv.StoreConfig(device_bytes=capacity if tier == "device" else 0,
                                host_bytes=capacity if tier == "host" else 0,
                                disk_path=None, io_threads=opts.threads)
    with tierkv.BlockStore(layout, config) as store:
        device = store_device(store, config)
        bufs = cpu_bufs.to(device)
        ceiling = "np.copyto" if device.type == "cpu" else f"Tensor.copy_ on {device}"
        paths = store_paths(tier, bufs.nbytes, ceiling, "put", "get")
        copy = copy_ceiling(bufs)
        failures: list[str] = []
        for r in range(opts.repeats):
            keys = fresh_keys(opts.nblocks, layout.block_tokens, rng)
            failures += store_round(store, keys, bufs, paths, device, flush=False, verify=r == 0)
            # The ceiling runs between the store's rounds, so drift on a shared machine hits both alike.
            seconds, _ = timed(copy, device)
            for p in paths.values():
                p.ceiling_s.append(seconds)
            store.delete(keys)  # free the room for the next repeat's keys without timing an eviction
            progress.step(f"{tier}: {round_summary(paths)}")
        stats = store.stats()
    report = tier_report(paths, failures, stats, device=str(device), capacity_bytes=capacity,
                         blocks=opts.nblocks, ceiling=ceiling)
    return report, list(paths.values())


# --------------------------------------------------------------------------------------------- disk tier

def round_up(n: int, multiple: int = ALIGN) -> int:
    return (n + multiple - 1) // multiple * multiple


def open_direct(path: Path) -> tuple[int, bool]:
    """Open ``path`` for O_DIRECT I/O; ``(fd, False)`` when the filesystem refuses O_DIRECT (EINVAL)."""
    flags = os.O_RDWR | os.O_CREAT
    try:
        fd = os.open(path, flags | os.O_DIRECT, 0o600)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags, 0o600), False
    # Some filesystems accept O_DIRECT at open() and refuse the first I/O: probe with one aligned page.
    try:
        os.pwritev(fd, [aligned_u8(ALIGN).numpy()], 0)
    except OSError as exc:
        os.close(fd)
        if exc.errno != errno.EINVAL:
            raise
        return os.open(path, flags, 0o600), False
    return fd, True


def drop_page_cache(path: str | Path) -> None:
    """Evict a file's (or every file under a directory's) clean pages from the page cache.

    A no-op for O_DIRECT I/O, which bypasses the cache; it keeps a buffered read honest about being cold.
    """
    files = [Path(path)] if Path(path).is_file() else [Path(r, n) for r, _, ns in os.walk(path) for n in ns]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class RawDisk:
    """The disk ceiling: one file, one block-sized ``pwritev``/``preadv`` per call from a thread pool.

    Block ``i`` lives at ``i * slot`` with ``slot`` the block size rounded up to ``ALIGN`` (O_DIRECT sizes and
    offsets must be aligned). The file is preallocated, untimed, like a data file a store keeps.
    """

    def __init__(self, path: Path, slot: int, nblocks: int, threads: int):
        self.path, self.slot, self.nblocks, self.threads = path, slot, nblocks, threads
        self.fd, self.direct = open_direct(path)
        try:
            os.posix_fallocate(self.fd, 0, slot * nblocks)
        except OSError as exc:  # filesystems without fallocate: a sparse file of the right size
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self.fd, slot * nblocks)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tierkv-bench-raw")

    def describe(self) -> str:
        if self.direct:
            return f"raw O_DIRECT pwritev/preadv, 1 block per call, {self.threads} threads, fdatasync after write"
        return (f"raw buffered pwritev/preadv (O_DIRECT refused), {self.threads} threads, fdatasync after write, "
                f"posix_fadvise(DONTNEED) before read")

    def write(self, buf: torch.Tensor) -> None:
        """Write ``nblocks`` slots from an aligned uint8 buffer of ``nblocks * slot`` bytes, then fdatasync."""
        view = memoryview(buf.numpy())
        list(self.pool.map(lambda i: self._io(os.pwritev, view, i), range(self.nblocks)))
        os.fdatasync(self.fd)

    def prepare_read(self) -> None:
        """Make the next read cold (buffered fallback only; O_DIRECT reads never hit the cache)."""
        if not self.direct:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(self, buf: torch.Tensor) -> None:
        """Read every slot into an aligned uint8 buffer of ``nblocks * slot`` bytes."""
        view = memoryview(buf.numpy())
        list(self.pool.map(lambda i: self._io(os.preadv, view, i), range(self.nblocks)))

    def _io(self, op: Callable[[int, list, int], int], view: memoryview, i: int) -> None:
        start = i * self.slot
        done = op(self.fd, [view[start:start + self.slot]], start)
        if done != self.slot:  # a short transfer (full disk, truncated file) would inflate the figure
            raise OSError(errno.EIO, f"{op.__name__} moved {done} of {self.slot} bytes at offset {start}")

    def close(self) -> None:
        self.pool.shutdown()
        os.close(self.fd)

    def __enter__(self) -> "RawDisk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def slot_buffers(bufs: Buffers, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned ``nblocks * slot`` uint8 source and destination for the raw ceiling.

    The benchmark's own buffers when a block is already a whole number of pages (the default layout);
    otherwise slot-strided copies, since O_DIRECT cannot start a transfer mid-page.
    """
    nblocks = bufs.src.shape[0]
    block = bufs.nbytes // nblocks
    if slot == block:
        return bufs.src_u8(), bufs.out_u8()
    src, dst = aligned_u8(nblocks * slot), aligned_u8(nblocks * slot)
    src.view(nblocks, slot)[:, :block].copy_(bufs.src_u8().view(nblocks, block))
    dst.zero_()
    return src, dst


def raw_round(raw: RawDisk, src: torch.Tensor, dst: torch.Tensor, paths: dict[str, PathResult],
              verify: bool) -> list[str]:
    """Time one raw write and one cold raw read; when verifying, check the read saw what was written."""
    seconds, _ = timed(lambda: raw.write(src))
    paths["put"].ceiling_s.append(seconds)
    if verify:
        dst.zero_()
    raw.prepare_read()
    seconds, _ = timed(lambda: raw.read(dst))
    paths["get_out"].ceiling_s.append(seconds)
    paths["get_fresh"].ceiling_s.append(seconds)
    if verify and not torch.equal(src, dst):
        return ["raw ceiling read back different bytes than it wrote (the ceiling itself is broken)"]
    return []


def check_free_space(directory: Path, needed: int) -> None:
    """Refuse to start a disk measurement that would fill the filesystem halfway through."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise OSError(errno.ENOSPC, f"expected {needed} free bytes in {directory} for the disk tier, got {free}")


def bench_disk_tier(opts: Options, cpu_bufs: Buffers, workdir: Path, rng: np.random.Generator,
                    progress: Progress, backend: str = "auto") -> tuple[dict[str, Any], list[PathResult]]:
    """Disk tier alone: put straight to disk + flush, cold get; against raw O_DIRECT of the same bytes."""
    layout = opts.layout
    slot = round_up(layout.block_nbytes)
    disk_bytes = (opts.nblocks + SPARE_BLOCKS) * slot
    store_dir = workdir / "store"
    store_dir.mkdir()
    check_free_space(workdir, disk_bytes + opts.nblocks * slot)
    config = tierkv.StoreConfig(device_bytes=0, host_bytes=0, disk_path=str(store_dir), disk_bytes=disk_bytes,
                                io_threads=opts.threads, disk_backend=backend)
    raw_src, raw_dst = slot_buffers(cpu_bufs, slot)
    with RawDisk(workdir / "raw.bin", slot, opts.nblocks, opts.threads) as raw, \
            tierkv.BlockStore(layout, config) as store:
        device = store_device(store, config)
        bufs = cpu_bufs.to(device)
        paths = store_paths("disk", bufs.nbytes, raw.describe(), "put+flush", "get cold")
        failures: list[str] = []
        for r in range(opts.repeats):
            keys = fresh_keys(opts.nblocks, layout.block_tokens, rng)
            failures += store_round(store, keys, bufs, paths, device, flush=True, verify=r == 0,
                                    before_read=lambda: drop_page_cache(store_dir))
            failures += raw_round(raw, raw_src, raw_dst, paths, verify=r == 0)
            store.delete(keys)
            progress.step(f"disk: {round_summary(paths)}")
        stats = store.stats()
        disk = store.tier_info()[-1]
    o_direct = raw.direct and disk["direct_io"]
    notes = [] if o_direct else ["O_DIRECT was refused: the store and/or the raw ceiling used buffered I/O, made "
                                 "cold with posix_fadvise(DONTNEED)"]
    report = tier_report(paths, failures, stats, device=str(device), capacity_bytes=disk_bytes,
                         blocks=opts.nblocks, o_direct=o_direct, raw_slot_bytes=slot, ceiling=raw.describe(),
                         backend=disk_backend(config, disk["backend"]), filesystem=filesystem_of(workdir),
                         notes=notes)
    return report, list(paths.values())


def disk_backend(config: tierkv.StoreConfig, chosen: str) -> dict[str, Any]:
    """The backend the store chose, what was configured, and why kvikio is (not) usable here."""
    from tierkv.io import backend_status  # late: it probes for the CUDA driver

    return {"configured": config.disk_backend, "chosen": chosen, "status": backend_status()}


@contextmanager
def disk_workdir(parent: str | None) -> Iterator[Path]:
    """A temporary directory for the disk tier and the raw file, removed at the end.

    Under ``parent`` when given, else the current directory (usually on the real disk, where /tmp may be a
    tmpfs without O_DIRECT), else /tmp when the current directory is not writable.
    """
    if parent is None:
        parent = os.getcwd() if os.access(os.getcwd(), os.W_OK) else tempfile.gettempdir()
    with tempfile.TemporaryDirectory(prefix="tierkv-bench-", dir=parent) as path:
        yield Path(path)


# --------------------------------------------------------------------------------------------- block_keys

def time_repeats(fn: Callable[[], T], repeats: int) -> tuple[list[float], T]:
    """All timings of ``repeats`` calls, and the last result."""
    seconds, result = [], None
    for _ in range(repeats):
        s, result = timed(fn)
        seconds.append(s)
    return seconds, result


def bench_block_keys(opts: Options, rng: np.random.Generator, progress: Progress) -> tuple[dict[str, Any], list[str]]:
    """Native ``tierkv.block_keys`` against the pure-Python reference on one long prompt.

    The judged figure takes a uint32 numpy prompt. For information only: the same prompt as a Python list of
    ints (what engines often hold; conversion then dominates both paths) and the native kernel alone (packed
    keys, without building the list of 16-byte ``bytes`` the public function returns).
    """
    bt = opts.layout.block_tokens
    tokens = rng.integers(0, VOCAB, size=opts.prompt_tokens, dtype=np.uint32)
    as_list = tokens.tolist()
    ref_s, ref_keys = time_repeats(lambda: block_keys_reference(tokens, block_tokens=bt), opts.repeats)
    ref_list_s, _ = time_repeats(lambda: block_keys_reference(as_list, block_tokens=bt), opts.repeats)
    report: dict[str, Any] = {"tokens": opts.prompt_tokens, "block_tokens": bt, "keys": len(ref_keys),
                              "native_status": ops.native_status(), "target_speedup": KEYS_TARGET,
                              "reference_s": ref_s, "reference_best_s": min(ref_s),
                              "list_input": {"reference_s": ref_list_s, "reference_best_s": min(ref_list_s)}}
    module = ops.native()
    failures: list[str] = []
    if module is None:
        report.update(native_s=None, native_best_s=None, speedup=None, result="n/a", native_kernel=None,
                      note="native module unavailable: reference only")
        report["list_input"].update(native_s=None, native_best_s=None, speedup=None)
    else:
        nat_s, nat_keys = time_repeats(lambda: tierkv.block_keys(tokens, block_tokens=bt), opts.repeats)
        nat_list_s, nat_list_keys = time_repeats(lambda: tierkv.block_keys(as_list, block_tokens=bt), opts.repeats)
        root = root_key()
        kernel_s, packed = time_repeats(lambda: module.block_keys_packed(tokens, bt, root), opts.repeats)
        if nat_keys != ref_keys or nat_list_keys != ref_keys:
            failures.append("native block_keys differ from block_keys_reference")
        if packed != b"".join(ref_keys):
            failures.append("the native kernel's packed keys differ from block_keys_reference")
        speedup = min(ref_s) / min(nat_s)
        report.update(native_s=nat_s, native_best_s=min(nat_s), speedup=speedup,
                      result="PASS" if speedup >= KEYS_TARGET else "BELOW",
                      native_kernel={"s": kernel_s, "best_s": min(kernel_s), "speedup": min(ref_s) / min(kernel_s)})
        report["list_input"].update(native_s=nat_list_s, native_best_s=min(nat_list_s),
                                    speedup=min(ref_list_s) / min(nat_list_s))
    report.update(verified=not failures, verify_failures=failures)
    progress.step(f"block_keys: {len(ref_keys)} keys")
    return report, failures


def keys_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """Table rows in milliseconds: ours = native, ceiling = reference, ratio = speed-up."""
    def row(label: str, timings: dict[str, Any], target: str, result: str) -> tuple[str, ...]:
        ref = f"{timings['reference_best_s'] * 1e3:.2f}"
        if timings["speedup"] is None:
            return (label, "-", ref, "-", target, "n/a")
        return (label, f"{timings['native_best_s'] * 1e3:.2f}", ref, f"{timings['speedup']:.1f}x", target, result)

    return [row(f"block_keys {report['tokens']} tok (ms)", report, f">= {KEYS_TARGET:g}x", report["result"]),
            row("block_keys list[int] input (ms)", report["list_input"], "-", "info")]


# --------------------------------------------------------------------------------------------- report

HEADER = ("path", "ours GB/s", "ceiling GB/s", "ratio", "target", "result")


def footnotes(opts: Options, results: dict[str, Any]) -> list[str]:
    """How to read the table: units, what each ceiling is, which get the ratio judges."""
    notes = [f"GB/s = 1e9 payload bytes per second, best of {opts.repeats}; each ceiling measured in the same run, "
             f"interleaved with the store.",
             "get ratio and target use store.get(keys, out=preallocated); get(keys) with a fresh allocation "
             "('fresh') is shown for information against the same ceiling."]
    for tier in ("host", "device", "disk"):
        if tier in results["tiers"]:
            notes.append(f"{tier} ceiling: {results['tiers'][tier]['ceiling']}")
    if "keys" in results:
        notes.append("block_keys row: ours = native, ceiling = pure-Python reference, in milliseconds; "
                     "ratio = speed-up.")
        keys = results["keys"]
        if keys["speedup"] is None:
            notes.append(f"block_keys: {keys['native_status']}")
        else:
            kernel = keys["native_kernel"]
            notes.append(f"block_keys native kernel alone (packed keys, no list of bytes): "
                         f"{kernel['best_s'] * 1e3:.2f} ms, {kernel['speedup']:.1f}x the reference.")
    if "codec" in results:
        c = results["codec"]
        notes.append(f"codec rows: ours = native kernel on one thread ({c['isa'] or c['native']}), ceiling column = "
                     f"torch reference on {c['torch_threads']} threads, ratio = speed-up; GB/s of bf16 bytes in "
                     "(quantize) or out (dequantize).")
    if "lookup" in results:
        notes.append("lookup_tokens row in microseconds: ours = store.lookup_tokens (hash + index walk in one "
                     "native call), ceiling column = pure Python (xxhash loop + dict); every block cached.")
    if "disk_codec" in results:
        notes.append("disk fp8 rows: ours = disk tier with disk_codec='fp8', ceiling column = 'none', both "
                     "counting bf16 bytes delivered; cold get judged.")
    if "policy" in results:
        r = results["policy"]
        notes.append(f"policy rows: ours = relevance, ceiling column = lru, same trace ({r['requests']} requests: "
                     "conversations on shared system prompts, document questions, one-off prompts) and capacities; "
                     "hit rate = cached blocks / requested blocks.")
    if "async" in results:
        r = results["async"]
        notes.append(f"async rows: put = {r['batch_blocks']} new blocks into a full host tier (each pushes as many "
                     "to disk), ours = write-behind, ceiling column = writeback_bytes=0, ratio = speed-up; "
                     f"traffic hidden = (C + T - B) / min(C, T) over {r['steps']} engine steps, C = compute alone, "
                     "T = async puts/prefetches alone, B = both (100% = traffic fully hidden).")
    for tier, section in results["tiers"].items():
        notes += [f"{tier}: {n}" for n in section["notes"]]
    return notes


# --------------------------------------------------------------------------------------------- main

def run(opts: Options) -> tuple[dict[str, Any], list[tuple[str, ...]], list[str]]:
    """Every selected measurement: (JSON results, table rows, verification failures)."""
    rng = np.random.default_rng(opts.seed)
    tier_names = [t for t in opts.tiers if t != "keys"]
    results: dict[str, Any] = {"tiers": {}}
    rows: list[tuple[str, ...]] = []
    failures: list[str] = []
    sections = {"keys", "codec", "lookup", "disk-codec", "policy", "async"}
    tier_names = [t for t in tier_names if t not in sections]
    steps = (opts.repeats * len(tier_names) + ("keys" in opts.tiers) + 2 * ("codec" in opts.tiers)
             + ("lookup" in opts.tiers) + opts.repeats * ("disk-codec" in opts.tiers) + 2 * ("policy" in opts.tiers)
             + 3 * ("async" in opts.tiers))
    with Progress(steps) as progress:
        bufs = make_buffers(opts.layout, opts.nblocks, rng) if tier_names else None
        for tier in tier_names:
            if tier == "disk":
                with disk_workdir(opts.disk_dir) as workdir:
                    report, paths = bench_disk_tier(opts, bufs, workdir, rng, progress)
            else:
                report, paths = bench_memory_tier(tier, opts, bufs, rng, progress)
            results["tiers"][tier] = report
            rows += [p.row() for p in paths]
            failures += [f"{tier}: {f}" for f in report["verify_failures"]]
        if "keys" in opts.tiers:
            results["keys"], key_failures = bench_block_keys(opts, rng, progress)
            rows += keys_rows(results["keys"])
            failures += [f"block_keys: {f}" for f in key_failures]
        if "codec" in opts.tiers:
            results["codec"], section_rows, section_failures = bench_codec(opts.layout, opts.repeats, rng, progress)
            rows += section_rows
            failures += [f"codec: {f}" for f in section_failures]
        if "lookup" in opts.tiers:
            results["lookup"], section_rows, section_failures = bench_lookup(
                opts.prompt_tokens, opts.layout.block_tokens, opts.repeats, rng, progress)
            rows += section_rows
            failures += [f"lookup_tokens: {f}" for f in section_failures]
        if "disk-codec" in opts.tiers:
            with disk_workdir(opts.disk_dir) as workdir:
                results["disk_codec"], section_rows, section_failures = bench_disk_codec(
                    opts.layout, opts.nblocks, opts.threads, opts.repeats, workdir, rng, drop_page_cache, progress)
            rows += section_rows
            failures += [f"disk codec: {f}" for f in section_failures]
        if "policy" in opts.tiers:
            results["policy"], section_rows, section_failures = bench_policies(opts.seed, opts.trace_requests, progress)
            rows += section_rows
            failures += [f"policy trace: {f}" for f in section_failures]
        if "async" in opts.tiers:
            with disk_workdir(opts.disk_dir) as workdir:
                results["async"], section_rows, section_failures = bench_async(opts.layout, opts.threads, workdir,
                                                                                rng, progress)
            rows += section_rows
            failures += [f"async: {f}" for f in section_failures]
    return results, rows, failures


def config_json(opts: Options) -> dict[str, Any]:
    return {"layout": opts.layout.to_dict(), "block_shape": list(opts.layout.block_shape),
            "block_nbytes": opts.layout.block_nbytes, "blocks": opts.nblocks,
            "total_bytes": opts.nblocks * opts.layout.block_nbytes, "repeats": opts.repeats,
            "threads": opts.threads, "tiers": list(opts.tiers), "prompt_tokens": opts.prompt_tokens,
            "seed": opts.seed}


def main(argv: list[str] | None = None) -> int:
    """``tierkv bench``: run, print the table, write the JSON. Exit 1 when a tier returned wrong bytes."""
    opts = parse_args(argv)
    layout = opts.layout
    print(f"tierkv bench: {layout}, {layout.block_nbytes / 2**20:.2f} MiB/block, {opts.nblocks} blocks = "
          f"{opts.nblocks * layout.block_nbytes / 2**20:.0f} MiB per measurement, best of {opts.repeats}, "
          f"{opts.threads} I/O threads", flush=True)
    started = time.time()
    results, rows, failures = run(opts)
    duration = time.time() - started
    document = {"benchmark": "tierkv.bench.tier", "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                                              time.localtime(started)),
                "duration_s": duration, "units": "GB/s = 1e9 payload bytes per second; times in seconds",
                "config": config_json(opts), "machine": describe_machine(), **results,
                "verified": not failures, "verify_failures": failures}
    write_json(opts.out, document)
    print()
    print(format_table(HEADER, rows))
    print()
    for note in footnotes(opts, results):
        print(f"  * {note}")
    print(f"\n{duration:.1f} s; results in {opts.out}")
    return verification_status(failures, limit=None)


if __name__ == "__main__":
    sys.exit(main())
