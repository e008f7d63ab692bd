"""POSIX data file: O_DIRECT positional I/O from page-aligned host buffers.

O_DIRECT keeps blocks out of the page cache (a KV cache would only evict the pages the OS needs) and makes
reads really come from the device. Filesystems that refuse it (tmpfs) get buffered I/O, and ``direct`` says so.
All methods release the GIL inside the system calls, so a thread pool gets parallel I/O.
"""
from __future__ import annotations

import errno
import logging
import os

import torch

from .._fs import open_private_file

__all__ = ["PosixFile", "free_space"]

log = logging.getLogger("tierkv.io")


def _buffer(t: torch.Tensor) -> memoryview:
    return memoryview(t.numpy()).cast("B")


class PosixFile:
    """A data file of ``size`` bytes opened for positional reads and writes."""

    name = "posix"

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT
        direct = getattr(os, "O_DIRECT", 0)
        # 0600, never through a symlink, only a regular file of this user (or the directory's owner).
        try:
            self._fd = open_private_file(path, flags | direct, "the data file")
            self.direct = bool(direct)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fd = open_private_file(path, flags, "the data file")
            self.direct = False
            log.warning("%s: the filesystem refuses O_DIRECT; using buffered I/O (reads may hit the page cache)",
                        path)
        try:
            self._resize(size)
        except BaseException:
            os.close(self._fd)
            raise
        self.size = size

    #: size of the file when it was opened, before it was sized: slots at or past it held no data (a new file,
    #: or one truncated since it was written)
    found_size: int = 0
    #: why the file's space could not be reserved at open (None when it was); it is then sparse
    reserve_error: OSError | None = None

    def _resize(self, size: int) -> None:
        current = self.found_size = os.fstat(self._fd).st_size
        if current > size:
            os.ftruncate(self._fd, size)
        elif current < size:
            # Reserve the blocks now so a full filesystem shows up at open, not as failed writes later;
            # where the filesystem cannot (or is too full), a sparse file still works and ENOSPC becomes a miss.
            try:
                os.posix_fallocate(self._fd, current, size - current)
            except OSError as exc:
                self.reserve_error = exc
                log.warning("%s: could not reserve %d bytes for the disk tier (%s; %s free on that filesystem); "
                            "using a sparse file: blocks that find no space are not kept on disk (counted in "
                            "stats()['disk'].failed_writes). Free space or lower disk_bytes.",
                            self.path, size - current, exc.strerror, free_space(self.path))
                os.ftruncate(self._fd, size)

    def pwrite(self, buf: torch.Tensor, offset: int) -> None:
        """Write all of ``buf`` (aligned host memory when ``direct``) at ``offset``."""
        view = _buffer(buf)
        done = 0
        while done < len(view):
            n = os.pwritev(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, f"short write to {self.path} at offset {offset + done}")
            done += n

    def pwritev(self, bufs: list[torch.Tensor], offset: int) -> None:
        """Write ``bufs`` back to back from ``offset`` in one request (each aligned host memory when ``direct``):
        consecutive slots staged in separate buffers reach the device as one large I/O."""
        views = [_buffer(b) for b in bufs]
        while views:
            n = os.pwritev(self._fd, views, offset)
            if n <= 0:
                raise OSError(errno.ENOSPC, f"short write to {self.path} at offset {offset}")
            offset += n
            while views and n >= len(views[0]):  # drop what was written; resume inside a partly written view
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def pread(self, buf: torch.Tensor, offset: int) -> None:
        """Fill all of ``buf`` from ``offset``; a short read (truncated file) is ``EIO``."""
        view = _buffer(buf)
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short read from {self.path} at offset {offset + done}: "
                                         f"got {done} of {len(view)} bytes")
            done += n

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def free_space(path: str) -> str:
    """Bytes available to this user on the filesystem holding ``path``, for messages ("unknown" if unknowable)."""
    try:
        st = os.statvfs(os.path.dirname(path) or ".")
    except OSError:
        return "unknown bytes"
    return f"{st.f_bavail * st.f_frsize} bytes"
