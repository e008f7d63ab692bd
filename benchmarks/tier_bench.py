"""Standalone tier benchmark: ``python benchmarks/tier_bench.py [--help]``.

The code lives in :mod:`tierkv.bench.tier` so the installed ``tierkv bench`` command runs the same thing.
"""
import sys

from tierkv.bench.tier import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
