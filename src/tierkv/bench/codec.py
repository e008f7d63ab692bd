"""Benchmark sections for the codecs and the native prefix index (``tierkv bench --tiers codec,lookup,disk-codec``).

- ``codec``: CPU quantize / dequantize of bf16 blocks: the native kernels (one thread) against the torch
  reference and a plain memcpy of the same bytes, in the same run.
- ``lookup``: token array -> cached-prefix length for one long prompt: ``store.lookup_tokens`` (hashing and the
  index walk in one native call) against the pure-Python path (xxhash loop + dict).
- ``disk-codec``: the disk tier with ``disk_codec="fp8"`` against ``"none"``: bf16 bytes delivered per second
  (put + flush, cold get), same blocks, same run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tierkv
from tierkv import ops
from tierkv.codec import make_codec, reference
from tierkv.keys import block_keys_reference

from .progress import Progress

__all__ = ["bench_codec", "bench_lookup", "bench_disk_codec", "CODEC_TARGETS"]

GB = 1e9
CODEC_TARGETS = {"speedup": 5.0, "per_core_gbps": 2.0, "lookup_us": 150.0, "lookup_speedup": 10.0,
                 "disk_fp8_ratio": 1.7}
CODEC_BYTES = 64 << 20   # bf16 bytes per codec measurement: large enough to leave the caches


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return min(seconds), seconds


def kv_like(n: int, layout: tierkv.KVLayout, rng: np.random.Generator) -> torch.Tensor:
    """Normal values with a few 50x outlier channels, as real K caches have (the kernels' speed does not
    depend on the values, their error does)."""
    x = torch.from_numpy(rng.standard_normal((n, *layout.block_shape), dtype=np.float32))
    x[..., :: max(1, layout.head_dim // 4)] *= 50
    return x.to(layout.dtype)


# ------------------------------------------------------------------------------------------------ codec

def bench_codec(layout: tierkv.KVLayout, repeats: int, rng: np.random.Generator,
                progress: Progress) -> tuple[dict[str, Any], list[tuple[str, ...]], list[str]]:
    """Native vs torch-reference quantize/dequantize GB/s (bf16 bytes in or out), beside memcpy."""
    n = max(1, CODEC_BYTES // layout.block_nbytes)
    blocks = kv_like(n, layout, rng)
    raw = blocks.view(torch.uint8).reshape(n, -1)
    nbytes = raw.numel()
    copy_dst = torch.empty_like(raw)
    memcpy_s, _ = _best(lambda: copy_dst.copy_(raw), repeats)
    module = ops.native()
    native = module is not None and hasattr(module, "quantize")
    report: dict[str, Any] = {"blocks": n, "bytes": nbytes, "memcpy_gbps": nbytes / memcpy_s / GB,
                              "native": ops.native_status(), "torch_threads": torch.get_num_threads(),
                              "isa": module.cpu_isa() if native and hasattr(module, "cpu_isa") else None,
                              "codecs": {}}
    rows, failures = [], []
    for name in ("fp8", "int8"):
        codec = make_codec(name, layout)
        encoded = torch.empty((n, codec.nbytes), dtype=torch.uint8)
        encoded_ref = torch.empty_like(encoded)
        decoded = torch.empty_like(blocks)
        decoded_ref = torch.empty_like(blocks)
        ref_q, _ = _best(lambda: reference.encode(blocks, codec.format, encoded_ref), max(1, repeats // 2))
        ref_d, _ = _best(lambda: reference.decode(encoded_ref, codec.format, decoded_ref), max(1, repeats // 2))
        entry: dict[str, Any] = {"encoded_bytes_per_block": codec.nbytes,
                                 "reference_quantize_gbps": nbytes / ref_q / GB,
                                 "reference_dequantize_gbps": nbytes / ref_d / GB}
        if native:
            q, _ = _best(lambda: codec.encode(blocks, encoded), repeats)
            d, _ = _best(lambda: codec.decode(encoded, decoded), repeats)
            if not torch.equal(encoded, encoded_ref):
                failures.append(f"{name}: native quantize differs from the torch reference")
            if not torch.equal(decoded.view(torch.uint8), decoded_ref.view(torch.uint8)):
                failures.append(f"{name}: native dequantize differs from the torch reference")
            entry.update(quantize_gbps=nbytes / q / GB, dequantize_gbps=nbytes / d / GB,
                         quantize_speedup=ref_q / q, dequantize_speedup=ref_d / d)
        report["codecs"][name] = entry
        for op, key in (("quantize", "quantize"), ("dequantize", "dequantize")):
            ref_gbps = entry[f"reference_{key}_gbps"]
            if not native:
                rows.append((f"{name} {op} (vs torch ref)", "-", f"{ref_gbps:.2f}", "-", "native n/a", "n/a"))
                continue
            ours, speedup = entry[f"{key}_gbps"], entry[f"{key}_speedup"]
            ok = speedup >= CODEC_TARGETS["speedup"] and ours >= CODEC_TARGETS["per_core_gbps"]
            rows.append((f"{name} {op} (vs torch ref)", f"{ours:.2f}", f"{ref_gbps:.2f}", f"{speedup:.1f}x",
                         ">= 5x, >= 2 GB/s", "PASS" if ok else "BELOW"))
        progress.step(f"codec {name}")
    rows.append(("memcpy of the same bf16 bytes", f"{report['memcpy_gbps']:.2f}", "-", "-", "-", "info"))
    report.update(verified=not failures, verify_failures=failures)
    return report, rows, failures


# ------------------------------------------------------------------------------------------------ lookup

def bench_lookup(prompt_tokens: int, block_tokens: int, repeats: int, rng: np.random.Generator,
                 progress: Progress) -> tuple[dict[str, Any], list[tuple[str, ...]], list[str]]:
    """``store.lookup_tokens`` on a prompt whose every block is cached, against the pure-Python path."""
    layout = tierkv.KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, block_tokens=block_tokens)
    tokens = rng.integers(0, 128_256, size=prompt_tokens, dtype=np.uint32)
    keys = block_keys_reference(tokens, block_tokens=block_tokens)
    n = len(keys)
    config = tierkv.StoreConfig(device_bytes=0, host_bytes=(n + 16) * layout.block_nbytes)
    failures: list[str] = []
    with tierkv.BlockStore(layout, config) as store:
        store.put(keys, torch.zeros((n, *layout.block_shape), dtype=layout.dtype))
        python_index = {key: 1 for key in keys}

        def python_path() -> int:
            found = 0
            for key in block_keys_reference(tokens, block_tokens=block_tokens):
                if key not in python_index:
                    break
                found += 1
            return found

        py_s, py_all = _best(python_path, max(1, repeats // 2))
        native_s, native_all = _best(lambda: store.lookup_tokens(tokens), max(repeats, 20))
        found = store.lookup_tokens(tokens)
        tokens64 = tokens.astype(np.int64)  # what tokenizers usually hand out
        int64_s, _ = _best(lambda: store.lookup_tokens(tokens64), max(repeats, 20))
    if found != n or python_path() != n:
        failures.append(f"lookup_tokens found {found} of {n} cached blocks")
    speedup = py_s / native_s
    ok = native_s * 1e6 <= CODEC_TARGETS["lookup_us"] and speedup >= CODEC_TARGETS["lookup_speedup"]
    report = {"tokens": prompt_tokens, "blocks": n, "native": ops.native_status(),
              "native_best_s": native_s, "native_s": native_all, "int64_input_best_s": int64_s,
              "python_best_s": py_s, "python_s": py_all, "speedup": speedup,
              "verified": not failures, "verify_failures": failures}
    rows = [(f"lookup_tokens {prompt_tokens} tok (us)", f"{native_s * 1e6:.0f}", f"{py_s * 1e6:.0f}",
             f"{speedup:.0f}x", "<= 150 us, >= 10x", "PASS" if ok else "BELOW")]
    progress.step("lookup_tokens")
    return report, rows, failures


# ------------------------------------------------------------------------------------------------ disk codec

def bench_disk_codec(layout: tierkv.KVLayout, nblocks: int, threads: int, repeats: int, workdir: Path,
                     rng: np.random.Generator, drop_cache: Callable[[Path], None],
                     progress: Progress) -> tuple[dict[str, Any], list[tuple[str, ...]], list[str]]:
    """Disk tier alone with fp8 against none: bf16 bytes delivered per second, put + flush and cold get."""
    blocks = kv_like(nblocks, layout, rng)
    out = torch.empty_like(blocks)
    nbytes = blocks.numel() * blocks.element_size()
    report: dict[str, Any] = {"blocks": nblocks, "bf16_bytes": nbytes, "codecs": {}}
    failures: list[str] = []
    timings: dict[str, dict[str, list[float]]] = {c: {"put": [], "get": []} for c in ("none", "fp8")}
    stores = {}
    for codec in ("none", "fp8"):
        slot = -(-make_codec(codec, layout).nbytes // 4096) * 4096
        config = tierkv.StoreConfig(device_bytes=0, host_bytes=0, disk_path=str(workdir / f"disk-{codec}"),
                                    disk_bytes=(nblocks + 4) * slot, disk_codec=codec, io_threads=threads)
        stores[codec] = tierkv.BlockStore(layout, config)
    try:
        for r in range(repeats):
            tokens = rng.integers(0, 128_256, size=nblocks * layout.block_tokens, dtype=np.uint32)
            keys = tierkv.block_keys(tokens, block_tokens=layout.block_tokens)
            for codec, store in stores.items():  # interleaved, so drifting machine load hits both alike
                start = time.perf_counter()
                store.put(keys, blocks)
                store.flush()
                timings[codec]["put"].append(time.perf_counter() - start)
                drop_cache(Path(store.config.disk_path))
                start = time.perf_counter()
                store.get(keys, out=out)
                timings[codec]["get"].append(time.perf_counter() - start)
                if r == 0:
                    err = float((out.double() - blocks.double()).norm() / blocks.double().norm())
                    report["codecs"][codec] = {"relative_rms_error": err}
                    if (codec == "none" and err != 0) or err > 0.04:
                        failures.append(f"disk {codec}: get returned data with relative error {err:.4f}")
                store.delete(keys)
            progress.step(f"disk codec round {r + 1}")
    finally:
        for store in stores.values():
            store.close()
    rows = []
    for op, label in (("put", "put+flush"), ("get", "get cold")):
        none_gbps = nbytes / min(timings["none"][op]) / GB
        fp8_gbps = nbytes / min(timings["fp8"][op]) / GB
        ratio = fp8_gbps / none_gbps
        for codec, gbps in (("none", none_gbps), ("fp8", fp8_gbps)):
            report["codecs"][codec][f"{op}_gbps"] = gbps
            report["codecs"][codec][f"{op}_s"] = timings[codec][op]
        report[f"{op}_ratio"] = ratio
        judged = op == "get"
        ok = ratio >= CODEC_TARGETS["disk_fp8_ratio"]
        rows.append((f"disk {label} fp8 vs none (bf16 GB/s)", f"{fp8_gbps:.2f}", f"{none_gbps:.2f}",
                     f"{ratio:.2f}x", ">= 1.7x" if judged else "-",
                     ("PASS" if ok else "BELOW") if judged else "info"))
    report.update(verified=not failures, verify_failures=failures)
    return report, rows, failures
