"""Vectorised torch implementation of the lossy codecs: the specification in code.

Runs on any device torch supports. The native kernels (C++ on the CPU, CUDA on the GPU) must produce the same
bits for the same input; ``TIERKV_FORCE_REFERENCE=1`` makes the whole store use this path.
"""
from __future__ import annotations

import torch

from .format import HEADER_NBYTES, QMAX, SCALE_FLOOR, EncodedFormat

__all__ = ["encode", "decode", "scales"]


def _group_amax(x: torch.Tensor, codec: str) -> list[torch.Tensor]:
    """Per-group max |x| of float32 blocks ``[n, L, 2, T, H, D]``, in the order the scales are stored."""
    a = x.abs()
    if codec == "fp8":
        return [a.amax(dim=(3, 5))]                                     # [n, L, 2, H]
    k_amax = a[:, :, 0].amax(dim=2)                                    # [n, L, H, D]: K per channel
    v_amax = a[:, :, 1].amax(dim=4)                                    # [n, L, T, H]: V per token
    return [k_amax, v_amax]


def scales(x: torch.Tensor, codec: str) -> list[torch.Tensor]:
    """``max(amax / qmax, 2**-126)`` per group (float32)."""
    # A tensor divisor, not a Python scalar: CUDA torch turns ``t / scalar`` into ``t * (1 / scalar)``, which
    # rounds differently from the one correctly rounded division the format specifies.
    return [torch.clamp_min(torch.div(amax, torch.full_like(amax, QMAX[codec])), SCALE_FLOOR)
            for amax in _group_amax(x, codec)]


def _broadcast(parts: list[torch.Tensor], codec: str, shape: torch.Size) -> torch.Tensor:
    """Group values ``parts`` (scales or their inverses) spread over the block shape ``[n, L, 2, T, H, D]``."""
    if codec == "fp8":
        return parts[0][:, :, :, None, :, None].expand(shape)
    n, L, _, T, H, D = shape
    k = parts[0][:, :, None, :, :].expand(n, L, T, H, D)                # per (L, H, D), same for every token
    v = parts[1][:, :, :, :, None].expand(n, L, T, H, D)                # per (L, T, H), same for every dim
    return torch.stack([k, v], dim=2)


def encode(blocks: torch.Tensor, fmt: EncodedFormat, out: torch.Tensor) -> None:
    """Quantize ``blocks`` ``[n, L, 2, T, H, D]`` (fmt.layout.dtype, any strides) into ``out`` ``[n, fmt.nbytes]``
    uint8 (rows contiguous, same device)."""
    n = blocks.shape[0]
    x = blocks.to(torch.float32)
    group_scales = scales(x, fmt.codec)
    inverse = [torch.div(torch.ones_like(s), s) for s in group_scales]
    qmax = QMAX[fmt.codec]
    y = torch.clamp(x * _broadcast(inverse, fmt.codec, x.shape), -qmax, qmax)
    if fmt.codec == "fp8":
        q = y.to(torch.float8_e4m3fn).view(torch.uint8)
    else:
        q = torch.round(y).to(torch.int8).view(torch.uint8)
    header = torch.frombuffer(bytearray(fmt.header()), dtype=torch.uint8).to(out.device)
    out[:, :HEADER_NBYTES] = header
    packed = torch.cat([s.reshape(n, -1) for s in group_scales], dim=1).contiguous()
    scale_end = HEADER_NBYTES + 4 * fmt.n_scales
    out[:, HEADER_NBYTES:scale_end] = packed.view(torch.uint8)
    out[:, scale_end:fmt.values_offset] = 0
    out[:, fmt.values_offset:] = q.reshape(n, -1)


def decode(encoded: torch.Tensor, fmt: EncodedFormat, out: torch.Tensor) -> None:
    """Dequantize ``encoded`` ``[n, fmt.nbytes]`` uint8 into ``out`` ``[n, L, 2, T, H, D]`` of fmt.layout.dtype."""
    n = encoded.shape[0]
    L, _, T, H, D = fmt.layout.block_shape
    raw_scales = encoded[:, HEADER_NBYTES:HEADER_NBYTES + 4 * fmt.n_scales]
    # clone, not contiguous(): a single row slice counts as contiguous yet may start off a 4-byte boundary.
    raw_scales = raw_scales.clone(memory_format=torch.contiguous_format).view(torch.float32)
    if fmt.codec == "fp8":
        parts = [raw_scales.reshape(n, L, 2, H)]
    else:
        parts = [raw_scales[:, :L * H * D].reshape(n, L, H, D), raw_scales[:, L * H * D:].reshape(n, L, T, H)]
    raw = encoded[:, fmt.values_offset:].contiguous()
    if fmt.codec == "fp8":
        q = raw.view(torch.float8_e4m3fn).to(torch.float32)
    else:
        q = raw.view(torch.int8).to(torch.float32)
    shape = torch.Size((n, L, 2, T, H, D))
    y = q.reshape(shape) * _broadcast(parts, fmt.codec, shape)
    out.copy_(y.to(out.dtype))
