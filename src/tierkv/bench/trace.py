"""``tierkv bench trace``: a multi-turn serving workload replayed against the store, with TTFT estimates.

For each number of concurrent sessions, the same seeded workload (:mod:`tierkv.bench.workload`) is replayed
against each store configuration, doing per request what an engine does:

1. ``lookup_tokens(prompt)``: how many leading blocks are cached;
2. ``get`` of those blocks into a preallocated buffer (the restore), timed together with the lookup; which
   tier each block came from is read with ``locate`` just before (not timed);
3. the missed tokens are "recomputed": their time comes from the prefill model (:mod:`tierkv.bench.models`),
   nothing runs;
4. after the reply, ``put`` of the prompt + reply's blocks the cache did not have (timed, but not part of
   TTFT: engines save while decoding).

TTFT estimate = restore time (measured here, on real block sizes) + recompute time of the missed tokens.
Queueing is not modelled: each request's restore runs on an otherwise idle store.

Configurations: ``tiered`` (device + host + disk as given) and ``dram-only`` (one host tier holding the same
total bytes, no disk); "recompute" (no cache at all) is computed for every request. Every restored block is
checked: its first 16 bytes are its key, stamped at put, so a wrong block is caught.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tierkv
from tierkv.config import parse_bytes

from .models import DEFAULT_MFU, PRESETS, ModelPreset, PrefillModel, measure_prefill_flops
from .progress import Progress
from .report import (describe_machine, format_table, memory_available_bytes, positive_ints, verification_status,
                     write_json)
from .workload import Request, WorkloadShape, generate

__all__ = ["TraceOptions", "run_trace", "main", "build_parser", "options_from_args", "QUICK", "FULL"]

GiB = 1 << 30
TIER_ORDER = ("device", "host", "disk")
DEFAULT_GPU_HOUR_USD = 2.0  # an assumption for the cost column: pass --gpu-hour-usd with your price

# Profiles. QUICK is what `make bench` runs (about a minute here); FULL is the `tierkv bench trace` default.
QUICK = dict(sessions=(4, 16, 64), requests=100, requests_per_session=2.5,
             device_bytes=512 << 20, host_bytes=1 * GiB, disk_bytes=4 * GiB,
             workload=dict(system_tokens=(256, 1024), document_tokens=(1024, 2560), max_context=4096))
FULL = dict(sessions=(4, 16, 64, 256), requests=200, requests_per_session=3.0,
            device_bytes=2 * GiB, host_bytes=4 * GiB, disk_bytes=16 * GiB,
            workload=dict(system_tokens=(512, 2048), document_tokens=(2048, 8192), max_context=12288))


@dataclass(frozen=True)
class TraceOptions:
    preset: ModelPreset
    prefill: PrefillModel
    sessions: tuple[int, ...]
    requests: int                  # at least this many requests per concurrency level ...
    requests_per_session: float    # ... and at least this many per active session, so sessions come back
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    workload: dict[str, Any] = field(default_factory=dict)  # WorkloadShape overrides
    block_tokens: int = 16
    threads: int = 4
    configs: tuple[str, ...] = ("tiered", "dram-only")
    gpu_hour_usd: float = DEFAULT_GPU_HOUR_USD
    disk_dir: str | None = None
    seed: int = 0

    @property
    def layout(self) -> tierkv.KVLayout:
        return self.preset.layout(self.block_tokens)

    def shape(self, sessions: int) -> WorkloadShape:
        requests = max(self.requests, math.ceil(self.requests_per_session * sessions))
        return WorkloadShape(sessions=sessions, requests=requests, **self.workload)

    def store_config(self, name: str, disk_path: Path) -> tierkv.StoreConfig:
        if name == "tiered":
            device, host = self.device_bytes, self.host_bytes
            if not torch.cuda.is_available():
                # No HBM here: a "device" tier would be host memory too, and promoting every host hit into it
                # (pushing another block down) would only add copies. Its bytes join the host tier.
                device, host = 0, device + host
            return tierkv.StoreConfig(device_bytes=device, host_bytes=host,
                                      disk_path=str(disk_path) if self.disk_bytes else None,
                                      disk_bytes=self.disk_bytes, io_threads=self.threads)
        if name == "dram-only":
            total = self.device_bytes + self.host_bytes + self.disk_bytes
            return tierkv.StoreConfig(device_bytes=0, host_bytes=total, disk_path=None, io_threads=self.threads)
        raise ValueError(f"expected a configuration from tiered, dram-only, got {name!r}")


# --------------------------------------------------------------------------------------------- replay

class _Buffers:
    """Preallocated put source and get destination, big enough for the longest prompt + reply."""

    def __init__(self, layout: tierkv.KVLayout, blocks: int, device: torch.device, rng: np.random.Generator):
        shape = (blocks, *layout.block_shape)
        if device.type == "cpu":
            from .tier import aligned_u8, fill_random

            src, out = aligned_u8(blocks * layout.block_nbytes), aligned_u8(blocks * layout.block_nbytes)
            fill_random(src, rng)
            out.zero_()  # first-touch the pages now, not inside a timed restore
            self.src = src.view(layout.dtype).view(shape)
            self.out = out.view(layout.dtype).view(shape)
        else:
            self.src = torch.randint(0, 255, (blocks, layout.block_nbytes), dtype=torch.uint8, device=device
                                     ).view(layout.dtype).view(shape)
            self.out = torch.zeros(shape, dtype=layout.dtype, device=device)
        self.nbytes = layout.block_nbytes

    def stamped(self, keys: list[bytes]) -> torch.Tensor:
        """The first ``len(keys)`` source blocks, each starting with its key (what restores are checked by)."""
        n = len(keys)
        stamps = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(n, 16)
        self.src[:n].view(n, -1).view(torch.uint8)[:, :16].copy_(stamps)
        return self.src[:n]

    def check(self, keys: list[bytes]) -> bool:
        n = len(keys)
        got = self.out[:n].view(n, -1).view(torch.uint8)[:, :16].cpu().numpy().tobytes()
        return got == b"".join(keys)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay(opts: TraceOptions, config_name: str, requests: list[Request], workdir: Path,
           progress: Progress | None, label: str) -> dict[str, Any]:
    """Run ``requests`` against a fresh store of configuration ``config_name``; per-request records."""
    layout, bt = opts.layout, opts.block_tokens
    config = opts.store_config(config_name, workdir / config_name)
    most = max(len(r.prompt) + len(r.reply) for r in requests) // bt + 1
    records: list[dict[str, Any]] = []
    failures: list[str] = []
    step_every = max(1, len(requests) // 4)
    with tierkv.BlockStore(layout, config) as store:
        device = store.device
        bufs = _Buffers(layout, most, device, np.random.default_rng(opts.seed))
        started = time.perf_counter()
        for i, req in enumerate(requests):
            full = np.concatenate([req.prompt, req.reply])
            keys = tierkv.block_keys(full, block_tokens=bt)
            prompt_blocks = len(req.prompt) // bt
            _sync(device)
            t0 = time.perf_counter()
            hit = store.lookup_tokens(req.prompt)
            t_lookup = time.perf_counter() - t0
            where = store.locate(keys[:hit]) if hit else []
            error = None
            t_get = 0.0
            if hit:
                t1 = time.perf_counter()
                try:
                    store.get(keys[:hit], out=bufs.out[:hit])
                    _sync(device)
                    t_get = time.perf_counter() - t1
                    if not bufs.check(keys[:hit]):
                        failures.append(f"{config_name}: request {i} restored blocks whose stamps are not their keys")
                except tierkv.BlockNotFound as exc:  # a read error or a corrupt copy: a miss, recomputed
                    error, hit, where = str(exc), 0, []
            restore_s = t_lookup + t_get
            cached_tokens = min(hit * bt, len(req.prompt) - 1)  # the last prompt token is always computed
            recompute_s = opts.prefill.seconds(cached_tokens, len(req.prompt))
            new = keys[hit:]
            t2 = time.perf_counter()
            if new:
                store.put(new, bufs.stamped(new))
            _sync(device)
            save_s = time.perf_counter() - t2
            records.append({
                "at": req.at, "session": req.session, "turn": req.turn, "kind": req.kind,
                "prompt_tokens": len(req.prompt), "prompt_blocks": prompt_blocks, "hit_blocks": hit,
                "hit_by_tier": {t: where.count(t) for t in TIER_ORDER if t in where},
                "restore_s": restore_s, "recompute_s": recompute_s, "ttft_s": restore_s + recompute_s,
                "recompute_all_s": opts.prefill.seconds(0, len(req.prompt)),
                "saved_blocks": len(new), "save_s": save_s, "error": error,
                "restored_bytes": hit * layout.block_nbytes, "saved_bytes": len(new) * layout.block_nbytes,
            })
            if progress is not None and (i + 1) % step_every == 0 and (i + 1) // step_every <= 4:
                rate = (i + 1) / (time.perf_counter() - started)
                progress.step(f"trace {label} {config_name}: {i + 1}/{len(requests)} requests, {rate:.0f}/s")
        store.drain()
        stats = store.stats()
    tier_traffic = {name: {"bytes_read": t.bytes_read, "bytes_written": t.bytes_written, "hits": t.hits,
                           "evictions": t.evictions, "capacity_bytes": t.capacity_bytes,
                           "failed_reads": t.failed_reads, "failed_writes": t.failed_writes, "corrupt": t.corrupt}
                    for name, t in stats.tiers.items()}
    return {"config": config_name, "store": {"device_bytes": config.device_bytes, "host_bytes": config.host_bytes,
                                             "disk_bytes": config.disk_bytes if config.disk_path else 0,
                                             "device": str(device)},
            "records": records, "tiers": tier_traffic, "dropped": stats.dropped, "failures": failures,
            "seconds": time.perf_counter() - started}


# --------------------------------------------------------------------------------------------- summaries

def _quantiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def summarize(run: dict[str, Any], block_nbytes: int, block_tokens: int, gpus: int, usd: float) -> dict[str, Any]:
    """Per-tier hit rates, TTFT quantiles, restore bandwidth and cost per 1M tokens of one replay."""
    recs = run["records"]
    requested = sum(r["prompt_blocks"] for r in recs)
    by_tier = {t: sum(r["hit_by_tier"].get(t, 0) for r in recs) for t in TIER_ORDER}
    hits = sum(r["hit_blocks"] for r in recs)
    restore_s = sum(r["restore_s"] for r in recs)
    prompt_tokens = sum(r["prompt_tokens"] for r in recs)
    hit_tokens = hits * block_tokens
    recompute_all_s = sum(r["recompute_all_s"] for r in recs)

    def per_million(seconds: float, tokens: int) -> dict[str, float] | None:
        if not tokens:
            return None
        gpu_s = seconds / tokens * 1e6 * gpus
        return {"gpu_seconds": gpu_s, "usd": gpu_s / 3600 * usd}

    ttft = _quantiles([r["ttft_s"] for r in recs])
    recompute = _quantiles([r["recompute_all_s"] for r in recs])
    return {
        "requests": len(recs), "prompt_tokens": prompt_tokens, "requested_blocks": requested,
        "hit_rate": hits / requested if requested else 0.0,
        "hit_rate_by_tier": {t: by_tier[t] / requested if requested else 0.0 for t in TIER_ORDER},
        "ttft_s": ttft, "recompute_all_ttft_s": recompute,
        "ttft_ratio_vs_recompute": ttft["mean"] / recompute["mean"],
        "restore_s": _quantiles([r["restore_s"] for r in recs]),
        "restored_bytes": hits * block_nbytes,
        "restore_gbps": hits * block_nbytes / restore_s / 1e9 if restore_s else None,
        "saved_bytes": sum(r["saved_blocks"] for r in recs) * block_nbytes,
        "save_s_total": sum(r["save_s"] for r in recs),
        "errors": sum(r["error"] is not None for r in recs),
        "cost_per_1m_tokens": {"from_cache": per_million(restore_s, hit_tokens),
                               "recomputed": per_million(recompute_all_s, prompt_tokens)},
        "replay_seconds": run["seconds"],
    }


# --------------------------------------------------------------------------------------------- run

def _memory_fits(opts: TraceOptions, config: str) -> tuple[bool, str]:
    """Whether a configuration's memory tiers fit in available memory (with room for the rest)."""
    cfg = opts.store_config(config, Path("/nonexistent"))
    need = cfg.host_bytes + (cfg.device_bytes if not torch.cuda.is_available() else 0)
    available = memory_available_bytes()
    if available is not None and need > 0.7 * available:
        return False, (f"skipped: its memory tiers need {need / GiB:.1f} GiB, more than 70% of the "
                       f"{available / GiB:.1f} GiB available")
    return True, ""


