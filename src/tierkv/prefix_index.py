"""The prefix index: block key -> location, and "how much of this prompt is cached" in one call.

Keys are the 16-byte chained block keys of :mod:`tierkv.keys`; a value is a location in ``[1, 2**31)`` (what it
means is the caller's business: a slot, a tier-packed handle) and 0 means absent. Because a key names its block
*and* everything before it, the cached part of a prompt is the longest prefix of its keys that is present:
:meth:`PrefixIndex.longest_prefix` walks given keys, :meth:`PrefixIndex.longest_prefix_tokens` derives them from
the tokens as it walks and stops hashing at the first miss.

Two implementations, same semantics and the same errors:

- :class:`NativePrefixIndex`: ``tierkv._C.PrefixIndex``, open addressing over the 16-byte keys, walks in one
  native call with the GIL released (a 128k-token prompt is hashed and looked up with no Python object per block).
- :class:`ReferencePrefixIndex`: a dict and the ``xxhash`` loop, the specification in code.

:func:`make_prefix_index` picks the native one when the native module has it (not under
``TIERKV_FORCE_REFERENCE=1``). Every method is safe to call from several threads at once.
"""
from __future__ import annotations

import abc
import operator
from typing import Any, Sequence

from . import ops
from .keys import KEY_BYTES, _as_uint32, _check_block_tokens, iter_chain

__all__ = ["PrefixIndex", "ReferencePrefixIndex", "NativePrefixIndex", "make_prefix_index", "MAX_VALUE"]

MAX_VALUE = 2**31 - 1  # values are in [1, MAX_VALUE]; 0 means absent
_MAX_EXPECTED_KEYS = 2**32


