"""Block codecs: how a tier stores a block. ``none`` keeps the bytes; ``fp8`` and ``int8`` quantize them.

A codec turns blocks ``[n, layers, 2, tokens, heads, dim]`` of the layout's dtype into encoded rows
``[n, codec.nbytes]`` uint8 and back. The encoded format is specified in :mod:`tierkv.codec.format` and
docs/codecs.md. Work runs where the data is: the C++ kernels for CPU tensors, the CUDA kernels for GPU tensors
(each falling back to the torch reference in :mod:`tierkv.codec.reference` when not built or when
``TIERKV_FORCE_REFERENCE=1``).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .._memory import copy_bytes
from ..layout import KVLayout
from . import reference
from .format import CODEC_IDS, DTYPE_IDS, HEADER_NBYTES, EncodedFormat

__all__ = ["Codec", "NoneCodec", "LossyCodec", "make_codec", "transcode", "CODEC_NAMES", "CODEC_IDS", "check_finite"]

CODEC_NAMES = tuple(CODEC_IDS)


class Codec:
    """How one tier stores blocks of ``layout``: ``nbytes`` per block, and the conversions to and from it."""

    name: str
    id: int
    lossy: bool
    layout: KVLayout
    nbytes: int

    def encode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        """``blocks`` ``[n, *layout.block_shape]`` of ``layout.dtype`` (any strides) into ``out`` ``[n, nbytes]``
        uint8 whose rows are contiguous, on the same device."""
        raise NotImplementedError

    def decode(self, encoded: torch.Tensor, out: torch.Tensor) -> None:
        """``encoded`` ``[n, nbytes]`` uint8 into ``out`` ``[n, *layout.block_shape]`` of ``layout.dtype``, on the
        same device. Raises ``ValueError`` when a CPU row's header is not this codec's (another format version,
        codec or dtype)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.nbytes} bytes per block)"


class NoneCodec(Codec):
    """Blocks stored as they are (bit-exact)."""

    name, id, lossy = "none", 0, False

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        self.nbytes = layout.block_nbytes

    def encode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        copy_bytes(out, blocks.contiguous().reshape(blocks.shape[0], -1).view(torch.uint8))

    def decode(self, encoded: torch.Tensor, out: torch.Tensor) -> None:
        copy_bytes(out.view(torch.uint8).reshape(encoded.shape[0], -1), encoded)


