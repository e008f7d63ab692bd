"""The shape of one KV-cache block."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KVLayout"]

# dtypes a block may have, by the name used in config files and on-disk headers.
_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parse_dtype(value: Any) -> torch.dtype:
    if isinstance(value, torch.dtype):
        if dtype_name(value) in _DTYPES:
            return value
    elif isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
        return _DTYPES[value.removeprefix("torch.")]
    raise TypeError(f"expected dtype one of {sorted(_DTYPES)}, got {value!r}")


@dataclass(frozen=True)
class KVLayout:
    """Geometry of one KV-cache block: every layer's K and V for ``block_tokens`` tokens.

    A block is a tensor of shape ``[num_layers, 2, block_tokens, num_kv_heads, head_dim]`` (the 2 is K then V)
    and dtype ``dtype``. ``dtype`` may be a ``torch.dtype`` or its name (``"bfloat16"``).

    Raises ``ValueError`` for a non-positive dimension and ``TypeError`` for an unsupported dtype.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int = 16
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} to be a positive int, got {value!r}")
        object.__setattr__(self, "dtype", _parse_dtype(self.dtype))

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """``(num_layers, 2, block_tokens, num_kv_heads, head_dim)``."""
        return (self.num_layers, 2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def block_numel(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block at ``dtype``."""
        return self.block_numel * self.dtype.itemsize

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form, written to the disk tier's header."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_tokens": self.block_tokens,
            "dtype": dtype_name(self.dtype),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KVLayout":
        return cls(**data)

    def __str__(self) -> str:
        return (f"KVLayout(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"block_tokens={self.block_tokens}, dtype={dtype_name(self.dtype)})")
