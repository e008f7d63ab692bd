"""TierKVConnector against vLLM's real Scheduler and KV-cache allocator, on the CPU.

The scheduler loads the connector by module path, as ``vllm serve`` would; the test plays the model runner:
each step it hands the scheduler's connector metadata to a worker-side connector (built on real CPU KV tensors
from ``allocate_kv_cache``), "computes" the scheduled tokens by writing into those tensors a block content
that is a pure function of the block's hash (so any block can be checked wherever it comes from), and reports
what the worker connector says back through ``ModelRunnerOutput``.

Skipped when vllm is not importable (``make test`` installs it, see the Makefile).
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model folder is local: never ask a hub
vllm = pytest.importorskip("vllm")
# The harness builds KV caches with vLLM's allocate_kv_cache and KVCacheLayout, which arrived in vLLM 0.32.
pytest.importorskip("vllm.v1.kv_cache_layout", reason="needs vLLM >= 0.32 (allocate_kv_cache with KVCacheLayout)")

from vllm import SamplingParams  # noqa: E402
from vllm.config import (CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig,  # noqa: E402
                         VllmConfig)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheLayout  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from tierkv.integrations.vllm.connector import TierKVConnector  # noqa: E402
from vllm_compat import create_kv_cache_group_specs, get_kv_cache_config_from_groups  # noqa: E402

BLOCK = 16
LAYERS, HEADS, DIM = 2, 2, 16
NUM_BLOCKS = 48
MODEL_CONFIG = {"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": 32,
                "num_attention_heads": 2, "num_hidden_layers": LAYERS, "ffn_dim": 64, "vocab_size": 50272,
                "max_position_embeddings": 2048, "word_embed_proj_dim": 32, "do_layer_norm_before": True,
                "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2, "activation_function": "relu",
                "torch_dtype": "float16"}


class Engine:
    """vLLM's Scheduler with TierKVConnector loaded by module path, and the worker side played by the test."""

    def __init__(self, tmp_path, layout: str = "LBNHC", host_blocks: int = 64, disk_blocks: int = 0,
                 failure_policy: str = "recompute", engine_id: str = "tierkv-test", gpu_blocks: int = NUM_BLOCKS
                 ) -> None:
        model_dir = tmp_path / "model"
        model_dir.mkdir(exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(MODEL_CONFIG))
        block_nbytes = LAYERS * 2 * BLOCK * HEADS * DIM * 2
        extra = {"host_bytes": host_blocks * block_nbytes}
        if disk_blocks:
            extra.update(disk_path=str(tmp_path / "tierkv"), disk_bytes=disk_blocks * 4096)
        transfer = KVTransferConfig(kv_connector="TierKVConnector", kv_connector_module_path="tierkv.integrations.vllm",
                                    kv_role="kv_both", kv_connector_extra_config=extra, engine_id=engine_id,
                                    kv_load_failure_policy=failure_policy)
        model = ModelConfig(model=str(model_dir), tokenizer=str(model_dir), skip_tokenizer_init=True,
                            dtype="float16", seed=0)
        self.config = VllmConfig(
            scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024,
                                             enable_chunked_prefill=True, is_encoder_decoder=False),
            model_config=model, cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
            kv_transfer_config=transfer, device_config=DeviceConfig("cpu"))
        self.config.cache_config.kv_cache_layout = layout
        names = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.float16)
        groups = create_kv_cache_group_specs({n: spec for n in names}, [names])
        self.kv_cache_config = get_kv_cache_config_from_groups(self.config, groups,
                                                               gpu_blocks * spec.page_size_bytes * LAYERS)
        self.config.cache_config.num_gpu_blocks = self.kv_cache_config.num_blocks
        self.caches = allocate_kv_cache(self.kv_cache_config, torch.device("cpu"), KVCacheLayout[layout])
        self.worker = TierKVConnector(self.config, KVConnectorRole.WORKER, self.kv_cache_config)
        self.worker.register_kv_caches(self.caches)
        self.scheduler = Scheduler(vllm_config=self.config, kv_cache_config=self.kv_cache_config, log_stats=True,
                                   structured_output_manager=StructuredOutputManager(self.config), block_size=BLOCK)
        assert type(self.scheduler.connector).__name__ == "TierKVConnector"
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(BLOCK, sha256)
        self.requests: dict[str, Request] = {}
        self.invalid_reported: set[int] = set()

    @property
    def store(self):
        return self.worker._worker.store

    @property
    def pages(self):
        return self.worker._worker.pages

    def close(self) -> None:
        self.worker.shutdown()

    def add(self, req_id: str, tokens: list[int], max_tokens: int = 2) -> Request:
        params = SamplingParams(max_tokens=max_tokens)
        params.update_from_generation_config({}, 2)
        request = Request(request_id=req_id, prompt_token_ids=tokens, sampling_params=params, pooling_params=None,
                          mm_features=None, block_hasher=self.hasher)
        self.requests[req_id] = request
        self.scheduler.add_request(request)
        return request

    def step(self, before_worker=None):
        """One engine step: schedule, run the worker connector around a simulated forward pass, report back.
        ``before_worker(out)`` runs between the scheduler and the worker."""
        out = self.scheduler.schedule()
        if before_worker is not None:
            before_worker(out)
        self.worker.bind_connector_metadata(out.kv_connector_metadata)
        self.worker.start_load_kv(None)
        self._compute(out)
        self.worker.wait_for_save()
        # A real model runner would go on stepping until the loads land; the harness waits for the store's lanes
        # so that every run takes the same path (the request is still parked: the scheduler hears of the load
        # only through this step's output).
        self.store.drain()
        _, recving = self.worker.get_finished(out.finished_req_ids)
        invalid = self.worker.get_block_ids_with_load_errors()
        self.invalid_reported |= invalid
        self.worker.clear_connector_metadata()
        reqs = [r.req_id for r in out.scheduled_new_reqs] + list(out.scheduled_cached_reqs.req_ids)
        output = ModelRunnerOutput(req_ids=reqs, req_id_to_index={r: i for i, r in enumerate(reqs)},
                                   sampled_token_ids=[[7] for _ in reqs], logprobs=None, prompt_logprobs_dict={},
                                   pooler_output=None,
                                   kv_connector_output=KVConnectorOutput(finished_recving=recving,
                                                                         invalid_block_ids=invalid))
        self.scheduler.update_from_output(out, output)
        return out

    def run(self, steps: int = 40) -> list:
        outs = []
        for _ in range(steps):
            outs.append(self.step())
            if not self.scheduler.has_unfinished_requests():
                break
        return outs

    def _compute(self, out) -> None:
        """Write each full block the step computes as ``expected_block(hash)``: a stand-in for attention's KV."""
        new = {r.req_id: (r.num_computed_tokens, list(r.block_ids[0])) for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new[req_id] = (cached.num_computed_tokens[i], None)
        for req_id, (computed, _) in new.items():
            request = self.requests[req_id]
            ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0]
            done = computed + out.num_scheduled_tokens[req_id]
            first, last = computed // BLOCK, min(done // BLOCK, len(request.block_hashes))
            if last > first:
                self.pages.scatter(ids[first:last], torch.stack([self.expected_block(h)
                                                                 for h in request.block_hashes[first:last]]))

    def expected_block(self, block_hash: bytes) -> torch.Tensor:
        seed = int.from_bytes(hashlib.blake2b(bytes(block_hash), digest_size=8).digest(), "little") >> 1
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.pages.layout.block_shape, generator=g).to(torch.float16)

    def run_until_scheduled(self, req_id: str, steps: int = 20):
        """Steps until the scheduler runs ``req_id`` (its load, if any, has finished); returns that step."""
        for _ in range(steps):
            self.store.drain()
            out = self.step()
            if req_id in out.num_scheduled_tokens:
                return out
        raise AssertionError(f"{req_id} was never scheduled")

    def blocks_of(self, req_id: str, count: int) -> torch.Tensor:
        ids = self.scheduler.kv_cache_manager.get_block_ids(req_id)[0][:count]
        return self.pages.gather(ids)

    def assert_holds(self, req_id: str, count: int) -> None:
        """vLLM's KV cache holds the right bytes in the first ``count`` blocks of ``req_id``."""
        got = self.blocks_of(req_id, count)
        for i, h in enumerate(self.requests[req_id].block_hashes[:count]):
            assert torch.equal(got[i].view(torch.int16), self.expected_block(h).view(torch.int16)), f"block {i}"