class LossyCodec(Codec):
    """fp8 (e4m3) or int8 with float32 scales; see :mod:`tierkv.codec.format` for the layout and the maths."""

    lossy = True

    def __init__(self, name: str, layout: KVLayout) -> None:
        self.format = EncodedFormat(name, layout)  # raises ValueError for a dtype the codecs do not take
        self.name, self.id, self.layout = name, CODEC_IDS[name], layout
        self.nbytes = self.format.nbytes
        self._header = torch.frombuffer(bytearray(self.format.header()), dtype=torch.uint8)
        L, _, T, H, D = layout.block_shape
        self._geometry = (self.id, DTYPE_IDS[layout.dtype], L, T, H, D)

    def encode(self, blocks: torch.Tensor, out: torch.Tensor) -> None:
        _check_rows(out, self.nbytes)
        _check_blocks(blocks, self.layout, out.shape[0], "blocks")
        if blocks.device != out.device:
            raise ValueError(f"expected blocks and encoded rows on one device, got {blocks.device} and {out.device}")
        if blocks.shape[0] == 0:
            return
        module = _kernels(blocks.device)
        if module is None:
            reference.encode(blocks, self.format, out)
            return
        src = blocks.contiguous()
        _launch(module, "quantize", self._geometry, _row_pointers(src, self.layout.block_nbytes),
                _row_pointers(out, out.stride(0)), src.device)

    def decode(self, encoded: torch.Tensor, out: torch.Tensor) -> None:
        _check_rows(encoded, self.nbytes)
        _check_blocks(out, self.layout, encoded.shape[0], "out")
        if encoded.device != out.device:
            raise ValueError(f"expected encoded rows and out on one device, got {encoded.device} and {out.device}")
        if encoded.shape[0] == 0:
            return
        if encoded.device.type == "cpu":
            self._check_headers(encoded)
        module = _kernels(encoded.device)
        if module is None or not out.is_contiguous():
            if module is None:
                reference.decode(encoded, self.format, out)
                return
            staged = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            self.decode(encoded, staged)
            out.copy_(staged)
            return
        _launch(module, "dequantize", self._geometry, _row_pointers(encoded, encoded.stride(0)),
                _row_pointers(out, self.layout.block_nbytes), out.device)

    def _check_headers(self, encoded: torch.Tensor) -> None:
        headers = encoded[:, :HEADER_NBYTES]
        bad = (headers != self._header).any(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            found = self.format.describe_header(bytes(headers[row].tolist()))
            expected = self.format.describe_header(self.format.header())
            raise ValueError(f"expected an encoded block with header ({expected}), got ({found}) in row {row}")


def make_codec(name: str, layout: KVLayout) -> Codec:
    """The codec called ``name`` ("none", "fp8" or "int8") for blocks of ``layout``."""
    if name == "none":
        return NoneCodec(layout)
    if name in ("fp8", "int8"):
        return LossyCodec(name, layout)
    raise ValueError(f"expected codec one of {list(CODEC_NAMES)}, got {name!r}")


def check_finite(blocks: torch.Tensor) -> None:
    """Raise ``ValueError`` when ``blocks`` hold NaN or infinity (a lossy codec cannot encode them)."""
    if not blocks.is_floating_point():
        return
    module = _kernels(blocks.device) if blocks.device.type == "cpu" and blocks.dtype in DTYPE_IDS else None
    if module is not None:
        src = blocks.contiguous()
        finite = module.all_finite(DTYPE_IDS[src.dtype], src.data_ptr(), src.numel())
    else:
        finite = bool(torch.isfinite(blocks).all())
    if not finite:
        raise ValueError("expected finite KV values for a store with a lossy codec, got NaN or infinity "
                         "(quantizing them would store garbage)")


# -- native dispatch --------------------------------------------------------------------------------------------
def _kernels(device: torch.device):
    """The compiled module that runs codecs on ``device``, or None for the torch reference."""
    if device.type == "cpu":
        module = ops.native()
        return module if module is not None and hasattr(module, "quantize") else None
    if device.type == "cuda":
        return ops.cuda()
    return None


def _check_rows(t: torch.Tensor, nbytes: int) -> None:
    # The kernels take one pointer per row and read nbytes from it: the bytes of a row must be adjacent.
    if t.dtype != torch.uint8 or t.dim() != 2 or t.shape[1] != nbytes or (nbytes > 1 and t.stride(1) != 1):
        raise ValueError(f"expected encoded rows [n, {nbytes}] of uint8 with contiguous rows, got "
                         f"{list(t.shape)} of {t.dtype} with strides {list(t.stride())}")


def _check_blocks(t: torch.Tensor, layout: KVLayout, n: int, what: str) -> None:
    # Checked before any pointer reaches a kernel: a wrong shape or dtype would read or write past the buffer.
    expected = [n, *layout.block_shape]
    if t.dtype != layout.dtype or list(t.shape) != expected:
        raise ValueError(f"expected {what} of shape {expected} and dtype {layout.dtype}, "
                         f"got {list(t.shape)} of {t.dtype}")


def _row_pointers(t: torch.Tensor, row_stride_bytes: int) -> np.ndarray:
    """Address of each of ``t``'s rows (``t.shape[0]`` of them) as uint64."""
    n = t.shape[0]
    return (np.uint64(t.data_ptr()) + np.arange(n, dtype=np.uint64) * np.uint64(row_stride_bytes)).astype(np.uint64)


def _launch(module, op: str, geometry: tuple[int, ...], src: np.ndarray, dst: np.ndarray,
            device: torch.device) -> None:
    if device.type == "cpu":
        getattr(module, op)(*geometry, src, dst)
        return
    # CUDA: the pointer table travels to the device with the work, on the caller's current stream, so nothing
    # here waits for the GPU. Why the two temporary tensors may be dropped as soon as this returns:
    # - `pinned` (page-locked, from torch's caching host allocator): the non_blocking copy records an event on
    #   the stream for its block, and the allocator does not hand the block out again until that event has
    #   completed, i.e. until the DMA has read it. (Pageable memory would make the copy synchronous.)
    # - `table` (device, from the caching allocator): allocated on `stream` and read only by work enqueued on
    #   `stream` (the copy, then the kernel). Freed memory is reused only by later work on that same stream, which
    #   runs after the kernel; a kernel on another stream would need table.record_stream(...).
    n = src.shape[0]
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        pinned = torch.empty((2, n), dtype=torch.int64, pin_memory=True)
        rows = pinned.numpy()
        rows[0] = src.view(np.int64)
        rows[1] = dst.view(np.int64)
        table = pinned.to(device, non_blocking=True)
        getattr(module, op)(*geometry, table.data_ptr(), n, stream.cuda_stream)


def transcode(src: torch.Tensor, src_codec: Codec, dst: torch.Tensor, dst_codec: Codec) -> None:
    """Write one block stored as ``src_codec`` (``src``: 1-D uint8 of ``src_codec.nbytes``) into ``dst`` (1-D uint8 of
    ``dst_codec.nbytes``) as ``dst_codec`` stores it; the two may be on different devices.

    The same codec on both sides is a copy of the stored bytes, never a re-quantization. Otherwise the work runs
    on the GPU when either side is there: quantize before a device-to-host copy, dequantize after a
    host-to-device copy, so PCIe carries the small form.
    """
    if src_codec.name == dst_codec.name:
        copy_bytes(dst, src)
        return
    layout = dst_codec.layout
    shape = (1, *layout.block_shape)
    if not src_codec.lossy and not dst_codec.lossy:
        raise AssertionError(f"two different lossless codecs: {src_codec.name}, {dst_codec.name}")
    if not src_codec.lossy:  # quantize where the raw block is
        blocks = src.view(layout.dtype).view(shape)
        if dst.device == src.device:
            dst_codec.encode(blocks, dst.view(1, -1))
        else:
            encoded = torch.empty((1, dst_codec.nbytes), dtype=torch.uint8, device=src.device)
            dst_codec.encode(blocks, encoded)
            copy_bytes(dst, encoded[0])
    elif not dst_codec.lossy:  # dequantize where the raw block goes
        encoded = src if src.device == dst.device else src.to(dst.device)
        src_codec.decode(encoded.view(1, -1), dst.view(layout.dtype).view(shape))
    else:  # two lossy codecs (the config rejects this pairing; kept correct for custom tier stacks)
        raw = torch.empty(layout.block_nbytes, dtype=torch.uint8, device=src.device)
        transcode(src, src_codec, raw, NoneCodec(layout))
        transcode(raw, NoneCodec(layout), dst, dst_codec)
