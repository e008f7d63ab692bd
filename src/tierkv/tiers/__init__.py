"""Storage tiers. Order is an explicit list (top = fastest); capabilities live on the ``Tier`` protocol."""
from .base import CorruptBlock, SlotAllocator, Tier
from .disk import DiskTier
from .memory import MemoryTier

__all__ = ["CorruptBlock", "DiskTier", "MemoryTier", "SlotAllocator", "Tier"]
