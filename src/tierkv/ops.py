"""The only door to compiled code.

The native module is loaded lazily on first use. When it is missing, failed to load, or
``TIERKV_FORCE_REFERENCE=1`` is set, every op runs its in-tree pure-Python reference and
:func:`native_status` says why.
"""
from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

__all__ = ["native", "native_status", "force_reference"]

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_why_not: str | None = None


def force_reference() -> bool:
    return os.environ.get("TIERKV_FORCE_REFERENCE", "").strip().lower() in ("1", "true", "yes", "on")


def native() -> ModuleType | None:
    """The ``tierkv._C`` module, or None when the reference path must be used."""
    global _loaded, _module, _why_not
    if force_reference():
        return None
    if not _loaded:
        with _lock:
            if not _loaded:
                try:
                    _module = importlib.import_module("tierkv._C")
                except ImportError as exc:  # not built, or built for another ABI: run the references
                    _why_not = f"{type(exc).__name__}: {exc}"
                _loaded = True
    return _module


def native_status() -> str:
    """One line: whether native ops are in use, and why not when they are not."""
    if force_reference():
        return "reference (TIERKV_FORCE_REFERENCE is set)"
    if native() is not None:
        return f"native ({_module.__file__})"
    return f"reference (native module unavailable: {_why_not})"
