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

__all__ = ["native", "native_status", "force_reference", "cuda", "cuda_status"]

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None
_why_not: str | None = None
_cuda_loaded = False
_cuda_module: ModuleType | None = None
_cuda_why_not: str | None = None


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


def cuda() -> ModuleType | None:
    """The ``tierkv._C_cuda`` kernels, or None for the torch reference: when they were not built (no nvcc at
    build time), failed to load, or cannot run here (no CUDA device or driver, a GPU older than compute
    capability 8.0, a driver too old for the build); :func:`cuda_status` says which.

    Loaded on first use by a CUDA tensor, never at import, so importing tierkv loads no CUDA code.
    """
    global _cuda_loaded, _cuda_module, _cuda_why_not
    if force_reference():
        return None
    if not _cuda_loaded:
        with _lock:
            if not _cuda_loaded:
                try:
                    module = importlib.import_module("tierkv._C_cuda")
                except ImportError as exc:
                    _cuda_why_not = f"{type(exc).__name__}: {exc}"
                else:
                    # The module links cudart statically, so it imports without a GPU; whether its kernels can
                    # run is a separate question, answered once (devices and drivers do not change under us).
                    reason = module.unusable_reason()
                    if reason is None:
                        _cuda_module = module
                    else:
                        _cuda_why_not = f"built ({module.build_info()}) but unusable: {reason}"
                _cuda_loaded = True
    return _cuda_module


def cuda_status() -> str:
    """One line: whether the CUDA kernels are built and usable, and why not when they are not."""
    if force_reference():
        return "reference (TIERKV_FORCE_REFERENCE is set)"
    if cuda() is not None:
        return f"native ({_cuda_module.__file__}; {_cuda_module.build_info()})"
    return f"reference (CUDA kernels unavailable: {_cuda_why_not})"
