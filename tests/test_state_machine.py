"""A Hypothesis state machine: the store against a dict model, with tiers small enough to evict all the time.

Device 2 blocks, host 3, disk 4 (and two variations at the end). Eviction off the last tier is legal, so the model cannot demand that a block
is present; it demands that

- whatever ``get`` returns is exactly what ``put`` stored (a re-put of a stored key keeps the first bytes),
- ``lookup``, ``in`` and ``get`` agree, and the keys of the last ``put`` are all retrievable right after it,
- deleted keys stay absent, across restarts too,
- ``flush`` copies (a block resident in memory stays retrievable), never makes a block appear, and puts every
  resident block on disk when they all fit there,
- a restart (close + a new store on the same directory) starts with empty memory tiers and finds every block
  that was resident when they all fit on disk, because ``close`` persists,
- after every step the manager's bookkeeping holds (see ``conftest.check_invariants``).
"""
from __future__ import annotations

import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import tierkv
from tierkv.codec import make_codec
from conftest import assert_bit_equal, check_invariants, make_blocks, make_keys, round_up, tiny_layout

LAYOUT = tiny_layout()
PROMPTS = [make_keys(6, seed=700 + p, layout=LAYOUT) for p in range(3)]
ALL_KEYS = [k for p in PROMPTS for k in p]
CAPACITY = dict(device=2, host=3, disk=4)  # in blocks; 0 disables a memory tier


def block(key: bytes, variant: int):
    """The bytes a test puts under ``key``; variant 0 is the key's canonical content."""
    seed = (int.from_bytes(key[:7], "little") << 3) | variant
    return make_blocks(1, LAYOUT, seed=seed)[0]


prompt_index = st.integers(0, len(PROMPTS) - 1)
start_index = st.integers(0, len(PROMPTS[0]) - 1)
chain_length = st.integers(1, 4)


