"""``TierKVConnector``: vLLM serves prefix hits from tierkv's DRAM and NVMe tiers.

vLLM loads it with ``--kv-transfer-config '{"kv_connector": "TierKVConnector", "kv_connector_module_path":
"tierkv.integrations.vllm", "kv_role": "kv_both", "kv_connector_extra_config": {...}}'`` (see docs/vllm.md).
vLLM builds one instance per role:

- **scheduler side**: for a waiting request, how many tokens beyond vLLM's own prefix hit tierkv holds (one
  lookup over the request's block keys); those are loaded asynchronously while the request waits. After each
  step it names the newly computed full blocks to save.
- **worker side**: owns the store (host DRAM + disk; vLLM keeps the GPU memory). Loads run on the store's load
  lane and are written into vLLM's KV cache when done, between forward passes; saves copy the named blocks out
  of vLLM's KV cache right after the forward pass (so vLLM may free them at once) and store them on the save
  lane, whose disk writes are write-behind. The forward pass never waits for the disk.

Keys are vLLM's own block hashes (``request.block_hashes``), namespaced per rank (:mod:`.keys`). The scheduler side
asks the worker's store directly when it runs in the same process (:mod:`.registry`; one GPU per engine), and
every rank's store over a local socket otherwise (:mod:`.lookup`; tensor and pipeline parallelism).
"""
from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                KVConnectorRole)

import tierkv

from . import registry
from .keys import Keyspace
from .lookup import LookupClient, LookupServer, StoreView, socket_address
from .pages import PagedKV
from .settings import store_config

try:  # vLLM >= 0.32: hits reported per tier
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError:  # pragma: no cover - older vLLM
    CacheHitSource = None

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

__all__ = ["TierKVConnector", "TierKVMetadata", "Transfer"]

log = logging.getLogger("tierkv.vllm")


@dataclass
class Transfer:
    """Blocks of one request moving between tierkv and vLLM's KV cache: vLLM's block hashes (each rank keys them
    in its own namespace) and the vLLM block ids."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]


@dataclass
class TierKVMetadata(KVConnectorMetadata):
    """What the scheduler tells the workers for one step."""

    loads: list[Transfer] = field(default_factory=list)
    saves: list[Transfer] = field(default_factory=list)


@dataclass
class _Plan:
    """A lookup's answer, kept between get_num_new_matched_tokens and update_state_after_alloc."""

    start: int             # first block to load (vLLM's own hit ends there)
    hashes: list[bytes]    # vLLM's block hashes of the blocks to load (each rank keys them itself)
    tiers: list[str | None]


