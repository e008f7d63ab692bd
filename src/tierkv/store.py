"""``BlockStore``: the public facade. It validates input, builds the tiers and hands work to the manager."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from ._memory import aligned_empty, round_up
from .codec import check_finite, make_codec
from .config import StoreConfig
from .errors import StoreClosed
from .keys import KEY_BYTES, root_key
from .layout import KVLayout
from .manager import TierManager
from .stats import StoreStats
from .tiers import DiskTier, MemoryTier, Tier
from .transfer import producer_event

__all__ = ["BlockStore"]

T = TypeVar("T")


class BlockStore:
    """Fixed-size KV-cache blocks in up to three tiers — device, host, disk — keyed by 16-byte prefix keys.

    ``layout`` fixes the block shape ``[num_layers, 2, block_tokens, num_kv_heads, head_dim]`` and dtype;
    ``config`` the tier capacities (default: ``StoreConfig()``). The store's ``device`` is the current CUDA
    device when CUDA is available and ``device_bytes > 0``, else the CPU; ``get`` returns blocks there.

    Blocks go to the top tier on ``put``; when a tier is full its least recently used blocks move one tier
    down, and off the last one. ``get`` promotes lower-tier hits to the top. All methods are thread-safe.
    Use as a context manager, or call ``close()``, which also writes resident blocks to the disk tier.

    ``put_async``, ``get_async`` and ``prefetch`` return ``concurrent.futures.Future`` s and run on two
    background lanes, one for saves and one for loads, each in submission order; a load of a key waits for
    earlier ``put_async`` s of that key (read your writes). Disk writes are write-behind (``writeback_bytes``):
    pushing blocks out of a full memory tier never waits for the SSD.

    Raises ``ValueError`` for a nonzero tier capacity smaller than one block, or an unusable ``disk_path``;
    ``tierkv.LayoutMismatch`` when ``disk_path`` holds blocks of another layout; ``tierkv.StoreInUse`` when
    another open store holds ``disk_path``.
    """

    def __init__(self, layout: KVLayout, config: StoreConfig | None = None) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"expected layout as tierkv.KVLayout, got {type(layout).__name__}")
        config = StoreConfig() if config is None else config
        if not isinstance(config, StoreConfig):
            raise TypeError(f"expected config as tierkv.StoreConfig, got {type(config).__name__}")
        self.layout = layout
        self.config = config
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if config.device_bytes and torch.cuda.is_available() else torch.device("cpu"))
        tiers = self._open_tiers()
        try:
            self._manager = TierManager(tiers, config.policy, config.io_threads,
                                        disk_admit_uses=config.disk_admit_uses, writeback_bytes=config.writeback_bytes)
        except BaseException:
            # Recovery failed (an unreadable index, say): release what the tiers hold, the disk_path lock above
            # all, or every later open in this process would be refused as "already open by another store".
            for tier in tiers:
                with contextlib.suppress(Exception):  # the recovery error is the one to report
                    tier.close()
            raise
        self._lossy = any(t.codec.lossy for t in self._manager.tiers)
        self._state = threading.Condition()
        self._active = 0
        self._closed = False
        # Async lanes (one thread each, started on first use) and the put_async futures not yet done, by key.
        self._lanes: dict[str, ThreadPoolExecutor] = {}
        self._pending_puts: dict[bytes, Future] = {}
        self._pending_lock = threading.RLock()  # a done callback may run inside submit, on this thread
        self._prefetches: set[Future] = set()

    def _open_tiers(self) -> list[Tier]:
        c, layout = self.config, self.layout
        # Codecs first: a layout a lossy codec cannot take is refused before any memory or file is touched.
        host_codec, disk_codec = make_codec(c.host_codec, layout), make_codec(c.disk_codec, layout)
        disk_slot = round_up(disk_codec.nbytes)
        if c.disk_path is not None and c.disk_bytes < disk_slot:  # checked before the directory is touched
            raise ValueError(f"expected disk_bytes of at least one 4096-aligned block ({disk_slot} bytes for "
                             f"{layout} with codec {disk_codec.name!r}), got {c.disk_bytes}")
        tiers: list[Tier] = []
        try:
            if c.device_bytes:
                tiers.append(self._sized(MemoryTier("device", c.device_bytes, make_codec("none", layout),
                                                    self.device), "device_bytes", c.device_bytes))
            if c.host_bytes:
                tiers.append(self._sized(MemoryTier("host", c.host_bytes, host_codec, torch.device("cpu"),
                                                    pinned=True), "host_bytes", c.host_bytes))
            if c.disk_path is not None:
                tiers.append(self._sized(DiskTier(c.disk_path, c.disk_bytes, layout, disk_codec, c.disk_backend),
                                         "disk_bytes", c.disk_bytes))
        except BaseException:
            for tier in tiers:
                tier.close()
            raise
        return tiers

    def _sized(self, tier: Tier, setting: str, value: int) -> Tier:
        """``tier`` when it holds at least one block; closes it and raises ``ValueError`` otherwise."""
        if tier.capacity_slots < 1:
            tier.close()
            aligned = " (4096-aligned)" if tier.persistent else ""
            raise ValueError(f"expected {setting} of 0 or at least one{aligned} block ({tier.slot_nbytes} bytes for "
                             f"{self.layout} with codec {tier.codec.name!r}), got {value}")
        return tier

    # -- operations ---------------------------------------------------------------------------------------------
    def put(self, keys: Sequence[bytes], blocks: torch.Tensor) -> int:
        """Store ``blocks[i]`` under ``keys[i]``.

        ``blocks``: ``[len(keys), num_layers, 2, block_tokens, num_kv_heads, head_dim]`` of ``layout.dtype``,
        on any device, contiguous or not. Keys passed together form a prefix chain (each the parent of the
        next). A key already stored keeps its stored bytes and becomes most recently used; a key named twice
        in one call is stored with its first block (the later ones are ignored).
        Returns the number of blocks newly stored. Running out of room is not an error: the least recently
        used blocks move down a tier, and off the last one.

        Raises ``TypeError``/``ValueError`` (the store unchanged) for keys that are not 16-byte ``bytes``, a
        tensor of another dtype or shape, on neither a cpu nor a cuda device (``meta``), or
        ``len(keys) != blocks.shape[0]``.
        """
        keys = self._check_keys(keys)
        data = self._check_blocks(keys, blocks)
        if self._lossy:
            check_finite(blocks)
        with self._operation():
            return self._manager.put(keys, data, producer_event(data))

    def put_async(self, keys: Sequence[bytes], blocks: torch.Tensor) -> "Future[int]":
        """``put`` in the background: returns a future of the number of blocks newly stored.

        Keys, shape and dtype are checked now (``TypeError``/``ValueError`` raised here, the store unchanged);
        NaN or infinity in a store with a lossy codec fails the future with ``ValueError``. ``blocks`` must not
        change until the future is done (CUDA: the copy starts after the work queued so far on the current
        stream, without blocking this thread). Puts run one after another in submission order; ``get``,
        ``get_async`` and ``prefetch`` of these keys wait for this put first. Raises ``StoreClosed`` after
        ``close()``; ``close()`` waits for puts already submitted.
        """
        keys = self._check_keys(keys)
        data = self._check_blocks(keys, blocks)
        ready = producer_event(data)

        def put() -> int:
            if self._lossy:
                if ready is not None:
                    ready.synchronize()  # the check reads the blocks: wait (here, not in the caller) for their producer
                check_finite(blocks)
            return self._manager.put(keys, data, ready)

        with self._pending_lock:
            future = self._submit("save", put)
            for key in keys:
                self._pending_puts[key] = future
            future.add_done_callback(lambda done: self._forget_put(keys, done))
        return future

    def _forget_put(self, keys: list[bytes], done: Future) -> None:
        with self._pending_lock:
            for key in keys:
                if self._pending_puts.get(key) is done:
                    del self._pending_puts[key]

    def _await_puts(self, keys: Sequence[bytes]) -> None:
        """Wait for the put_async of any of ``keys`` still running (read your writes); their failures are
        theirs to report, through their own futures."""
        with self._pending_lock:
            if not self._pending_puts:
                return
            pending = {self._pending_puts[k] for k in keys if k in self._pending_puts}
        wait(pending)

    def get(self, keys: Sequence[bytes], out: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks of ``keys`` as ``[len(keys), *layout.block_shape]`` of ``layout.dtype``.

        Returns a new tensor on the store's device, or fills and returns ``out`` (same shape and dtype,
        contiguous, any device). Blocks found below the top tier are promoted to it.

        Raises ``tierkv.BlockNotFound`` (a ``KeyError``) naming the first key that is not retrievable — never
        stored, evicted, deleted, or whose stored bytes failed their checksum (counted in ``stats().corrupt``);
        ``out`` may then be partly written.
        """
        keys, out = self._get_args(keys, out)
        with self._operation():
            return self._get_checked(keys, out, producer_event(out))

    def get_async(self, keys: Sequence[bytes], out: torch.Tensor | None = None) -> "Future[torch.Tensor]":
        """``get`` in the background: returns a future of the blocks (``out`` when given).

        Arguments are checked now; a missing or corrupt block fails the future with ``tierkv.BlockNotFound``.
        Loads run one after another in submission order, after any earlier ``put_async`` of these keys; CUDA:
        the copies into ``out`` start after the work queued so far on the current stream. Raises
        ``StoreClosed`` after ``close()``; ``close()`` waits for loads already submitted.
        """
        keys, out = self._get_args(keys, out)
        ready = producer_event(out)
        return self._submit("load", lambda: self._get_checked(keys, out, ready))

    def prefetch(self, keys: Sequence[bytes]) -> "Future[int]":
        """Bring the blocks of ``keys`` up to the top tier in the background, so that a later ``get`` is served
        from there; keys not stored are skipped. Returns a future of how many of ``keys`` the top tier holds
        once done. Prefetched blocks count as ``stats().prefetched``, not as hits: the ``get`` that follows
        counts its hits where it finds them. Runs on the load lane, in order with ``get_async``; prefetches
        still queued when the store closes are cancelled (they are hints).
        """
        keys = self._check_keys(keys)

        def prefetch() -> int:
            self._await_puts(keys)
            return self._manager.prefetch(keys)

        future = self._submit("load", prefetch)
        with self._pending_lock:
            self._prefetches.add(future)
            future.add_done_callback(self._forget_prefetch)
        return future

    def _forget_prefetch(self, done: Future) -> None:
        with self._pending_lock:  # close() copies the set under this lock
            self._prefetches.discard(done)

    def _get_args(self, keys: Sequence[bytes], out: torch.Tensor | None) -> tuple[list[bytes], torch.Tensor]:
        keys = self._check_keys(keys)
        shape = (len(keys), *self.layout.block_shape)
        if out is None:
            out = self._empty(shape)
        else:
            self._check_out(out, shape)
        return keys, out

    def _get_checked(self, keys: list[bytes], out: torch.Tensor, ready: "torch.cuda.Event | None") -> torch.Tensor:
        self._await_puts(keys)
        self._manager.get(keys, out.view(torch.uint8).view(len(keys), self.layout.block_nbytes), ready)
        return out

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of ``keys`` that ``get`` can return (answered from the index)."""
        keys = self._check_keys(keys)
        with self._operation():
            return self._manager.lookup(keys)

    def lookup_tokens(self, token_ids: Any, salt: bytes = b"") -> int:
        """How many leading full blocks of a prompt ``get`` can return: ``lookup(block_keys(token_ids,
        layout.block_tokens, salt))`` without building a key per block. The native prefix index hashes block by
        block and stops at the first miss, in one call without the GIL (a 128k-token prompt in about 0.1 ms).

        ``token_ids``: a 1-D sequence of ints, numpy integer array or torch integer CPU tensor, each in
        [0, 2**32). Raises ``ValueError``/``TypeError`` as :func:`tierkv.block_keys` does.
        """
        root = root_key(salt)
        with self._operation():
            return self._manager.lookup_tokens(token_ids, self.layout.block_tokens, root)

    def locate(self, keys: Sequence[bytes]) -> list[str | None]:
        """In which tier each key is: the name of the tier a ``get`` would read it from (``"device"``,
        ``"host"`` or ``"disk"``), or None when it is not stored. A snapshot: blocks move as the store works."""
        keys = self._check_keys(keys)
        with self._operation():
            return self._manager.locate(keys)

    def __contains__(self, key: bytes) -> bool:
        key = self._check_keys([key])[0]
        with self._operation():
            return self._manager.contains(key)

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove blocks from every tier, durably on disk. Missing keys are ignored. Returns how many existed."""
        keys = self._check_keys(keys)
        with self._operation():
            return self._manager.delete(keys)

    def flush(self) -> None:
        """Copy every resident block to the disk tier (when there is one) and make it durable there.

        Afterwards a store reopened on the same ``disk_path`` finds every block this one held.
        """
        with self._operation():
            self._manager.flush()

    def drain(self) -> None:
        """Wait until every async operation submitted before this call (``put_async``, ``get_async``,
        ``prefetch``) has finished and the blocks being written to the disk tier in the background
        (write-behind) have landed, or failed (counted in ``stats()``). Unlike ``flush`` it copies nothing and
        forces nothing to stable storage; ``get`` never needs it (a block in flight is waited for). Not to be
        called from a future's callback (it would wait for itself)."""
        with self._operation():
            with self._state:
                lanes = list(self._lanes)
            wait([self._submit(lane, lambda: None) for lane in lanes])  # the lanes run in order: a barrier each
            self._manager.drain()

    def stats(self) -> StoreStats:
        """Per-tier and store-wide counters (see :class:`tierkv.StoreStats`)."""
        with self._operation():
            return self._manager.stats()

    @property
    def tier_names(self) -> list[str]:
        """Enabled tiers, fastest first: a subset of ``["device", "host", "disk"]``."""
        return [t.name for t in self._manager.tiers]

    def tier_info(self) -> list[dict]:
        """Each enabled tier, fastest first: name, device, capacity in blocks, slot size in bytes, and
        ``pinned`` (memory tiers) or ``path``, ``backend`` (``posix``/``kvikio``) and ``direct_io`` (disk)."""
        return [t.describe() for t in self._manager.tiers]

    # -- lifetime -----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for calls in progress, write resident blocks to the disk tier, release memory, files and
        threads. Idempotent; any later call raises ``tierkv.StoreClosed``."""
        with self._state:
            if self._closed:
                return
            self._closed = True
        with self._pending_lock:
            for future in list(self._prefetches):
                future.cancel()  # only those not started; a cancelled future leaves _active by its callback
        with self._state:
            while self._active:  # calls in progress and async work already submitted
                self._state.wait()
        try:
            self._manager.close()
        finally:
            for lane in self._lanes.values():
                lane.shutdown(wait=True)  # idle by now: joins the lane threads

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "+".join(self.tier_names)
        return f"BlockStore({self.layout}, tiers={state}, device={self.device})"

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        self._enter()
        try:
            yield
        finally:
            self._leave()

    def _enter(self) -> None:
        with self._state:
            if self._closed:
                raise StoreClosed("expected an open store, got one that was closed")
            self._active += 1

    def _leave(self, *_: object) -> None:
        with self._state:
            self._active -= 1
            if not self._active:
                self._state.notify_all()

    def _submit(self, lane: str, fn: Callable[[], T]) -> "Future[T]":
        """Run ``fn`` on a background lane as an operation admitted now: ``close()`` waits for it (or for its
        cancellation) before it releases anything."""
        self._enter()
        try:
            with self._state:
                executor = self._lanes.get(lane)
                if executor is None:
                    executor = self._lanes[lane] = ThreadPoolExecutor(1, thread_name_prefix=f"tierkv-{lane}")
            future = executor.submit(fn)
        except BaseException:
            self._leave()
            raise
        future.add_done_callback(self._leave)
        return future

    # -- input checks -------------------------------------------------------------------------------------------
    @staticmethod
    def _check_keys(keys: Sequence[bytes]) -> list[bytes]:
        # A set has no order, and order is the point of a chain of prefix keys.
        if isinstance(keys, (bytes, bytearray, memoryview, str, AbstractSet)) or not hasattr(keys, "__iter__"):
            raise TypeError(f"expected a sequence of {KEY_BYTES}-byte keys, got {type(keys).__name__}")
        keys = list(keys)
        for key in keys:
            if not isinstance(key, bytes):
                raise TypeError(f"expected keys as bytes, got {type(key).__name__}")
            if len(key) != KEY_BYTES:
                raise ValueError(f"expected {KEY_BYTES}-byte keys, got a key of {len(key)} bytes")
        return keys

    def _check_blocks(self, keys: list[bytes], blocks: torch.Tensor) -> torch.Tensor:
        """Validate ``blocks`` and return them as ``[n, block_nbytes]`` uint8 (contiguous, same device)."""
        if not isinstance(blocks, torch.Tensor):
            raise TypeError(f"expected blocks as a torch.Tensor, got {type(blocks).__name__}")
        if blocks.dtype != self.layout.dtype:
            raise TypeError(f"expected blocks of dtype {self.layout.dtype}, got {blocks.dtype}")
        _check_device("blocks", blocks)
        expected = [len(keys), *self.layout.block_shape]
        if list(blocks.shape[1:]) != expected[1:]:
            raise ValueError(f"expected blocks of shape {expected}, got {list(blocks.shape)}")
        if blocks.shape[0] != len(keys):
            raise ValueError(f"expected {len(keys)} blocks (one per key), got {blocks.shape[0]}")
        return blocks.detach().contiguous().view(torch.uint8).view(len(keys), self.layout.block_nbytes)

    def _check_out(self, out: torch.Tensor, shape: tuple[int, ...]) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"expected out as a torch.Tensor, got {type(out).__name__}")
        if out.dtype != self.layout.dtype:
            raise TypeError(f"expected out of dtype {self.layout.dtype}, got {out.dtype}")
        if tuple(out.shape) != shape:
            raise ValueError(f"expected out of shape {list(shape)}, got {list(out.shape)}")
        if not out.is_contiguous():
            raise ValueError("expected a contiguous out tensor, got a non-contiguous one")
        _check_device("out", out)

    def _empty(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type == "cpu":  # page-aligned, so disk reads land in it directly
            numel = 1
            for d in shape:
                numel *= d
            return aligned_empty(numel * self.layout.dtype.itemsize).view(self.layout.dtype).view(shape)
        return torch.empty(shape, dtype=self.layout.dtype, device=self.device)


def _check_device(name: str, t: torch.Tensor) -> None:
    """Blocks come from, and go to, memory the store can copy: a "meta" tensor has none (copying out of it
    fails only once the store has taken the block in; copying into it silently does nothing)."""
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"expected {name} on a cpu or cuda device, got {t.device}")
