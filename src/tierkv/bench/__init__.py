"""Standalone benchmarks of tierkv (``tierkv bench``); see :mod:`tierkv.bench.tier`."""
