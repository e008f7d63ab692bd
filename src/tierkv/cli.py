"""Command line: ``tierkv info`` and ``tierkv bench``."""
from __future__ import annotations

import argparse
import platform
import sys

__all__ = ["main"]


def _info(_args: argparse.Namespace) -> int:
    import torch

    from . import __version__, ops
    from .config import StoreConfig
    from .io import backend_status

    print(f"tierkv        {__version__}")
    print(f"python        {platform.python_version()} ({sys.executable})")
    print(f"torch         {torch.__version__}")
    print(f"cuda          {'available: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"native ops    {ops.native_status()}")
    module = ops.native()
    if module is not None and hasattr(module, "cpu_isa"):
        print(f"cpu codecs    {module.cpu_isa()} kernels")
    print(f"cuda codecs   {ops.cuda_status()}")
    for name, status in backend_status().items():
        print(f"disk backend  {name}: {status}")
    print("settings (environment variable, default):")
    for name, env, default, help_text in StoreConfig.describe():
        print(f"  {env:<22} {default!r:<12} {help_text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark owns its options (argparse's REMAINDER drops leading "-" ones)
        from .bench.main import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="tierkv", description="Tiered KV-cache block store.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, native module status, disk backends, settings").set_defaults(func=_info)
    sub.add_parser("bench", help="the benchmark: default run, or paths | trace | tiers (tierkv bench --help; "
                                 "docs/benchmark.md)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