def run_trace(opts: TraceOptions, progress: Progress | None = None) -> tuple[dict[str, Any], list[str]]:
    """Every concurrency level x configuration: (JSON results, verification failures)."""
    layout = opts.layout
    results: dict[str, Any] = {
        "model": opts.preset.to_json(), "prefill": opts.prefill.to_json(),
        "layout": layout.to_dict(), "block_nbytes": layout.block_nbytes,
        "capacities": {"device_bytes": opts.device_bytes, "host_bytes": opts.host_bytes,
                       "disk_bytes": opts.disk_bytes},
        "gpu_hour_usd": opts.gpu_hour_usd, "configs": list(opts.configs), "levels": [],
    }
    failures: list[str] = []
    skipped = {c: why for c in opts.configs for ok, why in [_memory_fits(opts, c)] if not ok}
    results["skipped_configs"] = skipped
    parent = opts.disk_dir or ("." if Path(".").is_dir() else None)
    with tempfile.TemporaryDirectory(prefix="tierkv-trace-", dir=parent) as tmp:
        for n in opts.sessions:
            shape = opts.shape(n)
            requests = list(generate(shape, opts.seed))
            level: dict[str, Any] = {"sessions": n, "workload": shape.to_json(), "configs": {}}
            for config in opts.configs:
                if config in skipped:
                    continue
                workdir = Path(tmp) / f"s{n}"
                workdir.mkdir(exist_ok=True)
                run = replay(opts, config, requests, workdir, progress, f"{n} sessions")
                failures += run["failures"]
                summary = summarize(run, layout.block_nbytes, opts.block_tokens, opts.preset.gpus,
                                    opts.gpu_hour_usd)
                level["configs"][config] = {"summary": summary, "tiers": run["tiers"], "store": run["store"],
                                            "dropped": run["dropped"], "records": run["records"]}
            base = level["configs"].get("dram-only")
            for config, section in level["configs"].items():
                s = section["summary"]
                s["ttft_ratio_vs_dram_only"] = (s["ttft_s"]["mean"] / base["summary"]["ttft_s"]["mean"]
                                                if base else None)
            results["levels"].append(level)
    return results, failures


