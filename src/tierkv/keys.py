"""Chained prefix keys for KV-cache blocks.

``key[i] = xxh3_128(key[i-1] || tokens of block i as little-endian uint32)`` with
``key[-1] = root = xxh3_128(b"tierkv-v1" + salt)``; digests in xxhash's canonical 16-byte form. A key names a
block *and* everything before it, so "how much of this prompt is cached" is a longest-prefix walk.
"""
from __future__ import annotations

import array
from collections.abc import Iterable, Mapping, Sequence, Set as AbstractSet
from typing import Any, Iterator

import numpy as np
import xxhash

from . import ops

__all__ = ["block_keys", "root_key", "block_keys_reference", "KEY_BYTES"]

KEY_BYTES = 16
_U32 = "I" if array.array("I").itemsize == 4 else "L"
_DOMAIN = b"tierkv-v1"


def root_key(salt: bytes = b"") -> bytes:
    """The parent of the first block's key for this salt (the tenant namespace)."""
    return xxhash.xxh3_128_digest(_DOMAIN + _check_salt(salt))


def block_keys(token_ids: Any, block_tokens: int = 16, salt: bytes = b"") -> list[bytes]:
    """One 16-byte key per *full* block of ``token_ids`` (a partial tail block gets none).

    ``token_ids``: a 1-D sequence of ints, numpy integer array or torch integer tensor, each in [0, 2**32).
    ``salt`` separates tenants: a different salt gives disjoint keys.
    The native module computes all keys in one call; the result is identical to
    :func:`block_keys_reference` in every process and on every machine.

    Raises ``ValueError`` for a token outside [0, 2**32), a non-1-D input or ``block_tokens < 1``;
    ``TypeError`` for non-integer tokens or a non-bytes salt.
    """
    tokens = _as_uint32(token_ids)
    block_tokens = _check_block_tokens(block_tokens)
    root = root_key(salt)
    module = ops.native()
    if module is None or block_tokens > len(tokens):  # no full block; the native chain would size a buffer for one
        return _chain(tokens, block_tokens, root)
    return module.block_keys(tokens, block_tokens, root)


def block_keys_reference(token_ids: Any, block_tokens: int = 16, salt: bytes = b"") -> list[bytes]:
    """Pure-Python twin of :func:`block_keys` on the ``xxhash`` package (the specification in code)."""
    return _chain(_as_uint32(token_ids), _check_block_tokens(block_tokens), root_key(salt))


def _chain(tokens: np.ndarray, block_tokens: int, root: bytes) -> list[bytes]:
    return list(iter_chain(tokens, block_tokens, root))


def iter_chain(tokens: np.ndarray, block_tokens: int, root: bytes) -> Iterator[bytes]:
    """The chained keys of ``tokens`` (validated uint32) one at a time, so a walk can stop at its first miss."""
    data = tokens.astype("<u4", copy=False).tobytes()
    step = 4 * block_tokens
    parent = root
    for start in range(0, (len(tokens) // block_tokens) * step, step):
        parent = xxhash.xxh3_128_digest(parent + data[start:start + step])
        yield parent


def _check_salt(salt: Any) -> bytes:
    if not isinstance(salt, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected salt as bytes, got {type(salt).__name__}")
    return bytes(salt)


def _check_block_tokens(block_tokens: Any) -> int:
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, (int, np.integer)) or block_tokens < 1:
        raise ValueError(f"expected block_tokens to be a positive int, got {block_tokens!r}")
    return int(block_tokens)


def _sequence_as_uint32(token_ids: Any) -> np.ndarray:
    """Python ints -> uint32 in one C-level pass (``array`` checks type and range as it converts).

    Python bools are ints (``True == 1``) and pass, as ``int(True)`` would; bool *arrays* are refused, because
    there the dtype says the values are not token ids (checking every list item's type would triple the cost).
    """
    if isinstance(token_ids, (AbstractSet, Mapping)) or not isinstance(token_ids, Iterable):
        # a set has no order, a dict's values are not its keys: neither is a prompt
        raise TypeError(f"expected a 1-D sequence of token ids, got {type(token_ids).__name__}")
    if not isinstance(token_ids, Sequence):
        token_ids = list(token_ids)
    try:
        packed = array.array(_U32, token_ids)
    except (TypeError, OverflowError):
        for t in token_ids:  # the slow pass runs only to name the offending token
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise TypeError(f"expected integer token ids, got {type(t).__name__} ({t!r})") from None
            if not 0 <= t < 2**32:
                raise ValueError(f"expected token ids in [0, 2**32), got {int(t)}") from None
        raise
    return np.frombuffer(packed, dtype=np.uint32).astype("<u4", copy=False)


_LE_U32 = np.dtype("<u4")


def _as_uint32(token_ids: Any) -> np.ndarray:
    """Validate tokens and return them as a contiguous little-endian uint32 array.

    An array that already is one comes back as is, with no pass over its values.
    """
    if type(token_ids) is np.ndarray and token_ids.dtype == _LE_U32 and token_ids.ndim == 1 \
            and token_ids.flags.c_contiguous:
        return token_ids
    if hasattr(token_ids, "detach") and hasattr(token_ids, "cpu"):  # a torch tensor, without importing torch
        if token_ids.device.type == "meta":  # has no values to hash (.cpu() would raise NotImplementedError)
            raise ValueError(f"expected a token tensor with data (cpu or cuda), got device {token_ids.device}")
        if token_ids.is_floating_point() or token_ids.is_complex() or str(token_ids.dtype) == "torch.bool":
            raise TypeError(f"expected an integer token tensor, got dtype {token_ids.dtype}")
        values = token_ids.detach().cpu().numpy()
    elif isinstance(token_ids, np.ndarray):
        values = token_ids
    elif isinstance(token_ids, (str, bytes, bytearray, memoryview, np.generic)):
        raise TypeError(f"expected a sequence of token ids, got {type(token_ids).__name__}")
    else:
        return _sequence_as_uint32(token_ids)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-D token array, got shape {list(values.shape)}")
    if values.dtype.kind not in "iu":
        raise TypeError(f"expected an integer token array, got dtype {values.dtype}")
    if values.size and not (values.dtype.kind == "u" and values.dtype.itemsize <= 4):  # else always in range
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= 2**32:
            raise ValueError(f"expected token ids in [0, 2**32), got {lo if lo < 0 else hi}")
    return np.ascontiguousarray(values, dtype="<u4")
