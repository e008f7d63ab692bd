"""Memory tiers: one preallocated slab of slots, on the GPU (device tier) or in host DRAM (host tier)."""
from __future__ import annotations

import torch

from .._memory import aligned_empty, copy_bytes, round_up
from ..codec import Codec
from .base import SlotAllocator, SlottedTier

__all__ = ["MemoryTier"]


class MemoryTier(SlottedTier):
    """``capacity_bytes // slot_nbytes`` slots in one tensor, allocated once at open, holding blocks as ``codec``
    stores them.

    On a CUDA device the slab is device memory; in host memory it is page-aligned (so the disk tier can DMA
    straight from a slot) and pinned when ``pinned`` is asked and CUDA is available (fast device copies).
    """

    addressable = True
    persistent = False
    open_faults = 0

    def __init__(self, name: str, capacity_bytes: int, codec: Codec, device: torch.device,
                 pinned: bool = False) -> None:
        self.name = name
        self.codec = codec
        self.payload_nbytes = codec.nbytes
        # Raw blocks are whole elements already; encoded ones start on a cache line, as their scales and values
        # expect (vector loads, float32 views).
        self.slot_nbytes = round_up(codec.nbytes, 64) if codec.lossy else codec.nbytes
        self.packed = self.slot_nbytes == self.payload_nbytes  # consecutive slots are one contiguous range
        self.capacity_slots = capacity_bytes // self.slot_nbytes
        self.device = torch.device(device)
        total = self.capacity_slots * self.slot_nbytes
        if self.device.type == "cpu":
            flat = aligned_empty(total, pinned=pinned)
        else:
            flat = torch.empty(total, dtype=torch.uint8, device=self.device)
        self._slab = flat.view(self.capacity_slots, self.slot_nbytes)[:, :self.payload_nbytes]
        self._slots = SlotAllocator(self.capacity_slots)
        self.pinned = flat.is_pinned() if self.device.type == "cpu" else False

    def view(self, slot: int) -> torch.Tensor:
        return self._slab[slot]

    def rows(self, first: int, count: int) -> torch.Tensor | None:
        """Slots ``first .. first + count - 1`` as one contiguous 1-D view, or None when slots are padded (an
        encoded block's slot is rounded up to a cache line, so consecutive payloads are not adjacent)."""
        if not self.packed:
            return None
        return self._slab[first:first + count].reshape(-1)

    # non_blocking: on a GPU the copy is queued on the caller's copy stream, which the tier manager waits for
    # once per batch (see tierkv.transfer); between CPU tensors it is an ordinary synchronous copy.
    def write(self, slot: int, src: torch.Tensor) -> None:
        copy_bytes(self._slab[slot], src[:self.payload_nbytes], non_blocking=True)

    def read(self, slot: int, dst: torch.Tensor) -> None:
        copy_bytes(dst[:self.payload_nbytes], self._slab[slot], non_blocking=True)

    def bind(self, key: bytes, slot: int) -> None:
        pass  # volatile: nothing to record

    def unbind(self, key: bytes, slot: int) -> None:
        pass

    def recover(self) -> list[tuple[bytes, int]]:
        return []

    def commit(self, durable: bool = False) -> None:
        pass  # copies into the slab are synchronous; nothing is pending

    def describe(self) -> dict:
        return {"name": self.name, "device": str(self.device), "capacity_blocks": self.capacity_slots,
                "slot_nbytes": self.slot_nbytes, "codec": self.codec.name, "pinned": self.pinned}

    def close(self) -> None:
        self._slab = None  # type: ignore[assignment]  # release the memory now, not at garbage collection
