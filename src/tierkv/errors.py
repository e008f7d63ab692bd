"""Exceptions raised by tierkv.

Bad input is a plain ``ValueError``/``TypeError`` whose message says what was expected and what came.
The classes here are for conditions a caller may want to catch specifically.
"""
from __future__ import annotations

__all__ = ["TierKVError", "BlockNotFound", "LayoutMismatch", "StoreClosed", "StoreInUse"]


class TierKVError(Exception):
    """Base class of tierkv's own exceptions."""


class BlockNotFound(TierKVError, KeyError):
    """A key is not retrievable: never stored, evicted off the last tier, deleted, or its stored bytes
    failed their checksum (a corrupt block is dropped and reported as missing, never returned)."""

    def __init__(self, key: bytes, reason: str = "not in any tier"):
        super().__init__(key)
        self.key = key
        self.reason = reason

    def __str__(self) -> str:  # KeyError would print only repr(key)
        return f"block {self.key.hex()} not found: {self.reason}"


class LayoutMismatch(TierKVError, ValueError):
    """A disk tier was written with another block layout (or format version) than the one asked for."""


class StoreClosed(TierKVError, RuntimeError):
    """A method was called on a store after ``close()``."""


class StoreInUse(TierKVError, RuntimeError):
    """Another open store (in this or another process) holds the same ``disk_path``."""
