"""kvikio data file: GPUDirect Storage where the driver supports it, kvikio's own POSIX path otherwise.

kvikio imports without a GPU but every read and write fails without ``libcuda.so.1``, so this backend is only
chosen when a CUDA driver is present (see ``tierkv.io.open_data_file``).
"""
from __future__ import annotations

import os

import torch

from .posix import PosixFile

__all__ = ["KvikioFile"]


class KvikioFile:
    """Positional I/O through ``kvikio.CuFile`` on host or device buffers."""

    name = "kvikio"
    direct = True

    def __init__(self, path: str, size: int) -> None:
        import kvikio  # optional extra "gds"

        # Create, size and preallocate the file the POSIX way; kvikio then opens it for data.
        posix = PosixFile(path, size)
        posix.close()
        self.found_size, self.reserve_error = posix.found_size, posix.reserve_error
        self.path = path
        self.size = size
        self._file = kvikio.CuFile(path, "r+")
        self._sync_fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0))

    def pwrite(self, buf: torch.Tensor, offset: int) -> None:
        future = self._file.pwrite(buf, buf.numel(), offset)
        n = future.get()  # buf stays referenced until the I/O completes: kvikio's futures do not keep it alive
        if n != buf.numel():
            raise OSError(28, f"short write to {self.path} at offset {offset}: {n} of {buf.numel()} bytes")

    def pwritev(self, bufs: list[torch.Tensor], offset: int) -> None:
        # kvikio has no vectored write; its own thread pool splits each request, so one per buffer is fine.
        for buf in bufs:
            self.pwrite(buf, offset)
            offset += buf.numel()

    def pread(self, buf: torch.Tensor, offset: int) -> None:
        future = self._file.pread(buf, buf.numel(), offset)
        n = future.get()
        if n != buf.numel():
            raise OSError(5, f"short read from {self.path} at offset {offset}: {n} of {buf.numel()} bytes")

    def sync(self) -> None:
        os.fdatasync(self._sync_fd)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            os.close(self._sync_fd)
