from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable


class EvictionPolicy(ABC):
    """Orders the blocks resident in one tier. Never allocates, copies or frees: the tier manager does.

    The manager calls every method under its own lock, so implementations need no locking of their own.
    """

    @abstractmethod
    def insert(self, key: bytes) -> None:
        """``key`` became evictable in this tier (its copy is complete)."""

    @abstractmethod
    def touch(self, key: bytes) -> None:
        """``key`` was used again."""

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """``key`` left this tier by another way than eviction (delete, corruption). Missing keys are ignored."""

    @abstractmethod
    def evict(self, n: int, protected: Callable[[bytes], bool]) -> list[bytes] | None:
        """Atomically choose and forget ``n`` keys for which ``protected(key)`` is false.

        Returns None, and changes nothing, when fewer than ``n`` keys can be chosen.
        """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: bytes) -> bool: ...