def prompt(seed: int, blocks: int, tail: int = 5) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 50000, (blocks * BLOCK + tail,), generator=g).tolist()


@pytest.fixture
def engine(tmp_path):
    e = Engine(tmp_path, host_blocks=64)
    yield e
    e.close()


def test_computed_blocks_are_saved_under_keys_from_vllms_block_hashes(engine):
    request = engine.add("a", prompt(1, 4))
    engine.run()
    keys = engine.worker._worker.keyspace.keys(request.block_hashes[:4])
    assert engine.store.lookup(keys) == 4
    got = engine.store.get(keys)
    for i, h in enumerate(request.block_hashes[:4]):
        assert torch.equal(got[i].view(torch.int16), engine.expected_block(h).view(torch.int16))


def test_a_prompt_vllm_forgot_is_loaded_asynchronously_then_runs_with_the_loaded_tokens(engine):
    tokens = prompt(2, 4)
    engine.add("a", tokens)
    engine.run()
    assert engine.scheduler.reset_prefix_cache(), "vLLM's own prefix cache could not be emptied"
    request = engine.add("b", tokens)
    out = engine.step()
    # The scheduler asked the connector, allocated blocks for 4 blocks of external tokens, and parks the request.
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert [t.req_id for t in out.kv_connector_metadata.loads] == ["b"]
    load = out.kv_connector_metadata.loads[0]
    assert len(load.block_ids) == 4
    out = engine.run_until_scheduled("b")  # the load lane finishes; a later step reports it; the request runs
    assert out.num_scheduled_tokens["b"] == len(tokens) - 4 * BLOCK, "the loaded tokens count as computed"
    engine.assert_holds("b", 4)
    engine.run()
    assert not engine.scheduler.has_unfinished_requests()


