"""Eviction policies on a multi-session serving trace: "lru" against "relevance", same capacities, same run.

The trace (seeded) mixes what prefix caches see in serving:

- conversations: each starts from one of a few shared system prompts (Zipf popularity) and grows by a turn of
  1-4 blocks each time it comes back, after other sessions have run in between;
- questions about long documents (Zipf popularity): document + a short question;
- one-off prompts that are never seen again.

Every request is what an engine does: ``lookup_tokens`` says how many leading blocks are cached, those are
fetched with ``get`` (promoting them), and the whole chain is ``put`` (stored blocks are refreshed, the rest
stored). The hit rate is cached blocks / requested blocks. Blocks are tiny (the policy is what is measured,
not bandwidth); the disk tier lives in a temporary directory.

``bench_policy_shapes`` replays variations of the trace (OTHER_SHAPES: fewer and more sessions, half and
double capacities, flatter popularity) to check that relevance never trails lru by much where it gains
little; it is not part of ``tierkv bench``: ``python -m tierkv.bench.policy --shapes``.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tierkv

from .progress import Progress

__all__ = ["bench_policies", "bench_policy_shapes", "make_trace", "replay", "POLICY_TARGET_POINTS",
           "POLICY_FLOOR_POINTS", "OTHER_SHAPES"]

POLICY_TARGET_POINTS = 3.0  # relevance must beat lru by this many points of total hit rate
POLICY_FLOOR_POINTS = -0.5  # ... and never trail it by more than this on any other trace shape
_LAYOUT = tierkv.KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, block_tokens=16, dtype=torch.bfloat16)
_VOCAB = 128_256


@dataclass
class TraceShape:
    requests: int = 1500
    sessions: int = 48
    system_prompts: int = 6
    documents: int = 16
    zipf: float = 1.2
    # capacities in blocks, for a working set of a few thousand blocks
    device_blocks: int = 96
    host_blocks: int = 256
    disk_blocks: int = 640


# Variations of the default trace for the "never much lower than lru" check (bench_policy_shapes): fewer and more
# sessions, half and double the capacities, flatter popularity.
OTHER_SHAPES: dict[str, dict[str, Any]] = {
    "16 sessions": dict(sessions=16),
    "128 sessions": dict(sessions=128),
    "half capacities": dict(device_blocks=48, host_blocks=128, disk_blocks=320),
    "double capacities": dict(device_blocks=192, host_blocks=512, disk_blocks=1280),
    "zipf 0.8": dict(zipf=0.8),
}


def make_trace(shape: TraceShape, seed: int) -> list[np.ndarray]:
    """Token arrays of every request, in arrival order."""
    rng = np.random.default_rng(seed)
    B = _LAYOUT.block_tokens

    def tokens(blocks: int) -> np.ndarray:
        return rng.integers(0, _VOCAB, size=blocks * B, dtype=np.uint32)

    def zipf_pick(n: int) -> int:
        weights = 1.0 / np.arange(1, n + 1) ** shape.zipf
        return int(rng.choice(n, p=weights / weights.sum()))

    systems = [tokens(int(rng.integers(8, 25))) for _ in range(shape.system_prompts)]
    documents = [tokens(int(rng.integers(16, 49))) for _ in range(shape.documents)]
    sessions = [systems[zipf_pick(shape.system_prompts)].copy() for _ in range(shape.sessions)]
    trace: list[np.ndarray] = []
    for _ in range(shape.requests):
        kind = rng.random()
        if kind < 0.55:  # a conversation comes back with one more turn
            s = int(rng.integers(shape.sessions))
            sessions[s] = np.concatenate([sessions[s], tokens(int(rng.integers(1, 5)))])
            if len(sessions[s]) > 160 * B:  # a conversation that grew too long starts over
                sessions[s] = systems[zipf_pick(shape.system_prompts)].copy()
            trace.append(sessions[s])
        elif kind < 0.85:  # a question about a popular document
            trace.append(np.concatenate([documents[zipf_pick(shape.documents)], tokens(int(rng.integers(1, 3)))]))
        else:  # a one-off prompt
            trace.append(tokens(int(rng.integers(4, 33))))
    return trace


def replay(trace: list[np.ndarray], policy: str, shape: TraceShape, workdir: Path) -> dict[str, Any]:
    """Run the trace on a fresh device+host+disk store under ``policy``; hit rates and bytes moved."""
    nbytes = _LAYOUT.block_nbytes
    config = tierkv.StoreConfig(device_bytes=shape.device_blocks * nbytes, host_bytes=shape.host_blocks * nbytes,
                                disk_path=str(workdir / policy), disk_bytes=shape.disk_blocks * 4096,
                                policy=policy, io_threads=2)
    most = max(len(t) for t in trace) // _LAYOUT.block_tokens
    data = torch.zeros((most, *_LAYOUT.block_shape), dtype=_LAYOUT.dtype)
    requested = cached = 0
    start = time.perf_counter()
    with tierkv.BlockStore(_LAYOUT, config) as store:
        for tokens in trace:
            keys = tierkv.block_keys(tokens, _LAYOUT.block_tokens)
            n = store.lookup_tokens(tokens)
            if n:
                store.get(keys[:n])
            store.put(keys, data[:len(keys)])
            requested += len(keys)
            cached += n
        stats = store.stats()
    seconds = time.perf_counter() - start
    tiers = {name: {"hits": t.hits, "hit_share": t.hits / requested if requested else 0.0,
                    "bytes_read": t.bytes_read, "bytes_written": t.bytes_written}
             for name, t in stats.tiers.items()}
    return {"policy": policy, "requested_blocks": requested, "cached_blocks": cached,
            "hit_rate": cached / requested if requested else 0.0, "tiers": tiers, "dropped": stats.dropped,
            "orphaned": stats.orphaned, "seconds": seconds}


def bench_policies(seed: int, requests: int, progress: Progress
                   ) -> tuple[dict[str, Any], list[tuple[str, ...]], list[str]]:
    shape = TraceShape(requests=requests)
    trace = make_trace(shape, seed)
    results: dict[str, Any] = {"shape": shape.__dict__, "requests": len(trace)}
    with tempfile.TemporaryDirectory(prefix="tierkv-policy-", dir=".") as tmp:
        for policy in ("lru", "relevance"):
            results[policy] = replay(trace, policy, shape, Path(tmp))
            progress.step(f"policy trace: {policy}")
    lru, rel = results["lru"], results["relevance"]
    gain = 100 * (rel["hit_rate"] - lru["hit_rate"])
    results["gain_points"] = gain
    rows = [("trace hit rate relevance vs lru", f"{100 * rel['hit_rate']:.1f}%", f"{100 * lru['hit_rate']:.1f}%",
             f"{gain:+.1f} pts", f">= +{POLICY_TARGET_POINTS:.0f} pts",
             "PASS" if gain >= POLICY_TARGET_POINTS else "BELOW")]
    for tier in rel["tiers"]:
        rows.append((f"  served from {tier} (share of blocks)", f"{100 * rel['tiers'][tier]['hit_share']:.1f}%",
                     f"{100 * lru['tiers'][tier]['hit_share']:.1f}%", "-", "-", "info"))
    moved = {p: sum(t["bytes_read"] + t["bytes_written"] for t in results[p]["tiers"].values())
             for p in ("lru", "relevance")}
    rows.append(("  bytes moved between tiers (MB)", f"{moved['relevance'] / 1e6:.1f}", f"{moved['lru'] / 1e6:.1f}",
                 f"{moved['relevance'] / moved['lru']:.2f}x" if moved["lru"] else "-", "-", "info"))
    return results, rows, []


def bench_policy_shapes(seed: int, requests: int, progress: Progress
                        ) -> tuple[dict[str, Any], list[tuple[str, ...]], list[str]]:
    """relevance against lru on each of OTHER_SHAPES (same seed): the gain may be small there, but relevance must
    never trail lru by more than POLICY_FLOOR_POINTS. Not part of ``tierkv bench`` (about a minute); run
    ``python -m tierkv.bench.policy --shapes``."""
    results: dict[str, Any] = {}
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="tierkv-policy-", dir=".") as tmp:
        for name, overrides in OTHER_SHAPES.items():
            shape = TraceShape(requests=requests, **overrides)
            trace = make_trace(shape, seed)
            runs = {}
            for policy in ("lru", "relevance"):
                runs[policy] = replay(trace, policy, shape, Path(tmp) / name.replace(" ", "-"))
                progress.step(f"policy trace, {name}: {policy}")
            gain = 100 * (runs["relevance"]["hit_rate"] - runs["lru"]["hit_rate"])
            results[name] = {"shape": shape.__dict__, **runs, "gain_points": gain}
            rows.append((f"  {name}: relevance vs lru", f"{100 * runs['relevance']['hit_rate']:.1f}%",
                         f"{100 * runs['lru']['hit_rate']:.1f}%", f"{gain:+.1f} pts",
                         f">= {POLICY_FLOOR_POINTS:+.1f} pts", "PASS" if gain >= POLICY_FLOOR_POINTS else "BELOW"))
    return results, rows, []


def main(argv: list[str] | None = None) -> int:
    """``python -m tierkv.bench.policy [--seed N] [--requests N] [--shapes]``: the policy trace alone (and, with
    ``--shapes``, OTHER_SHAPES too), printed as a table."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tierkv.bench.policy", description=main.__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--requests", type=int, default=TraceShape.requests)
    p.add_argument("--shapes", action="store_true", help="also the other trace shapes (about a minute)")
    a = p.parse_args(argv)
    with Progress(2 + 2 * len(OTHER_SHAPES) * a.shapes) as progress:
        _, rows, _ = bench_policies(a.seed, a.requests, progress)
        if a.shapes:
            rows += bench_policy_shapes(a.seed, a.requests, progress)[1]
    for row in rows:
        print(f"{row[0]:40s} {row[1]:>9s} {row[2]:>9s} {row[3]:>10s} {row[4]:>12s}  {row[5]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
