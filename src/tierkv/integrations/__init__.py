"""Adapters between tierkv and inference engines. Each engine's adapter lives in its own subpackage and is the
only code that imports that engine."""
