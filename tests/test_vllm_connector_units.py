"""TierKVConnector's scheduler-side bookkeeping with small fakes of exactly the vLLM objects it touches
(a request, a scheduler output, the allocated blocks), and a real store behind it.

The contract tests (test_vllm_connector.py) drive vLLM's real scheduler; these pin down the arithmetic of what
is loaded and saved in cases that scheduler rarely produces on a CPU: speculative tokens, local prefix hits,
resumed requests, a prompt that is all cached.
"""
from __future__ import annotations

import uuid
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

import tierkv  # noqa: E402
from tierkv.integrations.vllm import registry  # noqa: E402
from tierkv.integrations.vllm.connector import TierKVConnector, _Worker  # noqa: E402
from tierkv.integrations.vllm.keys import Keyspace  # noqa: E402
from tierkv.integrations.vllm.settings import store_config  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402

BLOCK = 4
LAYOUT = tierkv.KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, block_tokens=BLOCK, dtype=torch.float16)


def fake_config(extra: dict | None = None) -> SimpleNamespace:
    transfer = SimpleNamespace(engine_id=f"units-{uuid.uuid4().hex[:8]}", is_kv_producer=True,
                               kv_connector_extra_config=extra if extra is not None else {"host_bytes": "1M"})
    return SimpleNamespace(kv_transfer_config=transfer, cache_config=SimpleNamespace(block_size=BLOCK),
                           parallel_config=SimpleNamespace(world_size=1, rank=0, tensor_parallel_size=1))


class Side:
    """A scheduler-side connector whose worker store (a real BlockStore) sits in the in-process registry."""

    def __init__(self) -> None:
        self.config = fake_config()
        self.connector = TierKVConnector(self.config, KVConnectorRole.SCHEDULER, None)
        self.store = tierkv.BlockStore(LAYOUT, store_config({"host_bytes": "1M"}))
        self.keyspace = Keyspace("fake", LAYOUT, 0, 1)
        self.worker = _Worker(self.store, pages=None, keyspace=self.keyspace)
        registry.publish(self.config.kv_transfer_config.engine_id, self.worker)

    def hold(self, hashes: list[bytes]) -> None:
        self.store.put(self.keyspace.keys(hashes), torch.zeros(len(hashes), *LAYOUT.block_shape, dtype=LAYOUT.dtype))

    def close(self) -> None:
        registry.withdraw(self.config.kv_transfer_config.engine_id, self.worker)
        self.store.close()


@pytest.fixture
def side():
    s = Side()
    yield s
    s.close()


def request(req_id: str, blocks: int, tail: int = 1) -> SimpleNamespace:
    return SimpleNamespace(request_id=req_id, num_tokens=blocks * BLOCK + tail,
                           block_hashes=[f"{req_id}-{i}".encode().ljust(32, b"_") for i in range(blocks)])


class Blocks:
    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def get_block_ids(self):
        return (self.ids,)


def output(new=(), cached=(), scheduled=None, drafts=None) -> SimpleNamespace:
    """A SchedulerOutput: ``new`` as (req_id, block_ids, num_computed); ``cached`` as (req_id, new_block_ids or
    None, num_computed, resumed)."""
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, block_ids=(ids,), num_computed_tokens=c) for r, ids, c in new],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=[r for r, *_ in cached], new_block_ids=[(ids,) if ids is not None else None for _, ids, _, _ in cached],
            num_computed_tokens=[c for _, _, c, _ in cached], resumed_req_ids={r for r, _, _, res in cached if res}),
        num_scheduled_tokens=scheduled or {}, scheduled_spec_decode_tokens=drafts or {})


def test_a_load_starts_after_vllms_own_hit_and_never_takes_the_last_token(side):
    req = request("a", blocks=5, tail=0)  # 20 tokens, all in full blocks
    side.hold(req.block_hashes)
    n, is_async = side.connector.get_num_new_matched_tokens(req, num_computed_tokens=2 * BLOCK)
    assert (n, is_async) == (2 * BLOCK, True), "blocks 2 and 3; block 4 holds the last token, computed by vLLM"
    side.connector.update_state_after_alloc(req, Blocks([10, 11, 12, 13, 14]), n)
    meta = side.connector.build_connector_meta(output())
    assert [(t.hashes, t.block_ids) for t in meta.loads] == [(req.block_hashes[2:4], [12, 13])]
    assert side.connector.build_connector_meta(output()).loads == [], "a load is sent once"


