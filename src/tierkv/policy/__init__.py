"""Eviction policies: they decide the order in which blocks leave a tier, and nothing else."""
from __future__ import annotations

from .base import EvictionPolicy
from .lru import LRUPolicy

__all__ = ["EvictionPolicy", "LRUPolicy", "make_policy"]

_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy instance for one tier."""
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"expected policy one of {sorted(_POLICIES)}, got {name!r}") from None
