"""``tierkv bench paths``: achieved GB/s of every data path beside its same-run ceiling, swept over block sizes
and I/O thread counts (both decide what an NVMe drive delivers).

Paths and their ceilings (the plainest way to move the same bytes, timed interleaved with the store, best of
``repeats`` for both):

- ``host put`` / ``host get``: a store with only the host tier, ``put`` and ``get(out=)``; ceiling
  ``np.copyto`` of the same bytes (``Tensor.copy_`` for the device tier on a GPU);
- ``device put`` / ``device get``: the device tier alone (host memory without a GPU; for information there);
- ``d2h put`` / ``h2d get`` (CUDA only): a host-tier store fed from and read into device memory; ceiling one
  plain ``copy_`` between device memory and a pinned host buffer (a single cudaMemcpy);
- ``disk put+flush`` / ``disk get cold``: the disk tier alone, per thread count; ceiling raw O_DIRECT
  ``pwritev``/``preadv`` of one block per call from as many threads, on a file next to the store's
  (``posix_fadvise(DONTNEED)`` keeps reads cold where O_DIRECT is refused). With kvikio usable (a CUDA
  driver), the disk rows also run with ``disk_backend="kvikio"``;
- ``fp8/int8 quantize`` / ``dequantize``: the codec kernels on one thread, GB/s of bf16 bytes; ceiling a
  single-threaded memcpy of the same bytes (information: codecs compute, they do not only copy).

Block sizes are set through tokens per block of the model's layout (a 2 MiB Llama-3-8B block is 16 tokens).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tierkv
from tierkv.config import parse_bytes

from .models import PRESETS, ModelPreset
from .progress import Progress
from .report import describe_machine, format_table, positive_ints, verification_status, write_json
from .tier import (GB, Buffers, Options, PathResult, bench_disk_tier, bench_memory_tier, disk_workdir,
                   fresh_keys, make_buffers, same_bytes, timed)

__all__ = ["PathsOptions", "run_paths", "main", "QUICK", "FULL", "block_layouts"]

QUICK = dict(block_sizes=(256 << 10, 2 << 20, 32 << 20), threads=(1, 4), total_bytes=256 << 20, repeats=3,
             codec_bytes=64 << 20)
FULL = dict(block_sizes=(256 << 10, 1 << 20, 2 << 20, 8 << 20, 32 << 20), threads=(1, 4, 16),
            total_bytes=512 << 20, repeats=5, codec_bytes=128 << 20)
PATHS = ("host", "device", "pcie", "disk", "codec")
MIN_BLOCKS = 8  # every measurement moves at least this many blocks, so threads have work to share
H2D_TARGET = 0.80


@dataclass(frozen=True)
class PathsOptions:
    preset: ModelPreset
    block_sizes: tuple[int, ...]
    threads: tuple[int, ...]
    total_bytes: int
    repeats: int
    codec_bytes: int
    paths: tuple[str, ...] = PATHS
    disk_dir: str | None = None
    seed: int = 0


def block_layouts(preset: ModelPreset, sizes: tuple[int, ...]) -> list[tierkv.KVLayout]:
    """One layout per requested block size: the nearest whole number of tokens (at least one), deduplicated."""
    per_token = preset.kv_bytes_per_token
    tokens = sorted({max(1, round(size / per_token)) for size in sizes})
    return [preset.layout(t) for t in tokens]


def _row(p: PathResult, layout: tierkv.KVLayout, threads: int | None, path: str) -> dict[str, Any]:
    return {"path": path, "block_bytes": layout.block_nbytes, "block_tokens": layout.block_tokens,
            "threads": threads, "bytes": p.nbytes, "ours_gbps": p.ours_gbps(), "ceiling_gbps": p.ceiling_gbps(),
            "ratio": p.ratio(), "target": p.target, "result": p.verdict(), "ceiling": p.ceiling,
            "ours_s": p.ours_s, "ceiling_s": p.ceiling_s}


_NAMES = {("host", "put"): "host put", ("host", "get_out"): "host get (out=)",
          ("device", "put"): "device put", ("device", "get_out"): "device get (out=)",
          ("disk", "put"): "disk put+flush", ("disk", "get_out"): "disk get cold (out=)"}


def _tier_options(opts: PathsOptions, layout: tierkv.KVLayout, threads: int) -> Options:
    total = max(opts.total_bytes, MIN_BLOCKS * layout.block_nbytes)
    return Options(layout=layout, total_bytes=total, threads=threads, repeats=opts.repeats, tiers=(),
                   disk_dir=opts.disk_dir, out=Path("unused.json"), prompt_tokens=layout.block_tokens,
                   seed=opts.seed)


# --------------------------------------------------------------------------------------------- PCIe

def bench_pcie(layout: tierkv.KVLayout, nblocks: int, repeats: int, rng: np.random.Generator,
               progress: Progress) -> tuple[list[PathResult], list[str]]:
    """Device -> pinned host tier (``put`` of device blocks) and back (``get`` into device ``out=``)."""
    device = torch.device("cuda", torch.cuda.current_device())
    cpu = make_buffers(layout, nblocks, rng)
    src = cpu.src.to(device)
    out = torch.zeros_like(src)
    pinned_src = cpu.src.pin_memory()
    pinned_dst = torch.empty_like(pinned_src).pin_memory()
    nbytes = nblocks * layout.block_nbytes
    ceiling = "one Tensor.copy_ between device memory and a pinned host buffer"
    d2h = PathResult("pcie", "put", "d2h put", nbytes, ceiling, H2D_TARGET)
    h2d = PathResult("pcie", "get_out", "h2d get (out=)", nbytes, ceiling, H2D_TARGET)
    failures: list[str] = []
    config = tierkv.StoreConfig(device_bytes=0, host_bytes=(nblocks + 4) * layout.block_nbytes, disk_path=None)
    with tierkv.BlockStore(layout, config) as store:
        for r in range(repeats):
            keys = fresh_keys(nblocks, layout.block_tokens, rng)
            seconds, _ = timed(lambda: store.put(keys, src), device)
            d2h.ours_s.append(seconds)
            out.zero_()
            seconds, _ = timed(lambda: store.get(keys, out=out), device)
            h2d.ours_s.append(seconds)
            if r == 0 and not same_bytes(out, src):
                failures.append("h2d get returned different bytes than the d2h put stored")
            seconds, _ = timed(lambda: pinned_dst.copy_(src, non_blocking=True), device)
            d2h.ceiling_s.append(seconds)
            seconds, _ = timed(lambda: out.copy_(pinned_src, non_blocking=True), device)
            h2d.ceiling_s.append(seconds)
            store.delete(keys)
            progress.step(f"pcie {layout.block_nbytes >> 10} KiB: d2h {nbytes / d2h.ours_s[-1] / GB:.1f} GB/s")
    return [d2h, h2d], failures


# --------------------------------------------------------------------------------------------- codecs

def bench_codec_paths(layout: tierkv.KVLayout, codec_bytes: int, repeats: int, rng: np.random.Generator,
                      progress: Progress) -> tuple[list[PathResult], list[str]]:
    """Quantize / dequantize GB/s of bf16 bytes against a single-threaded memcpy of the same bytes."""
    from tierkv.codec import make_codec

    from .codec import kv_like

    n = max(MIN_BLOCKS, codec_bytes // layout.block_nbytes)
    blocks = kv_like(n, layout, rng)
    raw = blocks.view(torch.uint8).reshape(n, -1)
    copy_dst = torch.empty_like(raw)
    src_np, dst_np = raw.numpy(), copy_dst.numpy()
    nbytes = raw.numel()
    results, failures = [], []
    for name in ("fp8", "int8"):
        try:
            codec = make_codec(name, layout)
        except ValueError as exc:  # a dtype the codecs do not take
            failures.append(f"{name}: {exc}")
            continue
        encoded = torch.empty((n, codec.nbytes), dtype=torch.uint8)
        decoded = torch.empty_like(blocks)
        ceiling = "np.copyto of the same bf16 bytes, one thread"
        q = PathResult("codec", "quantize", f"{name} quantize", nbytes, ceiling, None)
        d = PathResult("codec", "dequantize", f"{name} dequantize", nbytes, ceiling, None)
        for _ in range(repeats):
            q.ours_s.append(timed(lambda: codec.encode(blocks, encoded))[0])
            d.ours_s.append(timed(lambda: codec.decode(encoded, decoded))[0])
            seconds = timed(lambda: np.copyto(dst_np, src_np))[0]
            q.ceiling_s.append(seconds)
            d.ceiling_s.append(seconds)
        results += [q, d]
        progress.step(f"codec {name} {layout.block_nbytes >> 10} KiB: quantize {q.ours_gbps():.2f} GB/s")
    return results, failures


# --------------------------------------------------------------------------------------------- run

def progress_steps(opts: PathsOptions) -> int:
    sizes = len(block_layouts(opts.preset, opts.block_sizes))
    per_size = opts.repeats * (("host" in opts.paths) + ("device" in opts.paths and torch.cuda.is_available())
                               + ("pcie" in opts.paths and torch.cuda.is_available())
                               + ("disk" in opts.paths) * len(opts.threads) * (1 + _kvikio_usable()))
    return sizes * (per_size + 2 * ("codec" in opts.paths))


def _kvikio_usable() -> bool:
    from tierkv.io import kvikio_usable

    return kvikio_usable()[0]


def run_paths(opts: PathsOptions, progress: Progress) -> tuple[dict[str, Any], list[str]]:
    """Every path x block size (x thread count for the disk): (JSON results, verification failures)."""
    rng = np.random.default_rng(opts.seed)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    disk_info: dict[str, Any] = {}
    backends = ["posix"] + (["kvikio"] if _kvikio_usable() else [])
    for layout in block_layouts(opts.preset, opts.block_sizes):
        size = f"{layout.block_nbytes / 2**20:g} MiB"
        bufs: Buffers | None = None
        nblocks = max(opts.total_bytes, MIN_BLOCKS * layout.block_nbytes) // layout.block_nbytes
        if {"host", "device", "disk"} & set(opts.paths):
            bufs = make_buffers(layout, nblocks, rng)
        for tier in ("host", "device"):
            if tier not in opts.paths or (tier == "device" and not torch.cuda.is_available()):
                continue  # without CUDA the device tier is host memory: the host rows already measure that path
            report, paths = bench_memory_tier(tier, _tier_options(opts, layout, opts.threads[-1]), bufs, rng, progress)
            failures += [f"{tier} {size}: {f}" for f in report["verify_failures"]]
            for p in paths:
                if tier == "device" and p.op != "get_fresh":
                    p.target = 0.80  # HBM against a device-to-device copy: judged like the host tier
            rows += [_row(p, layout, None, _NAMES[(tier, p.op)]) for p in paths if p.op != "get_fresh"]
        if "pcie" in opts.paths and torch.cuda.is_available():
            paths, pcie_failures = bench_pcie(layout, nblocks, opts.repeats, rng, progress)
            rows += [_row(p, layout, None, p.label) for p in paths]
            failures += [f"pcie {size}: {f}" for f in pcie_failures]
        if "disk" in opts.paths:
            for backend in backends:
                for threads in opts.threads:
                    with disk_workdir(opts.disk_dir) as workdir:
                        report, paths = bench_disk_tier(_tier_options(opts, layout, threads), bufs, workdir, rng,
                                                        progress, backend=backend)
                    failures += [f"disk {backend} {size} {threads} threads: {f}" for f in report["verify_failures"]]
                    disk_info = {k: report[k] for k in ("o_direct", "backend", "filesystem")}
                    suffix = "" if backend == "posix" else " (kvikio)"
                    rows += [_row(p, layout, threads, _NAMES[("disk", p.op)] + suffix)
                             for p in paths if p.op != "get_fresh"]
        if "codec" in opts.paths:
            paths, codec_failures = bench_codec_paths(layout, opts.codec_bytes, opts.repeats, rng, progress)
            rows += [_row(p, layout, None, p.label) for p in paths]
            failures += [f"codec {size}: {f}" for f in codec_failures]
        del bufs
    judged = [r for r in rows if r["target"] is not None]
    notes = [] if torch.cuda.is_available() else [
        "no CUDA device: the device tier would be host memory (the host rows measure that path), and the "
        "pinned host<->device and kvikio paths do not exist here"]
    results = {"rows": rows, "disk": disk_info, "notes": notes,
               "judged": len(judged), "passed": sum(r["result"] == "PASS" for r in judged),
               "below": [f"{r['path']} {r['block_bytes'] >> 10} KiB" + (f" {r['threads']} thr" if r["threads"] else "")
                         for r in judged if r["result"] == "BELOW"]}
    return results, failures


# --------------------------------------------------------------------------------------------- output

TABLE_HEADER = ("path", "block", "thr", "ours GB/s", "ceiling GB/s", "ratio", "target", "result")


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    out = []
    for r in results["rows"]:
        block = (f"{r['block_bytes'] / 2**20:g} MiB" if r["block_bytes"] >= 1 << 20
                 else f"{r['block_bytes'] >> 10} KiB")
        target = "-" if r["target"] is None else f">= {r['target']:.0%}"
        out.append((r["path"], block, str(r["threads"] or "-"), f"{r['ours_gbps']:.2f}", f"{r['ceiling_gbps']:.2f}",
                    f"{r['ratio']:.0%}", target, r["result"]))
    return out


def footnotes(results: dict[str, Any], repeats: int) -> list[str]:
    notes = [f"GB/s = 1e9 payload bytes per second, best of {repeats}; each ceiling measured in the same run, "
             "interleaved with the store.",
             f"{results['passed']} of {results['judged']} judged paths within 20% of their ceiling"
             + (f"; below: {', '.join(results['below'])}" if results["below"] else "")]
    seen = {}
    for r in results["rows"]:
        seen.setdefault(r["path"].split(" (")[0], r["ceiling"])
    notes += [f"{path} ceiling: {ceiling}" for path, ceiling in seen.items()]
    notes += results.get("notes", [])
    disk = results.get("disk") or {}
    if disk and not disk.get("o_direct", True):
        notes.append("O_DIRECT was refused on this filesystem: buffered I/O made cold with posix_fadvise(DONTNEED)")
    return notes


def print_report(results: dict[str, Any], repeats: int) -> None:
    print(format_table(TABLE_HEADER, table_rows(results)))
    print()
    for note in footnotes(results, repeats):
        print(f"  * {note}")


def _sizes(text: str) -> tuple[int, ...]:
    try:
        values = tuple(parse_bytes(v.strip(), "--block-sizes") for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes such as 256KiB,2MiB, got {text!r}")
    return values


def add_paths_arguments(p: argparse.ArgumentParser, profile: dict[str, Any]) -> None:
    p.add_argument("--block-sizes", type=_sizes, default=profile["block_sizes"],
                   help="block sizes to sweep (default: %s)"
                        % ",".join(f"{s >> 10}KiB" for s in profile["block_sizes"]))
    p.add_argument("--io-threads", type=positive_ints("thread counts"), default=profile["threads"],
                   help="disk I/O thread counts to sweep (default: %s)" % ",".join(map(str, profile["threads"])))
    p.add_argument("--total-bytes", default=f"{profile['total_bytes'] >> 20}MiB",
                   help="payload per measurement (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=profile["repeats"], help="best of (default: %(default)s)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"subset of {','.join(PATHS)} (default: all)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierkv bench paths",
                                description="GB/s of every data path beside its same-run ceiling, swept over "
                                            "block sizes and I/O threads.")
    p.add_argument("--profile", choices=("quick", "full"), default="full",
                   help="default sweep: quick is what `tierkv bench` runs (default: %(default)s)")
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS),
                   help="KV layout whose block sizes are swept (default: %(default)s)")
    add_paths_arguments(p, FULL)
    p.add_argument("--disk-dir", help="where the temporary disk files are made (default: current directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench-results", help="JSON and PNG files (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plot")
    return p


def options_from_args(a: argparse.Namespace, parser: argparse.ArgumentParser) -> PathsOptions:
    try:
        total = parse_bytes(a.total_bytes, "--total-bytes")
        paths = tuple(s.strip() for s in a.paths.split(",") if s.strip())
        if not paths or not set(paths) <= set(PATHS):
            raise ValueError(f"expected --paths from {','.join(PATHS)}, got {a.paths!r}")
        if a.repeats < 1:
            raise ValueError(f"expected --repeats >= 1, got {a.repeats}")
        if total < 1:
            raise ValueError(f"expected --total-bytes >= 1, got {total}")
    except ValueError as exc:
        parser.error(str(exc))
    return PathsOptions(preset=PRESETS[a.model], block_sizes=a.block_sizes, threads=a.io_threads, total_bytes=total,
                        repeats=a.repeats, codec_bytes=QUICK["codec_bytes"] if a.profile == "quick" else
                        FULL["codec_bytes"], paths=paths, disk_dir=a.disk_dir, seed=a.seed)


def apply_profile(argv: list[str] | None) -> list[str]:
    """``--profile quick`` fills in the quick sweep for every option the command line leaves out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--profile", default="full")
    known, _ = first.parse_known_args(argv)
    if known.profile != "quick":
        return argv
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    defaults = {"--block-sizes": ",".join(f"{s >> 10}KiB" for s in QUICK["block_sizes"]),
                "--io-threads": ",".join(map(str, QUICK["threads"])),
                "--total-bytes": f"{QUICK['total_bytes'] >> 20}MiB", "--repeats": str(QUICK["repeats"])}
    return argv + [x for k, v in defaults.items() if k not in given for x in (k, v)]


