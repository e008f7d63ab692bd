"""What every benchmark report shares: the machine description, aligned tables and atomic JSON files."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import tierkv
from tierkv import ops

__all__ = ["describe_machine", "filesystem_of", "format_table", "write_json", "memory_available_bytes",
           "positive_ints", "verification_status"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns: the first left-aligned, figures right-aligned."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def write_json(path: Path, results: dict[str, Any], default: Callable[[Any], Any] | None = None) -> None:
    """``results`` as indented JSON at ``path``, atomically (``default`` as for ``json.dumps``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=default) + "\n")
    os.replace(tmp, path)  # never leave a half-written result behind


def positive_ints(what: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse ``type`` for a comma-separated list of counts >= 1 (``what`` names them in the error)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} >= 1, got {text!r}")
        return values

    return parse


def verification_status(failures: Sequence[str], what: str = "the store did not return what was put",
                        limit: int | None = 20) -> int:
    """The exit status of a benchmark: 0, or 1 after printing the (first ``limit``) verification failures."""
    if not failures:
        return 0
    print(f"\n!!! VERIFICATION FAILED: {what} !!!", file=sys.stderr)
    for f in list(failures)[:limit]:
        print(f"!!! {f}", file=sys.stderr)
    return 1


def memory_available_bytes() -> int | None:
    """MemAvailable: what can be allocated without swapping (Linux), else None."""
    return _meminfo_bytes("MemAvailable")



def describe_machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpuinfo_field("model name"),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if cuda else None,
        "cuda_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "tierkv": tierkv.__version__,
        "native_ops": ops.native_status(),
    }


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass  # not Linux: the model is simply unknown
    return platform.processor() or None


def _meminfo_bytes(name: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == name:
                    return int(value.split()[0]) * 1024  # /proc/meminfo counts kB
    except OSError:
        pass
    return None


def filesystem_of(path: Path) -> dict[str, Any]:
    """Mount point, device and type of the filesystem holding ``path`` (the longest matching mount)."""
    real = os.path.realpath(path)
    best = ("?", "/", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mount, fstype = line.split()[:3]
                mount = mount.replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (dev, mount, fstype)
    except OSError:
        pass
    st = os.statvfs(path)
    return {"path": real, "device": best[0], "mount": best[1], "type": best[2],
            "free_bytes": st.f_bavail * st.f_frsize}