def test_nothing_to_load_when_vllm_already_has_it_or_tierkv_lacks_the_next_block(side):
    req = request("b", blocks=4)
    side.hold(req.block_hashes[:2] + req.block_hashes[3:])  # block 2 missing: only 0 and 1 form a prefix
    assert side.connector.get_num_new_matched_tokens(req, 2 * BLOCK) == (0, False)
    assert side.connector.get_num_new_matched_tokens(req, 0) == (2 * BLOCK, True)
    assert side.connector.get_num_new_matched_tokens(req, 3) == (0, False), "an unaligned local hit loads nothing"


def test_the_second_update_after_an_async_load_changes_nothing(side):
    req = request("c", blocks=3)
    side.hold(req.block_hashes)
    n, _ = side.connector.get_num_new_matched_tokens(req, 0)
    side.connector.update_state_after_alloc(req, Blocks([1, 2, 3]), n)
    side.connector.update_state_after_alloc(req, Blocks([1, 2, 3, 4]), 0)  # after the load, more blocks
    assert len(side.connector.build_connector_meta(output()).loads) == 1


def test_saves_name_each_completed_block_once_and_skip_speculative_tokens(side):
    req = request("d", blocks=4, tail=3)
    side.connector.get_num_new_matched_tokens(req, 0)  # registers the request; nothing cached
    # step 1: 6 prompt tokens computed: block 0 complete
    meta = side.connector.build_connector_meta(output(new=[("d", [7, 8], 0)], scheduled={"d": 6}))
    assert [(t.hashes, t.block_ids) for t in meta.saves] == [(req.block_hashes[:1], [7])]
    # step 2: 10 more tokens, 3 of them drafts that may be rejected: 13 sure tokens, blocks 1 and 2 complete
    meta = side.connector.build_connector_meta(output(cached=[("d", [9, 10], 6, False)], scheduled={"d": 10},
                                                      drafts={"d": [1, 2, 3]}))
    assert [(t.hashes, t.block_ids) for t in meta.saves] == [(req.block_hashes[1:3], [8, 9])]
    meta = side.connector.build_connector_meta(output(cached=[("d", None, 13, False)], scheduled={"d": 1}))
    assert meta.saves == [], "block 3 is not complete yet"


def test_blocks_tierkv_holds_already_are_not_saved_again(side):
    req = request("e", blocks=3)
    side.hold(req.block_hashes[:2])
    side.connector.get_num_new_matched_tokens(req, 3 * BLOCK)  # vLLM has all of it locally
    meta = side.connector.build_connector_meta(output(new=[("e", [4, 5, 6], 3 * BLOCK)], scheduled={"e": 1}))
    assert [(t.hashes, t.block_ids) for t in meta.saves] == [(req.block_hashes[2:3], [6])]


def test_a_resumed_request_saves_into_its_new_blocks(side):
    req = request("f", blocks=3)
    side.connector.get_num_new_matched_tokens(req, 0)
    side.connector.build_connector_meta(output(new=[("f", [1], 0)], scheduled={"f": 4}))  # block 0 saved
    # preempted, then resumed with a whole new block list
    meta = side.connector.build_connector_meta(output(cached=[("f", [21, 22, 23], 0, True)], scheduled={"f": 12}))
    assert [(t.hashes, t.block_ids) for t in meta.saves] == [(req.block_hashes[1:3], [22, 23])]


def test_finished_requests_leave_no_state(side):
    req = request("g", blocks=3)
    side.hold(req.block_hashes)
    n, _ = side.connector.get_num_new_matched_tokens(req, 0)
    side.connector.update_state_after_alloc(req, Blocks([1, 2, 3]), n)
    side.connector.build_connector_meta(output(new=[("g", [1, 2, 3], n)], scheduled={"g": 1}))
    assert side.connector.request_finished(req, [1, 2, 3]) == (False, None)
    c = side.connector
    assert not (c._plans or c._hit_tiers or c._requests or c._block_ids or c._saved)


def test_bad_extra_config_fails_at_start_naming_the_field():
    with pytest.raises(ValueError, match=r"unknown \['host_byte'\]"):
        TierKVConnector(fake_config({"host_byte": "1G"}), KVConnectorRole.SCHEDULER, None)
    with pytest.raises(ValueError, match="vLLM owns the GPU memory"):
        TierKVConnector(fake_config({"device_bytes": "1G"}), KVConnectorRole.SCHEDULER, None)
    with pytest.raises(ValueError, match="expected host_codec one of"):
        TierKVConnector(fake_config({"host_codec": "fp4"}), KVConnectorRole.SCHEDULER, None)
    assert TierKVConnector(fake_config(), KVConnectorRole.SCHEDULER, None).requires_kv_delivery is False