def main(argv: list[str] | None = None) -> int:
    """``tierkv bench paths``: sweep, print the table, write paths.json (and a PNG plot)."""
    parser = build_parser()
    a = parser.parse_args(apply_profile(argv))
    opts = options_from_args(a, parser)
    out_dir = Path(a.out_dir)
    sizes = ", ".join(f"{l.block_nbytes >> 10} KiB" for l in block_layouts(opts.preset, opts.block_sizes))
    print(f"tierkv bench paths: {opts.preset.name} blocks of {sizes}; disk threads "
          f"{','.join(map(str, opts.threads))}; best of {opts.repeats}", flush=True)
    started = time.time()
    with Progress(progress_steps(opts)) as progress:
        results, failures = run_paths(opts, progress)
    document = {"benchmark": "tierkv.bench.paths", "duration_s": time.time() - started,
                "machine": describe_machine(), "paths": results, "verified": not failures,
                "verify_failures": failures}
    write_json(out_dir / "paths.json", document)
    print()
    print_report(results, opts.repeats)
    if not a.no_plots:
        from .plots import plot_paths

        for line in plot_paths(results["rows"], out_dir):
            print(f"  * {line}")
    print(f"\n{document['duration_s']:.1f} s; results in {out_dir / 'paths.json'}")
    return verification_status(failures)


if __name__ == "__main__":
    sys.exit(main())
