"""The encoded block format (version 1), shared by every implementation of the lossy codecs.

One encoded block is, at byte offsets::

    0                    header, 16 bytes:
                           [0]    format version (1)
                           [1]    codec id (1 = fp8 e4m3, 2 = int8)
                           [2]    source dtype id (1 = float16, 2 = bfloat16, 3 = float32)
                           [3]    reserved, 0
                           [4:8]  number of float32 scales, uint32 little-endian
                           [8:16] reserved, 0
    16                   scales, float32 little-endian (see below)
    values_offset        values, one byte per element, in the block's own order [layers, 2, tokens, heads, dim]
                         (values_offset = 16 + 4 * n_scales rounded up to 64, so values start cache-line aligned)

Scales (``scale = max(amax / qmax, 2**-126)``, ``qmax`` = 448 for fp8 and 127 for int8; the floor keeps
all-zero and denormal groups finite):

- fp8: one per (layer, K or V, head), over the block's tokens and head_dim: ``[layers, 2, heads]``.
- int8: K per channel (layer, head, dim) over the block's tokens, as KIVI does, because K caches carry outlier
  channels; V per token (layer, token, head) over head_dim: ``[layers, heads, dim]`` then ``[layers, tokens, heads]``.

Quantizing ``x`` (converted to float32): ``q = convert(clamp(x * (1 / scale), -qmax, qmax))`` where ``1 / scale``
is one float32 division per group and ``convert`` rounds to nearest, ties to even (fp8 e4m3fn; int8 via
``round``). Dequantizing: ``(float32(q) * scale)`` rounded to nearest-even in the block's dtype. Every
implementation (torch reference, C++ CPU, CUDA) follows exactly these float32 steps, so all produce the same bits.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from ..layout import KVLayout

__all__ = ["FORMAT_VERSION", "HEADER_NBYTES", "CODEC_IDS", "DTYPE_IDS", "EncodedFormat", "QMAX", "SCALE_FLOOR"]

FORMAT_VERSION = 1
HEADER_NBYTES = 16
VALUES_ALIGNMENT = 64
CODEC_IDS = {"none": 0, "fp8": 1, "int8": 2}
DTYPE_IDS = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
QMAX = {"fp8": 448.0, "int8": 127.0}
SCALE_FLOOR = 2.0**-126  # the smallest normal float32: 1 / scale stays finite
_HEADER = struct.Struct("<BBBBI8x")


@dataclass(frozen=True)
class EncodedFormat:
    """Sizes and offsets of one encoded block of ``layout`` under a lossy codec."""

    codec: str
    layout: KVLayout

    def __post_init__(self) -> None:
        if self.codec not in QMAX:
            raise ValueError(f"expected a lossy codec one of {sorted(QMAX)}, got {self.codec!r}")
        if self.layout.dtype not in DTYPE_IDS:
            names = sorted(str(d).removeprefix("torch.") for d in DTYPE_IDS)
            raise ValueError(f"expected a layout dtype one of {names} for codec {self.codec!r}, "
                             f"got {str(self.layout.dtype).removeprefix('torch.')}")

    @property
    def n_scales(self) -> int:
        L, _, T, H, D = self.layout.block_shape
        if self.codec == "fp8":
            return L * 2 * H
        return L * H * D + L * T * H

    @property
    def values_offset(self) -> int:
        end = HEADER_NBYTES + 4 * self.n_scales
        return -(-end // VALUES_ALIGNMENT) * VALUES_ALIGNMENT

    @property
    def nbytes(self) -> int:
        return self.values_offset + self.layout.block_numel

    def header(self) -> bytes:
        return _HEADER.pack(FORMAT_VERSION, CODEC_IDS[self.codec], DTYPE_IDS[self.layout.dtype], 0, self.n_scales)

    def describe_header(self, raw: bytes) -> str:
        version, codec, dtype, _, n_scales = _HEADER.unpack(raw[:HEADER_NBYTES])
        return f"version {version}, codec id {codec}, dtype id {dtype}, {n_scales} scales"
