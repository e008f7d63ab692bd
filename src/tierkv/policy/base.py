from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable


class EvictionPolicy(ABC):
    """Orders the blocks resident in one tier. Never allocates, copies or frees: the tier manager does.

    ``stamp`` is the block's last use on the store's logical clock (larger = more recent), the same clock for
    every tier, so a block demoted into a tier keeps its age there instead of counting as new.
    The manager calls every method under its own lock, so implementations need no locking of their own.

    A policy with ``prefix_aware = True`` asks the manager to treat the keys of one ``put`` as a prefix chain:
    within a batch the head gets the most recent stamp (a prefix is worth at least what follows it), and when
    a block falls off the last tier its cached descendants, which no prefix lookup can reach any more, are
    freed too (counted in ``stats().orphaned``).
    """

    prefix_aware = False

    @abstractmethod
    def insert(self, key: bytes, stamp: int) -> None:
        """``key`` became evictable in this tier (its copy is complete)."""

    @abstractmethod
    def touch(self, key: bytes, stamp: int) -> None:
        """``key`` was used again. Keys not in this tier are ignored."""

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """``key`` left this tier by another way than eviction (delete, corruption). Missing keys are ignored."""

    @abstractmethod
    def evict(self, n: int, protected: Callable[[bytes], bool], newer_than: int | None = None
              ) -> list[bytes] | None:
        """Atomically choose and forget ``n`` keys for which ``protected(key)`` is false and, when
        ``newer_than`` is given, that are worth less than a block last used at ``newer_than`` (the block that
        needs the room: a policy never evicts a more valuable block for a less valuable one).

        Returns None, and changes nothing, when fewer than ``n`` keys can be chosen.
        """

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: bytes) -> bool: ...