class StoreModel(RuleBasedStateMachine):
    capacity = CAPACITY
    host_codec = disk_codec = "none"
    policy = "lru"
    fresh_blocks_win = True  # LRU: the blocks a put just stored are the most valuable ones

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tierkv-state-")
        host_slot = round_up(make_codec(self.host_codec, LAYOUT).nbytes, 64 if self.host_codec != "none" else 1)
        disk_slot = round_up(make_codec(self.disk_codec, LAYOUT).nbytes)
        self.config = tierkv.StoreConfig(device_bytes=self.capacity["device"] * LAYOUT.block_nbytes,
                                         host_bytes=self.capacity["host"] * host_slot, disk_path=self.dir,
                                         disk_bytes=self.capacity["disk"] * disk_slot,
                                         host_codec=self.host_codec, disk_codec=self.disk_codec,
                                         policy=self.policy)
        self.store = tierkv.BlockStore(LAYOUT, self.config)
        self.expected: dict = {}  # key -> the block the store must return for it, when it has it
        self.deleted: set = set()  # keys deleted and not put since

    def teardown(self):
        try:
            self.store.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------------------
    def make_block(self, key: bytes, variant: int) -> torch.Tensor:
        return block(key, variant)

    def assert_block(self, got: torch.Tensor, want: torch.Tensor, what: str = "blocks") -> None:
        assert_bit_equal(got, want, what)

    def reference(self) -> dict | None:
        """What raw copies must hold, for check_invariants."""
        return self.expected

    def present(self) -> set:
        return {k for k in ALL_KEYS if k in self.store}

    def disk_capacity(self) -> int:
        return self.store.stats().tiers["disk"].capacity_blocks

    def disk_holders(self) -> set:
        holders = check_invariants(self.store, self.reference())
        return {k for k, tiers in holders.items() if "disk" in tiers}

    # -- rules --------------------------------------------------------------------------------------------
    @rule(p=prompt_index, start=start_index, length=chain_length)
    def put_chain(self, p, start, length):
        chain = PROMPTS[p][start:start + length]
        blocks = [self.expected.get(k, self.make_block(k, 0)) for k in chain]  # never conflicting bytes in a chain
        self.store.put(chain, torch.stack(blocks))
        for k, b in zip(chain, blocks):
            self.expected[k] = b
            self.deleted.discard(k)
        if self.fresh_blocks_win:
            assert self.store.lookup(chain) == len(chain), "the blocks just put are the most valuable ones"

    @rule(p=prompt_index, start=start_index, variant=st.integers(1, 3))
    def put_other_bytes_under_one_key(self, p, start, variant):
        key = PROMPTS[p][start]
        stored = key in self.store
        self.store.put([key], self.make_block(key, variant).unsqueeze(0))
        if not stored:  # a new block; a stored one keeps its first bytes
            self.expected[key] = self.make_block(key, variant)
            self.deleted.discard(key)
        if self.fresh_blocks_win or key in self.store:
            assert key in self.store
            self.assert_block(self.store.get([key])[0], self.expected[key], "re-put key")

    @rule(p=prompt_index, start=start_index, length=chain_length)
    def get_chain(self, p, start, length):
        chain = PROMPTS[p][start:start + length]
        contained = [k in self.store for k in chain]
        n = self.store.lookup(chain)
        assert n == (contained.index(False) if False in contained else len(chain)), (
            f"lookup {n} disagrees with `in` {contained}")
        orphaned = self.store.stats().orphaned
        out = self.store.get(chain[:n])
        for i, k in enumerate(chain[:n]):
            self.assert_block(out[i], self.expected[k], f"key {i} of the chain")
        if n < len(chain):
            # Relevance frees orphans: promoting what the get above returned can push a block's prefix off the last
            # tier, and a block of this chain with it (counted in stats().orphaned). The error then names the first
            # key missing now; without an orphan freed, that must be chain[n].
            first_missing = next(k for k in chain if k not in self.store)
            orphans_freed = self.store.stats().orphaned > orphaned
            assert first_missing == chain[n] or (self.policy == "relevance" and orphans_freed), (
                f"key {chain.index(first_missing)} of the chain went missing, no orphan freed")
            with pytest.raises(tierkv.BlockNotFound) as info:
                self.store.get(chain)
            assert first_missing.hex() in str(info.value)

    @rule(p=prompt_index, start=start_index)
    def get_one(self, p, start):
        key = PROMPTS[p][start]
        if key in self.store:
            self.assert_block(self.store.get([key])[0], self.expected[key])
        else:
            with pytest.raises(tierkv.BlockNotFound):
                self.store.get([key])

    @rule(p=prompt_index, start=start_index, length=chain_length)
    def delete_chain(self, p, start, length):
        chain = PROMPTS[p][start:start + length]
        self.store.delete(chain)
        self.deleted.update(chain)
        assert not any(k in self.store for k in chain)
        assert self.store.lookup(chain) == 0

    @rule(put=st.tuples(prompt_index, start_index, chain_length), get=st.tuples(prompt_index, start_index, chain_length),
          prefetch=st.tuples(prompt_index, start_index, chain_length))
    def async_burst(self, put, get, prefetch):
        """A put_async, a get_async and a prefetch in flight together (two lanes plus write-behind), then
        settled: the put stored its chain, the get returned the stored bytes or a miss, nothing else changed."""
        chains = [PROMPTS[p][s:s + n] for p, s, n in (put, get, prefetch)]
        put_chain, get_chain, prefetch_chain = chains
        blocks = [self.expected.get(k, self.make_block(k, 0)) for k in put_chain]
        present = {k for k in ALL_KEYS if k in self.store}
        known = present | set(put_chain)
        futures = (self.store.put_async(put_chain, torch.stack(blocks)), self.store.get_async(get_chain),
                   self.store.prefetch(prefetch_chain))
        for k, b in zip(put_chain, blocks):
            self.expected[k] = b
            self.deleted.discard(k)
        # New blocks: at least those absent before (nobody else stores them), at most the whole chain (the
        # loads may push present ones out first).
        assert len(set(put_chain) - present) <= futures[0].result(30) <= len(put_chain)
        try:
            out = futures[1].result(30)
            for i, k in enumerate(get_chain):
                self.assert_block(out[i], self.expected[k], f"async key {i}")
        except tierkv.BlockNotFound as exc:
            assert any(k.hex() in str(exc) for k in get_chain)
        assert 0 <= futures[2].result(30) <= len(set(prefetch_chain))
        assert {k for k in ALL_KEYS if k in self.store} <= known, "a block appeared that nobody put"

    @rule()
    def flush(self):
        before = self.present()
        in_memory = {k for k, tiers in check_invariants(self.store, self.reference()).items()
                     if set(tiers) - {"disk"}}
        self.store.flush()
        after = self.present()
        assert after <= before, "flush made a block appear"
        assert in_memory <= after, "flush copies: a block resident in memory must stay retrievable"
        if len(before) <= self.disk_capacity():
            on_disk = self.disk_holders()
            assert before <= on_disk, f"{len(before - on_disk)} resident blocks did not reach disk on flush"

    @rule(flush_first=st.booleans())
    def restart(self, flush_first):
        if flush_first:
            self.store.flush()
        before = self.present()
        fits = len(before) <= self.disk_capacity()
        self.store.close()
        self.store = tierkv.BlockStore(LAYOUT, self.config)
        after = self.present()
        assert not (after & self.deleted), "a deleted block came back after a restart"
        if fits:
            assert before <= after, f"{len(before - after)} blocks were lost in a restart"
        stats = self.store.stats()
        assert all(t.used_blocks == 0 for name, t in stats.tiers.items() if name != "disk"), (
            "memory tiers start empty")

    # -- invariants ---------------------------------------------------------------------------------------
    @invariant()
    def bookkeeping_holds(self):
        check_invariants(self.store, self.reference())

    @invariant()
    def deleted_and_unknown_keys_are_absent(self):
        for k in ALL_KEYS:
            if k in self.deleted or k not in self.expected:
                assert k not in self.store, f"{k.hex()} should be absent"