class PrefixIndex(abc.ABC):
    """16-byte block keys -> int location in ``[1, 2**31)``, with longest-prefix walks.

    Bad input raises ``TypeError`` (a key that is not ``bytes``, a value that is not an int) or ``ValueError``
    (a key that is not 16 bytes, a value outside ``[1, 2**31)``, ``block_tokens < 1``, a root that is not
    16 bytes, tokens outside ``[0, 2**32)``), each saying what was expected and what came.
    """

    @abc.abstractmethod
    def set(self, key: bytes, value: int) -> None:
        """Map ``key`` to ``value`` (in ``[1, 2**31)``), replacing any previous value."""

    @abc.abstractmethod
    def discard(self, key: bytes) -> bool:
        """Remove ``key``; True when it was present."""

    @abc.abstractmethod
    def get(self, key: bytes) -> int:
        """The value of ``key``, 0 when absent."""

    @abc.abstractmethod
    def __contains__(self, key: bytes) -> bool: ...

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def clear(self) -> None:
        """Remove every key."""

    @abc.abstractmethod
    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` are present. Every key is validated, also those after the first miss."""

    @abc.abstractmethod
    def longest_prefix_tokens(self, token_ids: Any, block_tokens: int, root: bytes) -> int:
        """How many leading block keys of ``token_ids`` are present.

        The keys are those of :func:`tierkv.block_keys` (one per full block, chained from ``root``, which is
        :func:`tierkv.keys.root_key` of the tenant's salt); hashing stops at the first absent key.
        ``token_ids``: anything :func:`tierkv.block_keys` accepts (list, numpy array, torch CPU tensor).
        """

    def longest_prefix_packed(self, packed: bytes) -> int:
        """:meth:`longest_prefix` of keys concatenated (16 bytes each)."""
        packed = _check_packed(packed)
        return self.longest_prefix([packed[i:i + KEY_BYTES] for i in range(0, len(packed), KEY_BYTES)])


class ReferencePrefixIndex(PrefixIndex):
    """A dict and the ``xxhash`` chain: the specification of :class:`PrefixIndex` in code.

    Thread safety comes from the GIL: each dict operation is atomic.
    """

    def __init__(self, expected_keys: int = 1024) -> None:
        _check_expected_keys(expected_keys)
        self._map: dict[bytes, int] = {}

    def set(self, key: bytes, value: int) -> None:
        key = _check_key(key)
        self._map[key] = _check_value(value)

    def discard(self, key: bytes) -> bool:
        return self._map.pop(_check_key(key), 0) != 0

    def get(self, key: bytes) -> int:
        return self._map.get(_check_key(key), 0)

    def __contains__(self, key: bytes) -> bool:
        return _check_key(key) in self._map

    def __len__(self) -> int:
        return len(self._map)

    def clear(self) -> None:
        self._map.clear()

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        keys = _check_keys(keys)
        present = self._map
        for n, key in enumerate(keys):
            if key not in present:
                return n
        return len(keys)

    def longest_prefix_tokens(self, token_ids: Any, block_tokens: int, root: bytes) -> int:
        tokens = _as_uint32(token_ids)
        present = self._map
        n = 0
        for key in iter_chain(tokens, _check_block_tokens(block_tokens), _check_root(root)):
            if key not in present:
                break
            n += 1
        return n


class NativePrefixIndex(PrefixIndex):
    """``tierkv._C.PrefixIndex``: open addressing (linear probing) over the 16-byte keys.

    The table doubles past a load factor of 5/8 and deletes by backward shift; a std::shared_mutex lets readers
    share it and writers have it alone, and the walks run with the GIL released. Raises ``RuntimeError`` when
    the native module (or its PrefixIndex) is unavailable: use :func:`make_prefix_index` to fall back.
    """

    def __init__(self, expected_keys: int = 1024) -> None:
        module = ops.native()
        if module is None or not hasattr(module, "PrefixIndex"):
            raise RuntimeError(f"expected the native PrefixIndex, got {ops.native_status()}")
        self._index = module.PrefixIndex(_check_expected_keys(expected_keys))

    def set(self, key: bytes, value: int) -> None:
        self._index.set(key, value)

    def discard(self, key: bytes) -> bool:
        return self._index.discard(key)

    def get(self, key: bytes) -> int:
        return self._index.get(key)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def clear(self) -> None:
        self._index.clear()

    @property
    def capacity(self) -> int:
        """Slots in the table (a power of two); a key's home slot is its first 8 bytes (little-endian) mod this."""
        return self._index.capacity

    def longest_prefix(self, keys: Sequence[bytes]) -> int:
        if isinstance(keys, (bytes, bytearray, str)):
            _check_keys(keys)  # raises: a single key or packed keys are not a sequence of keys
        return self._index.longest_prefix(keys)

    def longest_prefix_packed(self, packed: bytes) -> int:
        return self._index.longest_prefix_packed(_check_packed(packed))

    def longest_prefix_tokens(self, token_ids: Any, block_tokens: int, root: bytes) -> int:
        tokens = _as_uint32(token_ids)
        block_tokens, root = _check_block_tokens(block_tokens), _check_root(root)
        if block_tokens > len(tokens):  # no full block; the native chain would size a buffer for one anyway
            return 0
        return self._index.longest_prefix_tokens(tokens, block_tokens, root)


def make_prefix_index(expected_keys: int = 1024) -> PrefixIndex:
    """The native index when the native module has one, else the reference (e.g. ``TIERKV_FORCE_REFERENCE=1``)."""
    module = ops.native()
    if module is not None and hasattr(module, "PrefixIndex"):
        return NativePrefixIndex(expected_keys)
    return ReferencePrefixIndex(expected_keys)


# ---------------------------------------------------------------------------------------------------------------
# validation (the native class checks the same things with the same messages)


def _check_key(key: Any) -> bytes:
    if type(key) is not bytes:
        if not isinstance(key, bytes):
            raise TypeError(f"expected a key as bytes, got {type(key).__name__}")
        key = bytes(key)
    if len(key) != KEY_BYTES:
        raise ValueError(f"expected a 16-byte key, got {len(key)} bytes")
    return key


def _check_keys(keys: Any) -> Sequence[bytes]:
    if isinstance(keys, (bytes, bytearray, str)):
        raise TypeError(f"expected a sequence of 16-byte keys, got {type(keys).__name__}")
    if not isinstance(keys, (list, tuple)):
        keys = list(keys)
    for key in keys:
        _check_key(key)
    return keys


def _check_value(value: Any) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"expected an int value, got {type(value).__name__}")
    value = operator.index(value)
    if not 1 <= value <= MAX_VALUE:
        raise ValueError(f"expected a value in [1, 2**31), got {value!r}")
    return value


def _check_root(root: Any) -> bytes:
    if not isinstance(root, bytes):
        raise TypeError(f"expected a root key as bytes, got {type(root).__name__}")
    if len(root) != KEY_BYTES:
        raise ValueError(f"expected a 16-byte root key, got {len(root)} bytes")
    return bytes(root)


def _check_packed(packed: Any) -> bytes:
    if not isinstance(packed, bytes):
        raise TypeError(f"expected packed keys as bytes, got {type(packed).__name__}")
    if len(packed) % KEY_BYTES:
        raise ValueError(f"expected packed keys of a multiple of 16 bytes, got {len(packed)} bytes")
    return bytes(packed)


def _check_expected_keys(expected_keys: Any) -> int:
    if isinstance(expected_keys, bool) or not hasattr(type(expected_keys), "__index__"):
        raise TypeError(f"expected expected_keys as an int, got {type(expected_keys).__name__}")
    expected_keys = operator.index(expected_keys)
    if not 0 <= expected_keys <= _MAX_EXPECTED_KEYS:
        raise ValueError(f"expected expected_keys in [0, 2**32], got {expected_keys}")
    return expected_keys
