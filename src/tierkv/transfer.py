"""Where the tier manager's device<->host copies run.

On CUDA every thread that moves blocks gets its own pair of non-default streams, one for copies toward the
device and one for copies away from it: a prefetch's host-to-device copies and an eviction's device-to-host
copies, issued by different threads, run on different streams and so overlap on the two copy engines. A batch
of blocks is issued back to back with ``non_blocking`` copies and waited for once, when the batch ends; the
bookkeeping only marks a copy ready after that wait. Work the caller queued on its own stream (the kernel that
produced the blocks of a put, or the last reader of a get's ``out``) is waited for through a CUDA event, on
the GPU, never by blocking the caller's thread.

Without CUDA every method is a no-op: CPU copies are synchronous.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator

import torch

__all__ = ["CopyStreams", "producer_event"]


def producer_event(t: torch.Tensor) -> "torch.cuda.Event | None":
    """An event marking the work queued so far on the caller's current stream, when ``t`` lives on a GPU: our
    copy streams wait for it before touching ``t``. None for CPU tensors."""
    if t.device.type != "cuda":
        return None
    return torch.cuda.current_stream(t.device).record_event()


class CopyStreams:
    """Per-thread CUDA copy streams for one device, or nothing when ``device`` is not a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.active = self.device.type == "cuda"
        self._local = threading.local()

    def _stream(self, to_device: bool) -> "torch.cuda.Stream":
        streams = getattr(self._local, "streams", None)
        if streams is None:
            # torch hands streams out of a fixed per-device pool, so a thread asking for two costs nothing lasting.
            streams = self._local.streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return streams[0 if to_device else 1]

    @contextlib.contextmanager
    def copying(self, to_device: bool, after: Iterable["torch.cuda.Event | None"] = ()) -> Iterator[None]:
        """Run the copies issued inside the ``with`` on this thread's stream toward (``to_device``) or away from
        the device, after the events in ``after``; on exit, wait until they have all completed."""
        if not self.active:
            yield
            return
        stream = self._stream(to_device)
        for event in after:
            if event is not None:
                stream.wait_event(event)
        try:
            with torch.cuda.stream(stream):
                yield
        finally:  # also after a failure: no copy may still be landing in a slot the bookkeeping hands on
            stream.synchronize()
