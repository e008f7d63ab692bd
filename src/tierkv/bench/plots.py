"""PNG plots of the benchmark's results (matplotlib, the ``bench`` extra; skipped with a note without it).

- ``trace_ttft.png``: mean TTFT against concurrent sessions, per configuration and for recompute-everything;
- ``trace_hit_rate.png``: share of prompt blocks served from each tier, per concurrency level (tiered store);
- ``paths_bandwidth.png``: achieved GB/s beside the same-run ceiling, per path and block size.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["plot_trace", "plot_paths", "plots_available"]

_TIER_COLOURS = {"device": "#2b8cbe", "host": "#7bccc4", "disk": "#fdae6b"}


def plots_available() -> tuple[bool, str]:
    if importlib.util.find_spec("matplotlib") is None:
        return False, "plots skipped: matplotlib is not installed (pip install 'tierkv[bench]')"
    return True, ""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    return plt


def plot_trace(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Write the trace's two plots; returns one line per file written (or why none was)."""
    ok, why = plots_available()
    if not ok:
        return [why]
    if not results["levels"]:
        return ["trace plots skipped: no level was run"]
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    sessions = [level["sessions"] for level in results["levels"]]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    configs = sorted({c for level in results["levels"] for c in level["configs"]})
    for config in configs:
        points = [(level["sessions"], level["configs"][config]["summary"]["ttft_s"]["mean"] * 1e3)
                  for level in results["levels"] if config in level["configs"]]
        ax.plot(*zip(*points), marker="o", label=f"tierkv {config}")
    recompute = [next(iter(level["configs"].values()))["summary"]["recompute_all_ttft_s"]["mean"] * 1e3
                 for level in results["levels"] if level["configs"]]
    ax.plot(sessions[:len(recompute)], recompute, marker="s", linestyle="--", color="grey",
            label="recompute everything")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sessions, [str(s) for s in sessions])
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("mean TTFT estimate (ms)")
    ax.set_title(f"TTFT, {results['model']['name']}: restore measured here + recompute of misses")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "trace_ttft.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(f"plot: {path}")

    levels = [level for level in results["levels"] if "tiered" in level["configs"]]
    if levels:
        fig, ax = plt.subplots(figsize=(8.5, 4.5))
        xs = range(len(levels))
        bottom = [0.0] * len(levels)
        for tier, colour in _TIER_COLOURS.items():
            share = [100 * level["configs"]["tiered"]["summary"]["hit_rate_by_tier"][tier] for level in levels]
            ax.bar(xs, share, bottom=bottom, color=colour, label=tier)
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.bar(xs, [100 - b for b in bottom], bottom=bottom, color="#dddddd", label="miss (recomputed)")
        ax.set_xticks(list(xs), [str(level["sessions"]) for level in levels])
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("share of prompt blocks (%)")
        ax.set_ylim(0, 100)
        ax.set_title("where prompt blocks came from (tiered store)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the bars fill the axes
        fig.tight_layout()
        path = out_dir / "trace_hit_rate.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(f"plot: {path}")
    return written


def plot_paths(rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Achieved vs ceiling GB/s per path (one panel per path kind, block size on the x axis)."""
    ok, why = plots_available()
    if not ok:
        return [why]
    if not rows:
        return ["paths plot skipped: no path was measured"]
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        kinds.setdefault(row["path"], []).append(row)
    ncols = min(3, len(kinds))
    nrows = (len(kinds) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (kind, items) in zip(axes.flat, kinds.items()):
        series: dict[str, list[tuple[float, float, float]]] = {}
        for r in items:
            label = f"{r['threads']} thr" if r.get("threads") else "ours"
            series.setdefault(label, []).append((r["block_bytes"] / 2**20, r["ours_gbps"], r["ceiling_gbps"]))
        for i, (label, pts) in enumerate(sorted(series.items())):
            pts.sort()
            x = [p[0] for p in pts]
            line = ax.plot(x, [p[1] for p in pts], marker="o", label=f"ours {label}" if label != "ours" else "ours")
            ax.plot(x, [p[2] for p in pts], linestyle="--", color=line[0].get_color(),
                    label="ceiling" + (f" {label}" if label != "ours" else ""))
        ax.set_xscale("log", base=2)
        ax.set_title(kind, fontsize=10)
        ax.set_xlabel("block size (MiB)")
        ax.set_ylabel("GB/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kinds):]:
        ax.set_visible(False)
    fig.suptitle("achieved vs same-run ceiling (dashed)")
    fig.tight_layout()
    path = out_dir / "paths_bandwidth.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [f"plot: {path}"]