@pytest.mark.parametrize("layout", [layout.name for layout in KVCacheLayout])
def test_save_evict_to_disk_load_round_trip_is_byte_exact_for_every_layout(tmp_path, layout):
    engine = Engine(tmp_path, layout=layout, host_blocks=2, disk_blocks=64)  # the host holds 2: the rest on disk
    try:
        tokens = prompt(3, 5)
        engine.add("a", tokens)
        engine.run()
        engine.store.drain()
        assert engine.store.stats().tiers["disk"].used_blocks >= 3
        assert engine.scheduler.reset_prefix_cache()
        engine.add("b", tokens)
        out = engine.run_until_scheduled("b")
        assert out.num_scheduled_tokens["b"] == len(tokens) - 5 * BLOCK
        engine.assert_holds("b", 5)
        assert engine.store.stats().tiers["disk"].hits >= 3
    finally:
        engine.close()


def test_hits_are_reported_by_tier(tmp_path):
    engine = Engine(tmp_path, host_blocks=2, disk_blocks=64)
    try:
        tokens = prompt(4, 5)
        engine.add("a", tokens)
        engine.run()
        engine.store.drain()
        assert engine.scheduler.reset_prefix_cache()
        connector = engine.scheduler.connector
        request = engine.add("b", tokens)
        n, is_async = connector.get_num_new_matched_tokens(request, 0)
        assert (n, is_async) == (5 * BLOCK, True)
        tiers = engine.store.locate(engine.worker._worker.keyspace.keys(request.block_hashes[:5]))
        assert tiers.count("disk") >= 3 and set(tiers) <= {"host", "disk"}

        class Blocks:
            def get_block_ids(self):
                return (list(range(1, 6)),)

        connector.update_state_after_alloc(request, Blocks(), n)
        sources = connector.get_external_cache_hit_sources(request, n)
        assert {s.value: c for s, c in sources.items()} == {
            k: v for k, v in {"host": BLOCK * tiers.count("host"), "disk": BLOCK * tiers.count("disk")}.items() if v}
    finally:
        engine.close()


