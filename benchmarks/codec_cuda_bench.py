"""Bandwidth of the CUDA codec kernels next to the GPU's own copy bandwidth (needs a CUDA GPU).

    python benchmarks/codec_cuda_bench.py [--gib 1] [--layers 32] [--iters 20] [--json PATH]

Blocks have a Llama-3-8B layout by default (32 layers, 8 KV heads, head_dim 128, 16 tokens a block, bfloat16:
2 MiB a block), ~1 GiB of them per launch. Reported, all timed with CUDA events (median of --iters):

- d2d copy           a device-to-device copy of the same bytes; traffic = bytes read + bytes written
- quantize / dequantize (fp8, int8) through the public codec (pointer-table upload included):
                     bf16 GB/s = raw block bytes per second; traffic GB/s = bytes read + written, and its share of
                     the d2d copy's traffic rate (the target for quantize: >= 60 %)
- d2h / h2d effective: delivered bf16 bytes per second to / from pinned host memory, raw bf16 copies vs
                     fp8 (quantize then copy the encoded rows; copy then dequantize), one stream, no overlap.

Exits with status 2 and a message when there is no usable GPU or the CUDA kernels are not built.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import tierkv
from tierkv import ops
from tierkv.codec import make_codec


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` on the current stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="GiB of bf16 blocks per launch (default 1)")
    parser.add_argument("--layers", type=int, default=32, help="layers in a block (default 32)")
    parser.add_argument("--heads", type=int, default=8, help="KV heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=128, help="head_dim (default 128)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens a block (default 16)")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions, median reported (default 20)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("codec_cuda_bench: no CUDA device (torch.cuda.is_available() is False); nothing to measure",
              file=sys.stderr)
        return 2
    if ops.cuda() is None:
        print(f"codec_cuda_bench: the CUDA kernels are not usable: {ops.cuda_status()}", file=sys.stderr)
        return 2

    layout = tierkv.KVLayout(num_layers=args.layers, num_kv_heads=args.heads, head_dim=args.head_dim,
                             block_tokens=args.tokens, dtype=torch.bfloat16)
    n = max(1, int(args.gib * (1 << 30)) // layout.block_nbytes)
    raw_bytes = n * layout.block_nbytes
    blocks = (torch.randn((n, *layout.block_shape), device="cuda", dtype=torch.float32)
              .mul_(3.0).to(torch.bfloat16))
    results: dict = {
        "device": torch.cuda.get_device_name(),
        "kernels": ops.cuda().build_info(),
        "layout": str(layout),
        "blocks": n,
        "bf16_bytes": raw_bytes,
    }
    rows: list[tuple[str, float, float | None, float | None]] = []  # name, bf16 GB/s, traffic GB/s, % of copy

    copy_dst = torch.empty_like(blocks)
    t = timed(lambda: copy_dst.copy_(blocks), args.iters)
    copy_traffic = 2 * raw_bytes / t / 1e9
    results["d2d_copy"] = {"seconds": t, "traffic_GBps": copy_traffic}
    rows.append(("d2d copy", raw_bytes / t / 1e9, copy_traffic, 100.0))
    del copy_dst

    pinned_raw = torch.empty((n, layout.block_nbytes), dtype=torch.uint8, pin_memory=True)
    raw_view = blocks.view(n, -1).view(torch.uint8)
    t_d2h = timed(lambda: pinned_raw.copy_(raw_view, non_blocking=True), args.iters)
    t_h2d = timed(lambda: raw_view.copy_(pinned_raw, non_blocking=True), args.iters)
    results["bf16_d2h"] = {"seconds": t_d2h, "effective_GBps": raw_bytes / t_d2h / 1e9}
    results["bf16_h2d"] = {"seconds": t_h2d, "effective_GBps": raw_bytes / t_h2d / 1e9}
    rows.append(("bf16 d2h (pinned)", raw_bytes / t_d2h / 1e9, None, None))
    rows.append(("bf16 h2d (pinned)", raw_bytes / t_h2d / 1e9, None, None))
    del pinned_raw

    for name in ("fp8", "int8"):
        codec = make_codec(name, layout)
        encoded = torch.empty((n, codec.nbytes), dtype=torch.uint8, device="cuda")
        decoded = torch.empty_like(blocks)
        traffic = raw_bytes + n * codec.nbytes
        tq = timed(lambda: codec.encode(blocks, encoded), args.iters)
        td = timed(lambda: codec.decode(encoded, decoded), args.iters)
        results[f"{name}_quantize"] = {"seconds": tq, "bf16_GBps": raw_bytes / tq / 1e9,
                                       "traffic_GBps": traffic / tq / 1e9,
                                       "share_of_copy": traffic / tq / 1e9 / copy_traffic}
        results[f"{name}_dequantize"] = {"seconds": td, "bf16_GBps": raw_bytes / td / 1e9,
                                         "traffic_GBps": traffic / td / 1e9,
                                         "share_of_copy": traffic / td / 1e9 / copy_traffic}
        rows.append((f"{name} quantize", raw_bytes / tq / 1e9, traffic / tq / 1e9, 100 * traffic / tq / 1e9 / copy_traffic))
        rows.append((f"{name} dequantize", raw_bytes / td / 1e9, traffic / td / 1e9, 100 * traffic / td / 1e9 / copy_traffic))

        if name == "fp8":
            pinned = torch.empty((n, codec.nbytes), dtype=torch.uint8, pin_memory=True)

            def down():
                codec.encode(blocks, encoded)
                pinned.copy_(encoded, non_blocking=True)

            def up():
                encoded.copy_(pinned, non_blocking=True)
                codec.decode(encoded, decoded)

            t_down, t_up = timed(down, args.iters), timed(up, args.iters)
            results["fp8_d2h"] = {"seconds": t_down, "effective_GBps": raw_bytes / t_down / 1e9}
            results["fp8_h2d"] = {"seconds": t_up, "effective_GBps": raw_bytes / t_up / 1e9}
            rows.append(("fp8 d2h (quantize+copy)", raw_bytes / t_down / 1e9, None, None))
            rows.append(("fp8 h2d (copy+dequantize)", raw_bytes / t_up / 1e9, None, None))
            del pinned
        del encoded, decoded

    print(f"{results['device']}: {n} blocks of {layout} ({raw_bytes / (1 << 30):.2f} GiB bf16)")
    print(f"kernels: {results['kernels']}")
    print(f"{'operation':<28}{'bf16 GB/s':>12}{'traffic GB/s':>15}{'% of d2d':>10}")
    for name, rate, traffic, share in rows:
        t_col = f"{traffic:15.1f}" if traffic is not None else f"{'':>15}"
        s_col = f"{share:9.0f}%" if share is not None else f"{'':>10}"
        print(f"{name:<28}{rate:12.1f}{t_col}{s_col}")
    q = results["fp8_quantize"]["share_of_copy"]
    print(f"fp8 quantize reaches {100 * q:.0f}% of the d2d copy rate (target >= 60%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
