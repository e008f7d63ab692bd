"""vLLM's paged KV-cache tensors read and written as tierkv blocks.

vLLM hands a KV connector one tensor per attention layer (``register_kv_caches``). What that tensor looks like
depends on the vLLM version and the attention backend:

- vLLM 0.32/0.33 (RFC #42082): a 4-D view ``[blocks, heads, tokens, 2 * head_size]``, K then V along the last
  axis, of one int8 buffer shared by every layer. ``KVCacheLayout`` (LBNHC, LBHNC, LHBNC, BLHNC, BLNHC, BHLNC)
  only changes the strides: layers may sit side by side inside each block, and a layer's block may be split
  into one run per head. When a backend's kernels take smaller blocks than the scheduler's, ``blocks`` counts
  kernel blocks: ``num_blocks * r`` rows of ``block_size / r`` tokens, manager block ``b`` being rows
  ``b * r .. b * r + r - 1``.
- Older vLLM and out-of-tree backends: 5-D ``[2, blocks, tokens, heads, head_size]`` (FlashAttention) or
  ``[blocks, 2, tokens, heads, head_size]`` (FlashInfer), tokens and heads in either order in memory (NHD, HND).

Nothing here assumes a physical order. Each layer becomes a strided view in tierkv's axis order
``[blocks, 2, tokens, heads, dim]``; layers evenly spaced in one buffer become one view with a layer axis; and a
batch of blocks moves with one ``index_select`` / ``index_copy_`` per such view, on whatever device the cache
lives (on CUDA, on the current stream). Bytes are moved through a same-width integer view of the cache, so
copies are bit-exact for every dtype (torch has no CPU ``index_copy_`` for float8).

This module imports torch only, never vllm.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from tierkv.layout import KVLayout

__all__ = ["PagedKV", "layer_sort_key"]

# Physical axis order of a vLLM KVCacheLayout is its name (outermost first); the legacy names are vLLM's aliases.
_LAYOUT_NAMES = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")
_LEGACY_LAYOUT_NAMES = {"NHD": "LBNHC", "HND": "LBHNC"}

# Same-width integer dtypes: copying through them is bit-exact and supported for every cache dtype.
_RAW_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def layer_sort_key(name: str) -> tuple[tuple[int, ...], str]:
    """Sort key ordering vLLM layer names by their layer index: the integer components of the dotted name
    (``model.layers.10.self_attn.attn`` -> ``(10,)``), then the name itself for names without one."""
    return tuple(int(part) for part in name.split(".") if part.isdigit()), name


@dataclass(frozen=True)
class _Run:
    """Layers ``start:stop`` of a tierkv block, as one strided view of vLLM's memory:
    ``[num_blocks, stop - start, 2, r, block_size // r, heads, dim]`` in a raw integer dtype."""

    start: int
    stop: int
    view: torch.Tensor


class PagedKV:
    """vLLM's KV cache for one group of attention layers, addressed by vLLM block id, as tierkv blocks.

    ``kv_caches`` is what vLLM passes to ``register_kv_caches`` (layer name -> tensor), restricted to the layers
    of one KV cache group: for a hybrid model (e.g. full and sliding-window attention in separate groups), the
    groups overlay the same memory and each has its own block ids, so build one ``PagedKV`` per group. Layers are
    ordered by :func:`layer_sort_key`. A layer that shares another layer's cache (cross-layer KV sharing: the
    same tensor under two names) is stored once and listed in :attr:`aliases`.

    The other arguments are what the connector knows from vLLM's ``KVCacheConfig`` and the group's
    ``AttentionSpec``: ``num_blocks`` (``kv_cache_config.num_blocks``), ``block_size`` (tokens per scheduler
    block), ``num_kv_heads`` (on this rank), ``head_size``, optionally ``dtype`` (checked against the tensors)
    and ``kv_cache_layout`` (``cache_config.kv_cache_layout``, e.g. ``"LBNHC"``; ``"NHD"``/``"HND"`` accepted),
    which, when given, is checked against the tensors' strides.

    Raises ``ValueError`` ("expected ..., got ...", naming the layer, its shape and strides) for a tensor that
    is not one of the forms in this module's docstring (an MLA latent cache, K and V of different sizes, a
    different head count or block size), layers that disagree on dtype or device, a view whose elements overlap,
    or strides that contradict ``kv_cache_layout``; ``TypeError`` for a non-tensor.
    """

    def __init__(
        self,
        kv_caches: Mapping[str, torch.Tensor],
        *,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        dtype: torch.dtype | None = None,
        kv_cache_layout: str | None = None,
    ) -> None:
        for arg, value in (("num_blocks", num_blocks), ("block_size", block_size),
                           ("num_kv_heads", num_kv_heads), ("head_size", head_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {arg} to be a positive int, got {value!r}")
        if not kv_caches:
            raise ValueError("expected at least one layer in kv_caches, got none")
        physical_order = _parse_layout_name(kv_cache_layout)
        self.num_blocks = num_blocks
        self.block_size = block_size

        names = sorted(kv_caches, key=layer_sort_key)
        first = kv_caches[names[0]]
        if not isinstance(first, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor for layer {names[0]!r}, got {type(first).__name__}")
        cache_dtype = dtype if dtype is not None else first.dtype
        if cache_dtype.itemsize not in _RAW_DTYPES:
            raise ValueError(f"expected a KV cache dtype of 1, 2, 4 or 8 bytes, got {cache_dtype}")
        self.device = first.device

        # Cross-layer KV sharing hands the same view under two names: store it once.
        aliases: dict[str, str] = {}
        owners: dict[tuple, str] = {}
        layers: list[tuple[str, torch.Tensor]] = []
        for name in names:
            t = kv_caches[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"expected a torch.Tensor for layer {name!r}, got {type(t).__name__}")
            if t.dtype != cache_dtype or t.device != self.device:
                raise ValueError(f"expected layer {name!r} with dtype {cache_dtype} on {self.device}, "
                                 f"got {t.dtype} on {t.device}")
            identity = (t.data_ptr(), tuple(t.shape), t.stride())
            if identity in owners:
                aliases[name] = owners[identity]
                continue
            owners[identity] = name
            layers.append((name, _canonical_view(name, t, num_blocks, block_size, num_kv_heads, head_size)))

        self.layer_names: tuple[str, ...] = tuple(name for name, _ in layers)
        self.aliases: dict[str, str] = aliases
        self.layout = KVLayout(num_layers=len(layers), num_kv_heads=num_kv_heads, head_dim=head_size,
                               block_tokens=block_size, dtype=cache_dtype)
        self._raw_dtype = _RAW_DTYPES[cache_dtype.itemsize]
        # (r, block_size // r): a block's tokens as r kernel blocks, one split for all layers of a tierkv block
        self._split = layers[0][1].shape[2:4]
        for name, view in layers:
            if view.shape[2:4] != self._split:
                raise ValueError(f"expected layer {name!r} in kernel blocks of {self._split[1]} tokens like "
                                 f"{layers[0][0]!r}, got shape {list(kv_caches[name].shape)}")
        self._runs = _stack_runs([view for _, view in layers], self._raw_dtype)
        if physical_order is not None:
            for run in self._runs:
                _check_layout(kv_cache_layout, physical_order, run, self.layer_names, kv_caches)

    @property
    def copy_ops(self) -> int:
        """Index operations per :meth:`gather` or :meth:`scatter`: 1 when all layers live evenly strided in one
        buffer (every vLLM 0.32 layout), else one per group of such layers (one per layer for separately
        allocated caches)."""
        return len(self._runs)

    def gather(self, block_ids: Sequence[int] | torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy vLLM blocks ``block_ids`` into tierkv blocks.

        ``block_ids``: ``n`` vLLM block ids (a sequence of ints or a 1-D integer tensor; repeats allowed).
        ``out``: optional ``[n, layers, 2, tokens, heads, dim]`` tensor of :attr:`layout`'s dtype on the cache's
        device; a new contiguous one when None. Returns ``out``, ``out[i]`` holding block ``block_ids[i]``
        (K at ``[:, :, 0]``, V at ``[:, :, 1]``). On CUDA the copy is queued on the current stream.

        Raises ``ValueError`` for an id outside ``[0, num_blocks)`` (checked for ids on the host; ids already on
        the device are trusted, checking them would wait for the GPU) or an ``out`` of the wrong shape, dtype or
        device; ``TypeError`` for a non-integer id.
        """
        index = self._index(block_ids, distinct=False)
        n = index.numel()
        if out is None:
            out = torch.empty((n, *self.layout.block_shape), dtype=self.layout.dtype, device=self.device)
        else:
            self._check_blocks("out", out, n)
        dst = self._raw(out)
        for run in self._runs:
            torch.index_select(run.view, 0, index, out=dst[:, run.start:run.stop])
        return out

    def scatter(self, block_ids: Sequence[int] | torch.Tensor, src: torch.Tensor) -> None:
        """Write tierkv blocks ``src`` into vLLM blocks ``block_ids``; no other byte of the cache changes.

        ``block_ids``: ``n`` distinct vLLM block ids; ``src``: ``[n, layers, 2, tokens, heads, dim]`` of
        :attr:`layout`'s dtype on the cache's device, ``src[i]`` going to block ``block_ids[i]``. On CUDA the
        copy is queued on the current stream: keep ``src`` alive and unchanged until it has run.

        Raises ``ValueError`` for an id outside ``[0, num_blocks)`` or repeated (checked for ids on the host),
        or a ``src`` of the wrong shape, dtype or device; ``TypeError`` for a non-integer id.
        """
        index = self._index(block_ids, distinct=True)
        self._check_blocks("src", src, index.numel())
        raw = self._raw(src)
        for run in self._runs:
            run.view.index_copy_(0, index, raw[:, run.start:run.stop])

    def __repr__(self) -> str:
        return (f"PagedKV({self.layout}, num_blocks={self.num_blocks}, device={self.device}, "
                f"copy_ops={self.copy_ops}, aliases={len(self.aliases)})")

    # -----------------------------------------------------------------------------------------------------------

    def _raw(self, blocks: torch.Tensor) -> torch.Tensor:
        """``[n, layers, 2, tokens, heads, dim]`` -> ``[n, layers, 2, r, tokens // r, heads, dim]``, raw dtype."""
        return blocks.view(self._raw_dtype).unflatten(3, self._split)

    def _check_blocks(self, what: str, blocks: torch.Tensor, n: int) -> None:
        if not isinstance(blocks, torch.Tensor):
            raise TypeError(f"expected {what} to be a torch.Tensor, got {type(blocks).__name__}")
        shape = (n, *self.layout.block_shape)
        if tuple(blocks.shape) != shape or blocks.dtype != self.layout.dtype or blocks.device != self.device:
            raise ValueError(f"expected {what} of shape {list(shape)}, dtype {self.layout.dtype} on {self.device}, "
                             f"got {list(blocks.shape)}, {blocks.dtype} on {blocks.device}")

    def _index(self, block_ids: Sequence[int] | torch.Tensor, *, distinct: bool) -> torch.Tensor:
        """``block_ids`` as an int64 tensor on the cache's device, validated while it is still on the host."""
        if isinstance(block_ids, torch.Tensor):
            if block_ids.dim() != 1 or block_ids.dtype.is_floating_point or block_ids.dtype.is_complex \
                    or block_ids.dtype == torch.bool:
                raise TypeError(f"expected block ids as a 1-D integer tensor, got {block_ids.dim()}-D "
                                f"{block_ids.dtype}")
            host = block_ids if block_ids.device.type == "cpu" else None
        else:
            host = torch.tensor([operator.index(i) for i in block_ids], dtype=torch.int64)
        if host is None:
            return block_ids.to(device=self.device, dtype=torch.int64, non_blocking=True)
        host = host.to(torch.int64)
        if host.numel():
            low, high = int(host.min()), int(host.max())
            if low < 0 or high >= self.num_blocks:
                bad = low if low < 0 else high
                raise ValueError(f"expected block ids in [0, {self.num_blocks}), got {bad}")
            if distinct:
                values, counts = torch.unique(host, return_counts=True)
                repeated = (counts > 1).nonzero()
                if repeated.numel():
                    i = int(repeated[0])
                    raise ValueError(f"expected distinct block ids to write to, got {int(values[i])} "
                                     f"{int(counts[i])} times")
        if self.device.type == "cuda":
            # Pinned, so the copy is queued on the stream instead of stalling the host until the GPU is idle.
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)


def _parse_layout_name(name: str | None) -> str | None:
    if name is None:
        return None
    resolved = _LEGACY_LAYOUT_NAMES.get(name, name)
    if resolved not in _LAYOUT_NAMES:
        raise ValueError(f"expected kv_cache_layout one of {[*_LAYOUT_NAMES, *_LEGACY_LAYOUT_NAMES]} or None, "
                         f"got {name!r}")
    return resolved


def _canonical_view(name: str, t: torch.Tensor, num_blocks: int, block_size: int, heads: int,
                    head_size: int) -> torch.Tensor:
    """One layer's cache as a view ``[num_blocks, 2, r, block_size // r, heads, head_size]`` of its memory."""
    shape = tuple(t.shape)
    view = None
    if t.dim() == 4:
        rows, h, tokens, content = shape
        if h == heads and content == 2 * head_size and 0 < tokens <= block_size and block_size % tokens == 0 \
                and rows == num_blocks * (block_size // tokens):
            # [B*r, H, N, (K|V) D] -> [B, r, H, N, 2, D] -> [B, 2, r, N, H, D]
            view = t.unflatten(0, (num_blocks, rows // num_blocks)).unflatten(-1, (2, head_size))
            view = view.permute(0, 4, 1, 3, 2, 5)
    elif t.dim() == 5:
        kv_first = shape == (2, num_blocks, block_size, heads, head_size)
        blocks_first = shape == (num_blocks, 2, block_size, heads, head_size)
        if kv_first and blocks_first:
            raise ValueError(f"expected layer {name!r} to tell blocks from K/V, got shape {list(shape)} with "
                             f"num_blocks=2: [2, blocks, ...] and [blocks, 2, ...] read the same")
        if kv_first:
            view = t.transpose(0, 1).unsqueeze(2)
        elif blocks_first:
            view = t.unsqueeze(2)
    if view is None:
        hint = ""
        if t.dim() == 4 and shape[-1] != 2 * head_size and shape[1] == 1:
            hint = " (an MLA latent cache has one vector per token, no separate K and V)"
        raise ValueError(
            f"expected layer {name!r} of shape [{num_blocks} (x r kernel blocks), {heads}, {block_size} (/ r), "
            f"{2 * head_size}], [2, {num_blocks}, {block_size}, {heads}, {head_size}] or "
            f"[{num_blocks}, 2, {block_size}, {heads}, {head_size}], got shape {list(shape)} "
            f"strides {list(t.stride())}{hint}")
    if not _non_overlapping(view.shape, view.stride()):
        raise ValueError(f"expected layer {name!r} to address each element once, got shape {list(shape)} "
                         f"strides {list(t.stride())}")
    return view


def _non_overlapping(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether no two indices of a strided view reach the same element: sorted by stride, each axis must step
    past everything the axes inside it span. Sufficient, and true for every layout vLLM allocates."""
    extent = 1
    for stride, size in sorted((st, sz) for sz, st in zip(shape, strides) if sz > 1):
        if stride < extent:
            return False
        extent += (size - 1) * stride
    return True


def _stack_runs(views: list[torch.Tensor], raw_dtype: torch.dtype) -> list[_Run]:
    """Group consecutive layers whose views differ only by a constant storage offset into one view with a layer
    axis ``[B, L, 2, r, N, H, D]``: one index op then moves a batch of blocks for all of them."""
    runs: list[_Run] = []
    start = 0
    while start < len(views):
        base = views[start]
        stop, step = start + 1, None
        while stop < len(views):
            nxt = views[stop]
            offset = nxt.storage_offset() - base.storage_offset()
            if (nxt.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
                    or nxt.shape != base.shape or nxt.stride() != base.stride()
                    or offset <= 0 or (step is not None and offset != (stop - start) * step)):
                break
            candidate_step = offset if step is None else step
            size = (base.shape[0], stop + 1 - start, *base.shape[1:])
            stride = (base.stride(0), candidate_step, *base.stride()[1:])
            if not _non_overlapping(size, stride):
                break
            step = candidate_step
            stop += 1
        count = stop - start
        stride = (base.stride(0), step or 1, *base.stride()[1:])
        view = base.as_strided((base.shape[0], count, *base.shape[1:]), stride, base.storage_offset())
        runs.append(_Run(start, stop, view.view(raw_dtype)))
        start = stop
    return runs


def _check_layout(layout_name: str, physical_order: str, run: _Run, layer_names: tuple[str, ...],
                  kv_caches: Mapping[str, torch.Tensor]) -> None:
    """Raise unless the run's strides put the L, B, H, N axes (those longer than 1) in ``physical_order``."""
    view = run.view  # [B, L, 2, r, N, H, D]
    axes = {"B": 0, "L": 1, "N": 4, "H": 5}
    found = sorted((a for a, dim in axes.items() if view.shape[dim] > 1), key=lambda a: -view.stride(axes[a]))
    expected = [a for a in physical_order if a in found]
    if found != expected:
        name = layer_names[run.start]
        t = kv_caches[name]
        raise ValueError(f"expected layer {name!r} in KV cache layout {layout_name} (outermost first "
                         f"{''.join(expected)}), got shape {list(t.shape)} strides {list(t.stride())} "
                         f"(outermost first {''.join(found)})")