def test_a_failed_load_is_reported_and_vllm_recomputes_those_blocks(engine):
    tokens = prompt(5, 4)
    engine.add("a", tokens)
    engine.run()
    engine.store.drain()
    assert engine.scheduler.reset_prefix_cache()
    request = engine.add("b", tokens)

    def lose_blocks(out):  # between the lookup and the load they disappear (evicted, or corrupt on disk)
        assert engine.store.delete(engine.worker._worker.keyspace.keys(out.kv_connector_metadata.loads[0].hashes)) == 4

    out = engine.step(before_worker=lose_blocks)
    load = out.kv_connector_metadata.loads[0]
    engine.run()
    assert set(load.block_ids) <= engine.invalid_reported
    assert not engine.scheduler.has_unfinished_requests()
    assert request.num_output_tokens >= 1, "the request recomputed its prompt and produced output"


def test_a_request_aborted_while_loading_leaks_nothing(engine):
    tokens = prompt(6, 4)
    engine.add("a", tokens)
    engine.run()
    assert engine.scheduler.reset_prefix_cache()
    engine.add("b", tokens)
    engine.step()
    engine.scheduler.finish_requests("b", RequestStatus.FINISHED_ABORTED)
    engine.store.drain()
    for _ in range(5):
        engine.step()
    free = engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    assert free == engine.kv_cache_config.num_blocks - 1, "blocks of the aborted request were not freed"
    connector = engine.scheduler.connector
    assert not connector._requests and not connector._block_ids and not connector._saved


def test_preempted_requests_resume_and_finish_with_nothing_leaked(tmp_path):
    """Few GPU blocks and long decodes: the scheduler preempts running requests and resumes them later; their
    saved blocks stay in tierkv (a resumed request can load them back), every GPU block is freed in the end and
    the connector keeps no state for finished requests."""
    engine = Engine(tmp_path, gpu_blocks=14)
    try:
        for i in range(3):
            engine.add(f"r{i}", prompt(10 + i, 3, tail=3), max_tokens=40)
        preempted = set()
        for _ in range(400):
            out = engine.step()
            preempted |= set(out.preempted_req_ids or ())
            if not engine.scheduler.has_unfinished_requests():
                break
        assert preempted, "the test never made the scheduler preempt a request"
        assert not engine.scheduler.has_unfinished_requests()
        assert engine.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == engine.kv_cache_config.num_blocks - 1
        connector = engine.scheduler.connector
        assert not (connector._requests or connector._block_ids or connector._saved or connector._plans
                    or connector._hit_tiers), "state left behind for finished requests"
        assert not engine.worker._worker._loading
        for i in range(3):  # the prompts' blocks were saved, keyed by vLLM's hashes
            keys = engine.worker._worker.keyspace.keys(engine.requests[f"r{i}"].block_hashes[:3])
            assert engine.store.lookup(keys) == 3
    finally:
        engine.close()


def test_a_scheduler_without_the_worker_in_its_process_asks_through_the_lookup_socket(tmp_path):
    """As with tensor parallelism: the scheduler's process has no worker, so the connector asks each rank's lookup
    server (here rank 0's, served by the worker over a real ipc socket) and loads what it reports."""
    import uuid

    from tierkv.integrations.vllm import registry
    from tierkv.integrations.vllm.lookup import LookupClient

    engine = Engine(tmp_path, engine_id=f"tierkv-remote-{uuid.uuid4().hex[:8]}")
    try:
        registry.withdraw(engine.config.kv_transfer_config.engine_id, engine.worker._worker)
        tokens = prompt(7, 4)
        engine.add("a", tokens)
        engine.run()
        engine.store.drain()
        assert isinstance(engine.scheduler.connector._remote, LookupClient)
        keys = engine.worker._worker.keyspace.keys(engine.requests["a"].block_hashes[:4])
        assert engine.store.lookup(keys) == 4, "saves were planned through the socket too"
        assert engine.scheduler.reset_prefix_cache()
        engine.add("b", tokens)
        out = engine.run_until_scheduled("b")
        assert out.num_scheduled_tokens["b"] == len(tokens) - 4 * BLOCK
        engine.assert_holds("b", 4)
    finally:
        engine.scheduler.connector.shutdown()
        engine.close()