# --------------------------------------------------------------------------------------------- output

TABLE_HEADER = ("sessions / config", "hit dev/host/disk", "hit", "TTFT mean", "p50", "p99", "vs recompute",
                "vs dram-only")


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f} ms"


def table_rows(results: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for level in results["levels"]:
        first = next(iter(level["configs"].values()), None)
        for config, section in level["configs"].items():
            s = section["summary"]
            share = "/".join(f"{100 * s['hit_rate_by_tier'][t]:.0f}" for t in TIER_ORDER) + " %"
            vs_dram = "-" if s["ttft_ratio_vs_dram_only"] is None else f"{s['ttft_ratio_vs_dram_only']:.2f}x"
            rows.append((f"{level['sessions']:>4} {config}", share, f"{100 * s['hit_rate']:.1f}%",
                         _ms(s["ttft_s"]["mean"]), _ms(s["ttft_s"]["p50"]), _ms(s["ttft_s"]["p99"]),
                         f"{s['ttft_ratio_vs_recompute']:.2f}x", vs_dram))
        if first is not None:
            r = first["summary"]["recompute_all_ttft_s"]
            rows.append((f"{level['sessions']:>4} recompute", "-", "0.0%", _ms(r["mean"]), _ms(r["p50"]),
                         _ms(r["p99"]), "1.00x", "-"))
    return rows


def footnotes(results: dict[str, Any]) -> list[str]:
    model, prefill = results["model"], results["prefill"]
    notes = [f"model {model['name']}: {model['layers']} layers, {model['kv_heads']} KV heads x {model['head_dim']}, "
             f"{results['block_nbytes'] / 2**20:.2f} MiB per {results['layout']['block_tokens']}-token block",
             f"recompute: {prefill['how']} = {prefill['tokens_per_s_at_2048']:,.0f} prefill tokens/s at 2k tokens",
             "TTFT = restore (lookup + get, measured here) + recompute of the missed tokens (prefill model); "
             "no queueing. hit dev/host/disk = share of prompt blocks served from each tier.",
             "vs recompute / vs dram-only = mean TTFT over mean TTFT without a cache / with one DRAM tier of the "
             "same total bytes."]
    if not torch.cuda.is_available():
        notes.append("no CUDA device: the tiered store's device bytes joined its host tier (there is no HBM here)")
    for config, why in results.get("skipped_configs", {}).items():
        notes.append(f"{config}: {why}")
    costs = []
    for level in results["levels"]:
        for config, section in level["configs"].items():
            c = section["summary"]["cost_per_1m_tokens"]
            if c["from_cache"] and config == "tiered":
                costs.append(f"{level['sessions']} sessions: ${c['from_cache']['usd']:.4f} from cache vs "
                             f"${c['recomputed']['usd']:.4f} recomputed")
    if costs:
        notes.append(f"cost per 1M prompt tokens at ${results['gpu_hour_usd']:g}/GPU-hour (tiered): "
                     + "; ".join(costs))
    return notes


# --------------------------------------------------------------------------------------------- command line

def add_trace_arguments(p: argparse.ArgumentParser, profile: dict[str, Any]) -> None:
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS), help="model preset (default: %(default)s)")
    p.add_argument("--layers", type=int, help="override the preset's layers")
    p.add_argument("--kv-heads", type=int, help="override the preset's KV heads")
    p.add_argument("--head-dim", type=int, help="override the preset's head dimension")
    p.add_argument("--dtype", help="override the preset's KV dtype (e.g. float16)")
    p.add_argument("--block-tokens", type=int, default=16, help="tokens per block (default: 16)")
    p.add_argument("--sessions", type=positive_ints("session counts"), default=profile["sessions"],
                   help="concurrent sessions to sweep, comma-separated (default: %s)"
                        % ",".join(map(str, profile["sessions"])))
    p.add_argument("--requests", type=int, default=profile["requests"],
                   help="minimum requests per level (default: %(default)s)")
    p.add_argument("--requests-per-session", type=float, default=profile["requests_per_session"],
                   help="and at least this many per active session (default: %(default)s)")
    p.add_argument("--device-bytes", default=f"{profile['device_bytes'] >> 20}MiB",
                   help="device tier (default: %(default)s; host memory without a GPU)")
    p.add_argument("--host-bytes", default=f"{profile['host_bytes'] >> 20}MiB", help="host tier (default: %(default)s)")
    p.add_argument("--disk-bytes", default=f"{profile['disk_bytes'] >> 20}MiB", help="disk tier (default: %(default)s)")
    p.add_argument("--max-context", type=int, default=profile["workload"]["max_context"],
                   help="longest prompt a session reaches (default: %(default)s)")
    p.add_argument("--think-s", type=float, default=WorkloadShape.think_s, help="mean think time (virtual s)")
    p.add_argument("--document-share", type=float, default=WorkloadShape.document_share,
                   help="share of sessions about a long document (default: %(default)s)")
    p.add_argument("--zipf", type=float, default=WorkloadShape.zipf, help="popularity exponent (default: %(default)s)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                   help="model FLOPs utilisation of the H100 prefill preset (default: %(default)s)")
    p.add_argument("--prefill-tps", type=float,
                   help="your measured prefill tokens/s at 2k-token prompts (replaces the H100 preset)")
    p.add_argument("--measure-prefill", action="store_true",
                   help="time random layers of the model's width on this machine for the recompute speed")
    p.add_argument("--gpu-hour-usd", type=float, default=DEFAULT_GPU_HOUR_USD,
                   help="price of one GPU-hour for the cost figures (default: %(default)s)")
    p.add_argument("--configs", default="tiered,dram-only", help="tiered,dram-only (default: both)")


def build_parser(profile: dict[str, Any] = FULL) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierkv bench trace",
                                description="Replay a multi-turn serving workload; per-tier hits and TTFT.")
    p.add_argument("--profile", choices=("quick", "full"), default="full",
                   help="defaults for sessions, capacities and prompt lengths: quick is what `tierkv bench` runs "
                        "(default: %(default)s)")
    add_trace_arguments(p, profile)
    p.add_argument("--threads", type=int, default=4, help="disk I/O threads (default: 4)")
    p.add_argument("--disk-dir", help="where the temporary disk tier is made (default: current directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="bench-results", help="JSON and PNG files (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def options_from_args(a: argparse.Namespace, parser: argparse.ArgumentParser, profile: dict[str, Any]
                      ) -> TraceOptions:
    """Validate and build :class:`TraceOptions`; a bad value exits through ``parser.error`` saying why."""
    try:
        preset = PRESETS[a.model]
        overrides = {k: v for k, v in (("layers", a.layers), ("kv_heads", a.kv_heads), ("head_dim", a.head_dim),
                                       ("dtype", a.dtype)) if v is not None}
        if overrides:
            preset = replace(preset, name=f"{preset.name} (modified)", **overrides)
        preset.layout(a.block_tokens)  # validates the shape
        capacities = [parse_bytes(v, n) for v, n in ((a.device_bytes, "--device-bytes"),
                                                    (a.host_bytes, "--host-bytes"), (a.disk_bytes, "--disk-bytes"))]
        configs = tuple(c.strip() for c in a.configs.split(",") if c.strip())
        if not configs or not set(configs) <= {"tiered", "dram-only"}:
            raise ValueError(f"expected --configs from tiered,dram-only, got {a.configs!r}")
        if a.requests < 1 or a.requests_per_session < 0:
            raise ValueError(f"expected --requests >= 1 and --requests-per-session >= 0, "
                             f"got {a.requests} and {a.requests_per_session}")
        if a.gpu_hour_usd < 0:
            raise ValueError(f"expected --gpu-hour-usd >= 0, got {a.gpu_hour_usd}")
        workload = dict(profile["workload"], max_context=a.max_context, think_s=a.think_s,
                        document_share=a.document_share, zipf=a.zipf)
        WorkloadShape(**workload)  # validates
        if a.prefill_tps is not None:
            prefill = PrefillModel.from_tokens_per_s(preset, a.prefill_tps)
        elif a.measure_prefill:
            flops, info = measure_prefill_flops(preset)
            scale = preset.gpus if info["device"] != "CPU" else 1
            prefill = PrefillModel(preset, flops * scale,
                                   f"measured: {info['layers_timed']} random layer(s) of {preset.name}'s width, "
                                   f"{info['prompt_tokens']}-token prefill on {info['device']} ({info['dtype']}), "
                                   f"{flops / 1e12:.2f} TFLOP/s" + (f" x {scale} GPUs" if scale > 1 else ""))
        else:
            prefill = PrefillModel.from_peak(preset, a.mfu)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    return TraceOptions(preset=preset, prefill=prefill, sessions=a.sessions, requests=a.requests,
                        requests_per_session=a.requests_per_session, device_bytes=capacities[0],
                        host_bytes=capacities[1], disk_bytes=capacities[2], workload=workload,
                        block_tokens=a.block_tokens, threads=getattr(a, "threads", 4), configs=configs,
                        gpu_hour_usd=a.gpu_hour_usd, disk_dir=a.disk_dir, seed=a.seed)


def progress_steps(opts: TraceOptions) -> int:
    return 4 * len(opts.sessions) * len(opts.configs)


def print_report(results: dict[str, Any]) -> None:
    print(format_table(TABLE_HEADER, table_rows(results)))
    print()
    for note in footnotes(results):
        print(f"  * {note}")


PROFILES = {"quick": QUICK, "full": FULL}


def main(argv: list[str] | None = None) -> int:
    """``tierkv bench trace``: replay, print the table, write trace.json (and PNG plots)."""
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--profile", choices=sorted(PROFILES), default="full")
    known, _ = first.parse_known_args(argv)
    profile = PROFILES[known.profile]
    parser = build_parser(profile)
    a = parser.parse_args(argv)
    opts = options_from_args(a, parser, profile)
    out_dir = Path(a.out_dir)
    print(f"tierkv bench trace: {opts.preset.name}, {opts.layout.block_nbytes / 2**20:.2f} MiB blocks, sessions "
          f"{','.join(map(str, opts.sessions))}, tiers {opts.device_bytes >> 20}/{opts.host_bytes >> 20}/"
          f"{opts.disk_bytes >> 20} MiB", flush=True)
    started = time.time()
    with Progress(progress_steps(opts)) as progress:
        results, failures = run_trace(opts, progress)
    document = {"benchmark": "tierkv.bench.trace", "duration_s": time.time() - started,
                "machine": describe_machine(), "trace": results, "verified": not failures,
                "verify_failures": failures}
    write_json(out_dir / "trace.json", document)
    print()
    print_report(results)
    if not a.no_plots:
        from .plots import plot_trace

        for line in plot_trace(results, out_dir):
            print(f"  * {line}")
    print(f"\n{document['duration_s']:.1f} s; results in {out_dir / 'trace.json'}")
    return verification_status(failures, "a restore returned blocks that are not the ones asked for")


if __name__ == "__main__":
    sys.exit(main())
