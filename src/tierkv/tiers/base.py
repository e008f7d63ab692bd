"""The ``Tier`` protocol: fixed-size slots that hold one block each.

A tier moves bytes in and out of its slots and says what it can do; it never decides which block goes where
(that is the tier manager's job) and never looks at keys except to persist where they live.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from ..codec import Codec

__all__ = ["Tier", "SlotAllocator", "SlottedTier", "CorruptBlock"]


class CorruptBlock(Exception):
    """The bytes read back from a slot do not match the checksum recorded when they were written."""


@runtime_checkable
class Tier(Protocol):
    name: str
    #: how blocks are stored here ("none": as they are; "fp8"/"int8": quantized)
    codec: Codec
    #: bytes of one block as stored (``codec.nbytes``: what ``read``/``write`` move)
    payload_nbytes: int
    #: bytes of capacity one slot costs (payload plus alignment)
    slot_nbytes: int
    capacity_slots: int
    #: slots are memory that ``view(slot)`` exposes (no I/O needed to read them)
    addressable: bool
    #: blocks survive close/reopen (``recover`` finds them)
    persistent: bool
    device: torch.device
    #: faults found when the tier was opened (each logged there), for ``stats()``
    open_faults: int

    @property
    def free_slots(self) -> int: ...

    def allocate(self) -> int | None:
        """A free slot, or None when the tier is full."""

    def free(self, slot: int) -> None: ...

    def view(self, slot: int) -> torch.Tensor:
        """1-D uint8 view of a slot's payload (addressable tiers only)."""

    def write(self, slot: int, src: torch.Tensor) -> None:
        """Store ``src[:payload_nbytes]`` (1-D uint8, any device) in ``slot``. ``src`` may be longer: up to
        ``slot_nbytes`` of it may be moved (the disk tier DMAs whole slots). Raises ``OSError`` on I/O failure."""

    def read(self, slot: int, dst: torch.Tensor) -> None:
        """Copy ``slot`` into ``dst[:payload_nbytes]`` (1-D uint8, any device); a longer ``dst`` may receive up to
        ``slot_nbytes``. Raises ``CorruptBlock`` or ``OSError``."""

    def read_run(self, first_slot: int, count: int, buf: torch.Tensor) -> list[BaseException | None]:
        """Copy ``count`` consecutive slots into ``buf`` (1-D uint8 host memory, ``count * slot_nbytes``; slot
        ``first_slot + j`` at ``j * slot_nbytes``) and say, per slot, None or the ``CorruptBlock``/``OSError``
        that made it unreadable. The disk tier does it in one request; this default reads slot by slot."""
        rows = [buf[j * self.slot_nbytes:(j + 1) * self.slot_nbytes] for j in range(count)]
        return slot_by_slot(self.read, first_slot, rows, (CorruptBlock, OSError))

    def write_run(self, first_slot: int, bufs: list[torch.Tensor]) -> list[BaseException | None]:
        """Store ``bufs[j]`` (1-D uint8 host memory, at least ``slot_nbytes``, page-aligned) in slot
        ``first_slot + j`` and say, per slot, None or the ``OSError`` that made it fail. The disk tier does it in
        one request; this default writes slot by slot."""
        return slot_by_slot(self.write, first_slot, bufs, (OSError,))

    def bind(self, key: bytes, slot: int) -> None:
        """``key``'s copy in ``slot`` is complete (persistent tiers record it)."""

    def unbind(self, key: bytes, slot: int) -> None:
        """``key`` no longer lives in ``slot`` (persistent tiers forget it)."""

    def recover(self) -> list[tuple[bytes, int]]:
        """Blocks found at open, ``(key, slot)`` least recently used first (empty for volatile tiers)."""

    def commit(self, durable: bool = False) -> None:
        """Make recorded bindings visible to a later open; ``durable`` also forces them to stable storage."""

    def describe(self) -> dict:
        """Plain-data description: name, device, capacity, slot size and backend details."""

    def close(self) -> None: ...


def slot_by_slot(op: Callable[[int, torch.Tensor], None], first_slot: int, bufs: list[torch.Tensor],
                 failures: tuple[type[BaseException], ...]) -> list[BaseException | None]:
    """``op(first_slot + j, bufs[j])`` for each buffer; per slot, None or the exception in ``failures`` it
    raised (a run that failed as a whole is retried this way, so one bad slot costs only its own block)."""
    results: list[BaseException | None] = []
    for j, buf in enumerate(bufs):
        try:
            op(first_slot + j, buf)
            results.append(None)
        except failures as exc:
            results.append(exc)
    return results


class SlottedTier:
    """Mixin for tiers whose slot bookkeeping is a :class:`SlotAllocator` in ``self._slots``."""

    _slots: "SlotAllocator"

    @property
    def free_slots(self) -> int:
        return self._slots.free_count

    def allocate(self) -> int | None:
        return self._slots.allocate()

    def free(self, slot: int) -> None:
        self._slots.free(slot)


class SlotAllocator:
    """Free-slot bookkeeping for ``n`` slots. Not thread-safe: the tier manager serialises calls."""

    def __init__(self, n: int) -> None:
        self.capacity = n
        self._free = list(range(n - 1, -1, -1))  # a stack; low slots first keeps files dense
        self._used = bytearray(n)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def allocate(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self._used[slot] = 1
        return slot

    def claim(self, slot: int) -> None:
        """Mark a specific slot used (recovery of a persistent tier)."""
        assert not self._used[slot], f"slot {slot} claimed twice"
        self._used[slot] = 1
        self._free.remove(slot)

    def claim_all(self, slots: list[int]) -> None:
        claimed = set(slots)
        assert len(claimed) == len(slots), "a slot claimed twice"
        for slot in claimed:
            self._used[slot] = 1
        self._free = [s for s in self._free if s not in claimed]

    def free(self, slot: int) -> None:
        assert self._used[slot], f"slot {slot} freed twice"
        self._used[slot] = 0
        self._free.append(slot)
