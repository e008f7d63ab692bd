"""``tierkv bench``: the standalone benchmark operators run before they deploy (see docs/benchmark.md).

    tierkv bench            the default run (`make bench`): quick `paths` sweep, quick `trace`, component checks
    tierkv bench paths      GB/s of every data path beside its same-run ceiling, over block sizes and I/O threads
    tierkv bench trace      a multi-turn serving workload: per-tier hit rates, TTFT estimates, cost per 1M tokens
    tierkv bench tiers      one layout, every tier and component check in one table (the developer's view)
    tierkv bench soak       many threads at full tier pressure for minutes: memory, fds, threads, throughput

Each writes JSON with every figure and the machine's description, and PNG plots, under ``--out-dir``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from . import paths as paths_bench
from . import tier as tier_bench
from . import trace as trace_bench
from .models import PRESETS
from .progress import Progress
from .report import describe_machine, format_table, verification_status, write_json

__all__ = ["main"]


def _soak_main(argv: list[str]) -> int:
    from .soak import main as soak_main  # late: only the soak needs its /proc and malloc probes

    return soak_main(argv)


SUBCOMMANDS = {"paths": paths_bench.main, "trace": trace_bench.main, "tiers": tier_bench.main, "soak": _soak_main}
SECTIONS = ("paths", "trace", "components")
COMPONENTS = "keys,lookup,disk-codec,policy,async"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tierkv bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        epilog="Options of a subcommand: tierkv bench SUBCOMMAND --help.")
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS),
                   help="KV layout of the paths sweep and the trace (default: %(default)s)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--full", action="store_true",
                   help="the full sweeps of `paths` and `trace` instead of the quick ones (tens of minutes)")
    p.add_argument("--disk-dir", help="where temporary disk tiers are made: put it on the NVMe you will use "
                                      "(default: current directory)")
    p.add_argument("--out-dir", default="bench-results", help="JSON and PNG files (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p


def run_default(argv: list[str]) -> int:
    parser = _parser()
    a = parser.parse_args(argv)
    sections = tuple(s.strip() for s in a.sections.split(",") if s.strip())
    if not sections or not set(sections) <= set(SECTIONS):
        parser.error(f"expected --sections from {','.join(SECTIONS)}, got {a.sections!r}")
    profile = "full" if a.full else "quick"
    out_dir = Path(a.out_dir)
    common = ["--seed", str(a.seed)] + (["--disk-dir", a.disk_dir] if a.disk_dir else [])
    document: dict[str, Any] = {"benchmark": "tierkv bench", "profile": profile, "machine": describe_machine(),
                                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    failures: list[str] = []
    plots: list[str] = []
    tables: list[tuple[str, str, list[str]]] = []
    started = time.time()
    print(f"tierkv bench ({profile}): {', '.join(sections)}; {a.model}; results in {out_dir}/", flush=True)

    if "paths" in sections:
        p = paths_bench.build_parser()
        opts = paths_bench.options_from_args(
            p.parse_args(paths_bench.apply_profile(["--profile", profile, "--model", a.model, *common])), p)
        print("\n== paths: achieved GB/s vs same-run ceiling ==", flush=True)
        t0 = time.time()
        with Progress(paths_bench.progress_steps(opts)) as progress:
            results, section_failures = paths_bench.run_paths(opts, progress)
        document["paths"] = {**results, "duration_s": time.time() - t0}
        failures += [f"paths: {f}" for f in section_failures]
        tables.append(("paths", format_table(paths_bench.TABLE_HEADER, paths_bench.table_rows(results)),
                       paths_bench.footnotes(results, opts.repeats)))
        if not a.no_plots:
            from .plots import plot_paths

            plots += plot_paths(results["rows"], out_dir)

    if "trace" in sections:
        trace_profile = trace_bench.PROFILES[profile]
        p = trace_bench.build_parser(trace_profile)
        opts_t = trace_bench.options_from_args(p.parse_args(["--profile", profile, "--model", a.model, *common]),
                                               p, trace_profile)
        print("\n== trace: multi-turn serving workload, TTFT estimates ==", flush=True)
        t0 = time.time()
        with Progress(trace_bench.progress_steps(opts_t)) as progress:
            results, section_failures = trace_bench.run_trace(opts_t, progress)
        document["trace"] = {**results, "duration_s": time.time() - t0}
        failures += [f"trace: {f}" for f in section_failures]
        tables.append(("trace", format_table(trace_bench.TABLE_HEADER, trace_bench.table_rows(results)),
                       trace_bench.footnotes(results)))
        if not a.no_plots:
            from .plots import plot_trace

            plots += plot_trace(results, out_dir)

    if "components" in sections:
        opts_c = tier_bench.parse_args(["--tiers", COMPONENTS, "--repeats", "3", *common])
        print("\n== components: block_keys, lookup_tokens, fp8 disk tier, eviction policy, write-behind ==",
              flush=True)
        t0 = time.time()
        results, rows, section_failures = tier_bench.run(opts_c)
        document["components"] = {**results, "duration_s": time.time() - t0}
        failures += [f"components: {f}" for f in section_failures]
        tables.append(("components", format_table(tier_bench.HEADER, rows), tier_bench.footnotes(opts_c, results)))

    document.update(duration_s=time.time() - started, verified=not failures, verify_failures=failures)
    write_json(out_dir / "bench.json", document)
    for name, table, notes in tables:
        print(f"\n== {name} ==\n{table}\n")
        for note in notes:
            print(f"  * {note}")
    for line in plots:
        print(f"  * {line}")
    print(f"\n{document['duration_s']:.1f} s; every figure in {out_dir / 'bench.json'}")
    return verification_status(failures)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv and not argv[0].startswith("-"):
        print(f"tierkv bench: expected a subcommand from {', '.join(SUBCOMMANDS)} or options, got {argv[0]!r}",
              file=sys.stderr)
        return 2
    return run_default(argv)


if __name__ == "__main__":
    sys.exit(main())
