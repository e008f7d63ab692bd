"""Memory tiers: one preallocated slab of slots, on the GPU (device tier) or in host DRAM (host tier)."""
from __future__ import annotations

import torch

from .._memory import aligned_empty
from .base import SlotAllocator, SlottedTier

__all__ = ["MemoryTier"]


class MemoryTier(SlottedTier):
    """``capacity_bytes // payload_nbytes`` slots in one tensor, allocated once at open.

    On a CUDA device the slab is device memory; in host memory it is page-aligned (so the disk tier can DMA
    straight from a slot) and pinned when ``pinned`` is asked and CUDA is available (fast device copies).
    """

    addressable = True
    persistent = False

    def __init__(self, name: str, capacity_bytes: int, payload_nbytes: int, device: torch.device,
                 pinned: bool = False) -> None:
        self.name = name
        self.payload_nbytes = payload_nbytes
        self.slot_nbytes = payload_nbytes  # memory needs no alignment padding between blocks
        self.capacity_slots = capacity_bytes // payload_nbytes
        self.device = torch.device(device)
        total = self.capacity_slots * payload_nbytes
        if self.device.type == "cpu":
            flat = aligned_empty(total, pinned=pinned)
        else:
            flat = torch.empty(total, dtype=torch.uint8, device=self.device)
        self._slab = flat.view(self.capacity_slots, payload_nbytes)
        self._slots = SlotAllocator(self.capacity_slots)
        self.pinned = flat.is_pinned() if self.device.type == "cpu" else False

    def view(self, slot: int) -> torch.Tensor:
        return self._slab[slot]

    def write(self, slot: int, src: torch.Tensor) -> None:
        self._slab[slot].copy_(src)

    def read(self, slot: int, dst: torch.Tensor) -> None:
        dst.copy_(self._slab[slot])

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
                "slot_nbytes": self.slot_nbytes, "pinned": self.pinned}

    def close(self) -> None:
        self._slab = None  # type: ignore[assignment]  # release the memory now, not at garbage collection
