from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from .base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Least recently used first: the block idle the longest leaves first."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()  # oldest first

    def insert(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def evict(self, n: int, protected: Callable[[bytes], bool]) -> list[bytes] | None:
        if n <= 0:
            return []
        chosen: list[bytes] = []
        for key in self._order:
            if not protected(key):
                chosen.append(key)
                if len(chosen) == n:
                    break
        if len(chosen) < n:
            return None
        for key in chosen:
            del self._order[key]
        return chosen

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: bytes) -> bool:
        return key in self._order