class HostAndSmallDiskModel(StoreModel):
    """No device tier, and a disk smaller than the memory above it: flush and close cannot keep everything."""

    capacity = dict(device=0, host=3, disk=2)


class BigDiskModel(StoreModel):
    """A disk that holds every key of the model: nothing ever falls off, so restarts must find everything."""

    capacity = dict(device=1, host=2, disk=len(ALL_KEYS))


class LossyModel(StoreModel):
    """fp8 host and disk tiers: blocks come back within the fp8 error bound, and encoded copies agree."""

    host_codec = disk_codec = "fp8"

    def make_block(self, key: bytes, variant: int) -> torch.Tensor:
        seed = (int.from_bytes(key[:7], "little") << 3) | variant
        g = torch.Generator().manual_seed(seed)
        return torch.randn(LAYOUT.block_shape, generator=g).to(LAYOUT.dtype)

    def assert_block(self, got: torch.Tensor, want: torch.Tensor, what: str = "blocks") -> None:
        error = float((got.double() - want.double()).norm() / want.double().norm())
        assert error <= 0.04, f"{what}: relative RMS error {error:.4f} above the fp8 bound"

    def reference(self) -> dict | None:
        return None  # a raw copy may hold a dequantized block: only copies of one codec must agree


class RelevanceModel(StoreModel):
    """The relevance policy on the default tiers: the same contract, with prefix chains and orphan freeing,
    except that a block reused often may outrank one just put."""

    policy = "relevance"
    fresh_blocks_win = False


_settings = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
StoreModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, **_settings)
HostAndSmallDiskModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, **_settings)
BigDiskModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, **_settings)
TestStoreModel = StoreModel.TestCase
TestHostAndSmallDiskModel = HostAndSmallDiskModel.TestCase
LossyModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, **_settings)
TestBigDiskModel = BigDiskModel.TestCase
TestLossyModel = LossyModel.TestCase
RelevanceModel.TestCase.settings = settings(max_examples=80, stateful_step_count=30, **_settings)
TestRelevanceModel = RelevanceModel.TestCase