class TierKVConnector(KVConnectorBase_V1):
    """A vLLM KV connector backed by a :class:`tierkv.BlockStore` (see the module docstring)."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self._engine_id = str(transfer.engine_id)
        self._config = store_config(transfer.kv_connector_extra_config)  # bad settings fail at start-up
        self._block_size = vllm_config.cache_config.block_size
        self._worker: _Worker | None = None
        # scheduler side
        self._plans: dict[str, _Plan] = {}
        self._hit_tiers: dict[str, list[str | None]] = {}
        self._loads: list[Transfer] = []
        self._requests: dict[str, Request] = {}
        self._block_ids: dict[str, list[int]] = {}
        self._saved: dict[str, int] = {}  # blocks of each request already saved (or loaded)
        self._world_size = vllm_config.parallel_config.world_size
        self._remote: LookupClient | None = None

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a best-effort cache: a dropped save is a later miss, never a wrong answer

    # ==============================================================================================
    # scheduler side
    # ==============================================================================================
    def _stores(self) -> "StoreView | LookupClient":
        """The worker side's store in this process, or a client of every rank's lookup server."""
        worker = registry.find(self._engine_id)
        if worker is not None:
            return worker.view
        if self._remote is None:
            self._remote = LookupClient([socket_address(self._engine_id, r) for r in range(self._world_size)])
        return self._remote

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int, bool]:
        self._requests[request.request_id] = request
        bs = self._block_size
        # The last prompt token is always computed (its logits start the decode), so it is never loaded.
        limit = min((request.num_tokens - 1) // bs, len(request.block_hashes))
        start = num_computed_tokens // bs
        if num_computed_tokens % bs or limit <= start:
            return 0, False
        hashes = list(request.block_hashes[start:limit])
        found, tiers = self._stores().lookup_hashes(hashes)
        if not found:
            return 0, False
        self._plans[request.request_id] = _Plan(start, hashes[:found], tiers)
        return found * bs, True

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external_tokens: int) -> None:
        plan = self._plans.pop(request.request_id, None)
        if not num_external_tokens or plan is None:
            return  # nothing to load, or the second call once a load has finished
        count = num_external_tokens // self._block_size
        block_ids = list(blocks.get_block_ids()[0][plan.start:plan.start + count])
        assert len(block_ids) == count, (f"request {request.request_id}: {count} blocks to load into "
                                         f"{len(block_ids)} allocated")
        self._loads.append(Transfer(request.request_id, plan.hashes[:count], block_ids))
        self._hit_tiers[request.request_id] = plan.tiers[:count]
        self._saved[request.request_id] = plan.start + count  # what is loaded is in tierkv already

    def get_external_cache_hit_sources(self, request: "Request", num_external_tokens: int) -> dict:
        tiers = self._hit_tiers.pop(request.request_id, [])
        if not num_external_tokens or CacheHitSource is None:
            return {}
        bs = self._block_size
        disk = bs * sum(t == "disk" for t in tiers)
        counts = {CacheHitSource.HOST: num_external_tokens - disk, CacheHitSource.DISK: disk}
        return {source: n for source, n in counts.items() if n}

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> TierKVMetadata:
        meta = TierKVMetadata(loads=self._loads)
        self._loads = []
        stores = self._stores()
        for new in scheduler_output.scheduled_new_reqs:
            self._block_ids[new.req_id] = list(new.block_ids[0])
            self._plan_save(meta, stores, new.req_id, new.num_computed_tokens, scheduler_output)
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", None)
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            was_resumed = (req_id in resumed) if resumed is not None else cached.resumed_from_preemption[i]
            if was_resumed:  # preempted and rescheduled: a whole new list of blocks
                self._block_ids[req_id] = list(new_ids[0]) if new_ids else []
            elif new_ids:
                self._block_ids.setdefault(req_id, []).extend(new_ids[0])
            self._plan_save(meta, stores, req_id, cached.num_computed_tokens[i], scheduler_output)
        return meta

    def _plan_save(self, meta: TierKVMetadata, stores: "StoreView | LookupClient", req_id: str, computed_before: int,
                   scheduler_output: "SchedulerOutput") -> None:
        """Name the full blocks of ``req_id`` whose KV this step completes and tierkv does not hold yet."""
        request = self._requests.get(req_id)
        if request is None:
            return
        drafts = len(scheduler_output.scheduled_spec_decode_tokens.get(req_id, ()))  # may be rejected
        computed = computed_before + scheduler_output.num_scheduled_tokens.get(req_id, 0) - drafts
        block_ids = self._block_ids.get(req_id, [])
        full = min(computed // self._block_size, len(request.block_hashes), len(block_ids))
        first = self._saved.get(req_id, 0)
        if full <= first:
            return
        self._saved[req_id] = full
        hashes = list(request.block_hashes[first:full])
        todo = [(h, b) for h, b, missing in zip(hashes, block_ids[first:full], stores.missing_hashes(hashes))
                if missing]
        if todo:
            meta.saves.append(Transfer(req_id, [h for h, _ in todo], [b for _, b in todo]))

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict | None]:
        req_id = request.request_id
        for state in (self._plans, self._hit_tiers, self._requests, self._block_ids, self._saved):
            state.pop(req_id, None)
        return False, None  # saves copy their blocks out during the step: vLLM may free them now

    # ==============================================================================================
    # worker side
    # ==============================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker = _Worker.open(self._vllm_config, self._kv_cache_config, kv_caches, self._config)
        registry.publish(self._engine_id, self._worker)
        # For a scheduler in another process (tensor/pipeline parallelism, or a multiprocess executor).
        self._worker.serve(socket_address(self._engine_id, self._vllm_config.parallel_config.rank))

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.start_loads(self._get_connector_metadata().loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass  # loads are whole requests, finished before the request is scheduled

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        pass  # whole blocks are saved once the forward pass has written every layer (wait_for_save)

    def wait_for_save(self) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.save(self._get_connector_metadata().saves)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self._worker is None:
            return None, None
        return None, self._worker.finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._remote is not None:
            self._remote.close()
            self._remote = None
        if self._worker is not None:
            registry.withdraw(self._engine_id, self._worker)
            self._worker.close()
            self._worker = None


class _Worker:
    """The worker side's state: the store, vLLM's KV cache as pages, loads in flight, load errors."""

    def __init__(self, store: tierkv.BlockStore, pages: PagedKV, keyspace: Keyspace) -> None:
        self.store = store
        self.pages = pages
        self.keyspace = keyspace
        self.view = StoreView(store, keyspace)
        self._loading: dict[str, tuple[Future, list[int]]] = {}
        self._load_errors: set[int] = set()
        self._server: LookupServer | None = None

    def serve(self, address: str) -> None:
        """Answer lookups from a scheduler in another process."""
        self._server = LookupServer(self.view, address)

    @classmethod
    def open(cls, vllm_config: Any, kv_cache_config: Any, kv_caches: dict[str, torch.Tensor],
             config: tierkv.StoreConfig) -> "_Worker":
        groups = kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"expected a model with one KV cache group (full attention in every layer) for "
                             f"tierkv's connector, got {len(groups)} groups (a hybrid-attention model)")
        spec = groups[0].kv_cache_spec
        names = set(groups[0].layer_names)
        pages = PagedKV({n: t for n, t in kv_caches.items() if n in names}, num_blocks=kv_cache_config.num_blocks,
                        block_size=spec.block_size, num_kv_heads=spec.num_kv_heads, head_size=spec.head_size,
                        dtype=spec.dtype, kv_cache_layout=getattr(vllm_config.cache_config, "kv_cache_layout", None))
        keyspace = Keyspace(str(vllm_config.model_config.model), pages.layout, _tp_rank(),
                            vllm_config.parallel_config.tensor_parallel_size)
        return cls(tierkv.BlockStore(pages.layout, config), pages, keyspace)

    def start_loads(self, loads: list[Transfer]) -> None:
        for load in loads:
            self._loading[load.req_id] = (self.store.get_async(self.keyspace.keys(load.hashes)), load.block_ids)

    def finished_loads(self) -> set[str]:
        """Requests whose load is done: their blocks are written into vLLM's KV cache now, or, when the store
        could not return them (evicted since the lookup, corrupt), reported as load errors for vLLM to
        recompute."""
        done = {req_id for req_id, (future, _) in self._loading.items() if future.done()}
        for req_id in done:
            future, block_ids = self._loading.pop(req_id)
            try:
                blocks = future.result()
            except tierkv.BlockNotFound as exc:
                log.info("tierkv: load for request %s failed (%s); vLLM recomputes its %d blocks", req_id, exc,
                         len(block_ids))
                self._load_errors.update(block_ids)
                continue
            self.pages.scatter(block_ids, blocks.to(self.pages.device, non_blocking=True))
        return done

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def save(self, saves: list[Transfer]) -> None:
        for transfer in saves:
            # Copied out now, during the step: vLLM may reuse these blocks as soon as the step ends.
            self.store.put_async(self.keyspace.keys(transfer.hashes), self.pages.gather(transfer.block_ids))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.store.close()  # waits for saves and loads in flight


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        return get_tensor_model_parallel_rank()
    except (AssertionError, ImportError, AttributeError):  # no distributed group (tests, a lone scheduler)
        return 0
