"""Prefix index micro-benchmark: a 128k-token prompt (8192 blocks of 16 tokens), fully cached.

    .venv/bin/python benchmarks/prefix_index_bench.py [--repeats N]

Prints medians (the machine may be shared and noisy) in microseconds, and native/Python ratios:
  lookup_tokens   longest_prefix_tokens: hash + walk in one native call vs the Python path (xxhash loop + dict)
  block_keys      tierkv.block_keys (native) vs block_keys_reference; block_keys_packed for comparison
  lookup_keys     longest_prefix over a list of 8192 keys, native vs dict walk
Targets: lookup_tokens <= 150 us and >= 10x; block_keys >= 10x.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from tierkv import ops
from tierkv.keys import block_keys, block_keys_reference, root_key
from tierkv.prefix_index import NativePrefixIndex, ReferencePrefixIndex

N_TOKENS, BLOCK_TOKENS = 131_072, 16


def median_us(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=51)
    args = parser.parse_args()
    module = ops.native()
    if module is None or not hasattr(module, "PrefixIndex"):
        print(f"native PrefixIndex unavailable: {ops.native_status()}")
        return 1
    tokens = np.random.default_rng(0).integers(0, 128_000, size=N_TOKENS, dtype=np.uint32)
    root = root_key()
    keys = block_keys(tokens, BLOCK_TOKENS)
    n = len(keys)
    native, reference = NativePrefixIndex(n), ReferencePrefixIndex(n)
    for i, k in enumerate(keys):
        native.set(k, i + 1)
        reference.set(k, i + 1)
    assert native.longest_prefix_tokens(tokens, BLOCK_TOKENS, root) == n
    assert reference.longest_prefix_tokens(tokens, BLOCK_TOKENS, root) == n
    slow = max(5, args.repeats // 5)  # the Python paths take milliseconds

    rows = []

    def row(name: str, fast_us: float, slow_us: float, target: str) -> None:
        rows.append((name, fast_us, slow_us, slow_us / fast_us, target))

    row("lookup_tokens (128k tokens)", median_us(lambda: native.longest_prefix_tokens(tokens, BLOCK_TOKENS, root),
                                                 args.repeats),
        median_us(lambda: reference.longest_prefix_tokens(tokens, BLOCK_TOKENS, root), slow), "<=150us, >=10x")
    ref_keys_us = median_us(lambda: block_keys_reference(tokens, BLOCK_TOKENS), slow)
    row("block_keys (list of bytes)", median_us(lambda: block_keys(tokens, BLOCK_TOKENS), args.repeats),
        ref_keys_us, ">=10x")
    row("block_keys_packed (one bytes)", median_us(lambda: module.block_keys_packed(tokens, BLOCK_TOKENS, root),
                                                   args.repeats), ref_keys_us, "-")
    row("lookup_keys (list of 8192)", median_us(lambda: native.longest_prefix(keys), args.repeats),
        median_us(lambda: reference.longest_prefix(keys), slow), "-")
    packed = b"".join(keys)
    row("lookup_packed (8192 keys)", median_us(lambda: native.longest_prefix_packed(packed), args.repeats),
        median_us(lambda: reference.longest_prefix(keys), slow), "-")

    print(f"{n} blocks of {BLOCK_TOKENS} tokens; medians over {args.repeats} (native) / {slow} (Python) runs")
    print(f"{'op':32} {'native us':>10} {'python us':>10} {'ratio':>7}  target")
    for name, fast_us, slow_us, ratio, target in rows:
        print(f"{name:32} {fast_us:10.1f} {slow_us:10.1f} {ratio:6.1f}x  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
