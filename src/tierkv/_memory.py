"""Host buffers that O_DIRECT and DMA engines accept."""
from __future__ import annotations

import threading

import numpy as np
import torch

ALIGNMENT = 4096  # the largest logical block size O_DIRECT asks for on Linux filesystems


def round_up(n: int, multiple: int = ALIGNMENT) -> int:
    return (n + multiple - 1) // multiple * multiple


def aligned_empty(nbytes: int, pinned: bool = False) -> torch.Tensor:
    """A 1-D uint8 CPU tensor of ``nbytes`` whose first byte is ``ALIGNMENT``-aligned.

    Pinned (page-locked) only when asked and CUDA is available: ``pin_memory=True`` raises without CUDA.
    The view keeps its over-allocated base alive.
    """
    pin = pinned and torch.cuda.is_available()
    base = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8, pin_memory=pin)
    offset = (-base.data_ptr()) % ALIGNMENT
    return base[offset:offset + nbytes]


def copy_bytes(dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
    """``dst.copy_(src)`` for same-shaped tensors, as one single-threaded memcpy when both are in host memory.

    torch spreads a large host copy over its intra-op (OpenMP) threads, which wait for one another whenever other
    work keeps the cores busy (an engine's own threads, the store's I/O pool): a 2 MiB copy fell to 0.86 GB/s
    on a loaded 2-core VM, against 9.3 GB/s on one thread. The store parallelises across blocks on its own pool
    instead, so each copy runs on one core (numpy's copy releases the GIL).
    """
    if (dst.device.type == "cpu" and src.device.type == "cpu" and dst.dtype == src.dtype
            and dst.shape == src.shape and dst.is_contiguous() and src.is_contiguous()):
        if dst.dtype != torch.uint8:  # numpy has no bfloat16: copy the same bytes
            dst, src = dst.view(torch.uint8), src.view(torch.uint8)
        np.copyto(dst.numpy(), src.numpy(), casting="no")
        return
    dst.copy_(src, non_blocking=non_blocking)


def is_aligned(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.data_ptr() % ALIGNMENT == 0 and t.numel() * t.element_size() % ALIGNMENT == 0


class ScratchBuffers:
    """Reusable page-aligned host buffers, one per thread, pinned when CUDA is available.

    Encoding a block on its way to disk, or reading one back to decode it, needs a staging buffer; allocating
    one per block would cost a page fault per 4 KiB. Buffers larger than ``keep_nbytes`` are not kept.
    """

    def __init__(self, keep_nbytes: int = 64 << 20) -> None:
        self._local = threading.local()
        self._keep_nbytes = keep_nbytes

    def get(self, nbytes: int) -> torch.Tensor:
        """A buffer of ``nbytes`` for this thread, valid until its next ``get``."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = aligned_empty(round_up(nbytes), pinned=True)
            if nbytes <= self._keep_nbytes:
                self._local.buf = buf
        return buf[:nbytes]
