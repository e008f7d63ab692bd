"""Disk I/O backends for the disk tier, chosen once per store.

``posix``: O_DIRECT ``pread``/``pwrite`` on a thread pool (always available).
``kvikio``: GPUDirect Storage through kvikio (the ``gds`` extra), usable only where a CUDA driver exists.
"""
from __future__ import annotations

import ctypes
import importlib.util
import logging
from typing import Protocol

import torch

from .posix import PosixFile

__all__ = ["DataFile", "open_data_file", "backend_status", "kvikio_usable"]

log = logging.getLogger("tierkv.io")


class DataFile(Protocol):
    name: str
    path: str
    size: int
    direct: bool
    found_size: int  # bytes the file had when opened, before it was sized
    reserve_error: "OSError | None"  # why its space could not be reserved at open (it is sparse then)

    def pwrite(self, buf: torch.Tensor, offset: int) -> None: ...
    def pwritev(self, bufs: list[torch.Tensor], offset: int) -> None: ...
    def pread(self, buf: torch.Tensor, offset: int) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


def kvikio_usable() -> tuple[bool, str]:
    """Whether kvikio can do I/O here, and why not. Without libcuda every kvikio call fails (even in compat
    mode), so the driver is probed before kvikio is trusted."""
    if importlib.util.find_spec("kvikio") is None:
        return False, "kvikio is not installed (pip install 'tierkv[gds]')"
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no CUDA driver (libcuda.so.1 not loadable)"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, "available"


def open_data_file(path: str, size: int, backend: str = "auto") -> DataFile:
    """Open (creating and sizing) the data file with the requested backend.

    ``auto`` picks kvikio when :func:`kvikio_usable`, else POSIX. Asking for ``kvikio`` where it cannot work is
    a ``ValueError`` naming the reason.
    """
    if backend == "posix":
        return PosixFile(path, size)
    usable, why = kvikio_usable()
    if backend == "kvikio" and not usable:
        raise ValueError(f"expected a usable kvikio for disk_backend='kvikio', got: {why}")
    if usable:
        from .kvikio import KvikioFile

        return KvikioFile(path, size)
    return PosixFile(path, size)


def backend_status() -> dict[str, str]:
    usable, why = kvikio_usable()
    return {"posix": "available (O_DIRECT where the filesystem allows it)", "kvikio": why}
