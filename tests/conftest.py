"""Shared fixtures for the tierkv contract tests.

Everything here is written against the public contract (docs: ARCHITECTURE.md, "Public API"). Blocks are tiny
(a few KiB) so the whole suite runs in well under a minute on a 2-core CPU machine; the disk tier rounds each
block up to a 4096-byte page, so small blocks cost nothing extra there.

Helpers that test modules import directly (``from conftest import make_blocks``) live at module level; the
fixtures below wrap them for tests that prefer injection.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pytest
import torch

import tierkv

PAGE = 4096

# A block of this layout is 2 layers * 2 (K, V) * 4 tokens * 2 heads * 16 dims * 2 bytes = 1 KiB at bf16.
TINY = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=4)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]



def gpu(test):
    """Mark a test as needing CUDA (``-m gpu`` selects it) and skip it where there is none."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))



# ---------------------------------------------------------------------------------------------------------------
# plain helpers


def round_up(n: int, multiple: int = PAGE) -> int:
    return (n + multiple - 1) // multiple * multiple


def tiny_layout(dtype: torch.dtype = torch.bfloat16, **overrides) -> tierkv.KVLayout:
    return tierkv.KVLayout(**{**TINY, **overrides}, dtype=dtype)


def off_page(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose data starts 64 bytes past a page boundary. A put writes such blocks to the disk
    tier one request per block; page-aligned whole-slot blocks go out as one vectored request per run instead,
    which a test counting failed requests must not get by the chance of where the allocator put ``t``."""
    nbytes = t.numel() * t.element_size()
    base = torch.empty(nbytes + 2 * PAGE, dtype=torch.uint8)
    start = (-base.data_ptr()) % PAGE + 64
    out = base[start:start + nbytes].view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def make_blocks(n: int, layout: tierkv.KVLayout, seed: int = 0) -> torch.Tensor:
    """``n`` random blocks ``[n, *layout.block_shape]`` of ``layout.dtype``, from random *bits*.

    Random bits include NaN/Inf patterns for float dtypes; with codec "none" the store is bit-exact, so compare
    with :func:`assert_bit_equal`, never with float ``==``.
    """
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, layout.block_nbytes), dtype=torch.uint8, generator=g)
    return raw.view(layout.dtype).reshape(n, *layout.block_shape)


def block_for_key(key: bytes, layout: tierkv.KVLayout) -> torch.Tensor:
    """One block ``[*layout.block_shape]`` whose bits are a pure function of ``key``.

    Any thread, or a model of the store, can recompute what must be stored under a key.
    """
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return make_blocks(1, layout, seed)[0]


def blocks_for_keys(keys: Sequence[bytes], layout: tierkv.KVLayout) -> torch.Tensor:
    if not keys:
        return torch.empty((0, *layout.block_shape), dtype=layout.dtype)
    return torch.stack([block_for_key(k, layout) for k in keys])


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor as a flat uint8 CPU tensor."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(as_bytes(a), as_bytes(b))


def assert_bit_equal(got: torch.Tensor, expected: torch.Tensor, what: str = "blocks") -> None:
    assert got.dtype == expected.dtype, f"{what}: expected dtype {expected.dtype}, got {got.dtype}"
    assert tuple(got.shape) == tuple(expected.shape), (
        f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    gb, eb = as_bytes(got), as_bytes(expected)
    if not torch.equal(gb, eb):
        diff = (gb != eb).nonzero().flatten()
        raise AssertionError(f"{what}: {diff.numel()} of {eb.numel()} bytes differ, first at byte "
                             f"{int(diff[0])}")


def make_keys(n: int, seed: int = 0, layout: tierkv.KVLayout | None = None, salt: bytes = b"") -> list[bytes]:
    """``n`` chained keys of one random prompt (what an engine would pass to ``put``)."""
    bt = (layout or tiny_layout()).block_tokens
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n * bt,), dtype=torch.int64, generator=g)
    keys = tierkv.block_keys(tokens, block_tokens=bt, salt=salt)
    assert len(keys) == n
    return keys


def settle(store: tierkv.BlockStore) -> None:
    """Wait until the blocks the store is writing to disk in the background (write-behind) have landed, so that
    disk counters and files show them. ``get`` never needs this: it waits for a block in flight by itself."""
    store.drain()


def tier_stats(store: tierkv.BlockStore) -> dict[str, tierkv.TierStats]:
    return dict(store.stats().tiers)


def used_blocks(store: tierkv.BlockStore) -> dict[str, int]:
    return {name: t.used_blocks for name, t in store.stats().tiers.items()}


def data_files(disk_path: str | os.PathLike) -> list[Path]:
    """Every regular file under ``disk_path`` whose name ends in ".data" (the data file(s) of the disk tier)."""
    return sorted(p for p in Path(disk_path).rglob("*.data") if p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# tier combinations


@dataclass
class TierSetup:
    """One tier combination. Capacities are given in *blocks* and converted to bytes for the layout."""

    name: str
    tiers: tuple[str, ...]  # enabled tiers, top first
    disk_dir: Path
    layout: tierkv.KVLayout
    extra: dict = field(default_factory=dict)

    @property
    def has_disk(self) -> bool:
        return "disk" in self.tiers

    @property
    def top(self) -> str:
        return self.tiers[0]

    def config(self, device: int = 64, host: int = 64, disk: int = 64, **kw) -> tierkv.StoreConfig:
        """A StoreConfig for this combination; ``device``/``host``/``disk`` are capacities in blocks and count
        only where the tier is enabled."""
        nbytes = self.layout.block_nbytes
        args: dict = dict(
            device_bytes=device * nbytes if "device" in self.tiers else 0,
            host_bytes=host * nbytes if "host" in self.tiers else 0,
        )
        if self.has_disk:
            self.disk_dir.mkdir(parents=True, exist_ok=True)
            args.update(disk_path=str(self.disk_dir), disk_bytes=disk * round_up(nbytes))
        args.update(self.extra)
        args.update(kw)
        return tierkv.StoreConfig(**args)

    def capacities(self, device: int, host: int, disk: int) -> dict[str, int]:
        wanted = {"device": device, "host": host, "disk": disk}
        return {t: wanted[t] for t in self.tiers}

    def open(self, layout: tierkv.KVLayout | None = None, **capacities) -> tierkv.BlockStore:
        return tierkv.BlockStore(layout or self.layout, self.config(**capacities))


TIER_COMBOS = {
    "device": ("device",),
    "device+host": ("device", "host"),
    "device+host+disk": ("device", "host", "disk"),
    "host+disk": ("host", "disk"),
}


def make_tier_setup(name: str, tmp_path: Path, layout: tierkv.KVLayout | None = None) -> TierSetup:
    return TierSetup(name=name, tiers=TIER_COMBOS[name], disk_dir=tmp_path / "tierkv-disk",
                     layout=layout or tiny_layout())


# ---------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def layout() -> tierkv.KVLayout:
    """The tiny bf16 layout (1 KiB blocks)."""
    return tiny_layout()


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def layout_any_dtype(request) -> tierkv.KVLayout:
    """The tiny layout at every block dtype the contract names."""
    return tiny_layout(request.param)


@pytest.fixture(params=list(TIER_COMBOS), ids=list(TIER_COMBOS))
def tier_config(request, tmp_path, layout) -> TierSetup:
    """Each of the four tier combinations, the disk tier (where enabled) under ``tmp_path``."""
    return make_tier_setup(request.param, tmp_path, layout)


@pytest.fixture(params=["device+host+disk", "host+disk"])
def disk_config(request, tmp_path, layout) -> TierSetup:
    """The tier combinations that have a disk tier."""
    return make_tier_setup(request.param, tmp_path, layout)


@pytest.fixture
def store(tier_config):
    """An open store with room for 64 blocks in every enabled tier."""
    s = tier_config.open()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(name="make_blocks")
def _make_blocks_fixture():
    return make_blocks


@pytest.fixture(name="assert_bit_equal")
def _assert_bit_equal_fixture():
    return assert_bit_equal


# ---------------------------------------------------------------------------------------------------------------
# invariants, through the manager's introspection API (store._manager.snapshot() / read_copy())

COPY_STATES = {"ready", "writing", "evicting"}


def check_invariants(store: tierkv.BlockStore, expected: dict[bytes, torch.Tensor] | None = None,
                     idle: bool = True) -> dict:
    """Check the store's bookkeeping; return ``{key: [tier names holding a copy]}``.

    - per tier: used + free == capacity, used == copies in that tier, stats().used_blocks agrees;
    - no two copies share a (tier, slot); slots lie inside the tier;
    - when idle (write-behind drained first) every copy is "ready", and a key with a copy is ``in`` the store;
    - every copy of a key in tiers of one codec holds the same bytes; copies stored raw (codec "none") equal
      ``expected[key]`` where given, and encoded copies carry their codec's header.
    """
    manager = store._manager
    if idle:
        manager.drain()  # idle means no write-behind in flight either
    snap = manager.snapshot()
    stats = store.stats()
    tiers = {t.name: t for t in snap.tiers}
    assert list(tiers) == [n for n in ("device", "host", "disk") if n in tiers], f"tier order {list(tiers)}"
    assert set(tiers) == set(stats.tiers), f"snapshot tiers {set(tiers)} != stats tiers {set(stats.tiers)}"
    in_tier: dict[str, int] = {name: 0 for name in tiers}
    slots_seen: set[tuple[str, int]] = set()
    holders: dict[bytes, list[str]] = {}
    for key, copies in snap.copies.items():
        assert isinstance(key, bytes) and len(key) == 16, f"bad key {key!r}"
        names = []
        for tier_name, slot, copy_state in copies:
            assert tier_name in tiers, f"{key.hex()}: copy in unknown tier {tier_name!r}"
            assert copy_state in COPY_STATES, f"{key.hex()}: state {copy_state!r}"
            if idle:
                assert copy_state == "ready", f"{key.hex()}: {copy_state} copy in {tier_name} while idle"
            assert 0 <= slot < tiers[tier_name].capacity_slots, f"{key.hex()}: slot {slot} outside {tier_name}"
            assert (tier_name, slot) not in slots_seen, f"{key.hex()}: {tier_name} slot {slot} is shared"
            slots_seen.add((tier_name, slot))
            assert tier_name not in names, f"{key.hex()}: two copies in {tier_name}"
            names.append(tier_name)
            in_tier[tier_name] += 1
        if not names:
            continue
        holders[key] = names
        if idle:
            assert key in store, f"{key.hex()} has copies in {names} but is not `in` the store"
            codecs = {t.name: t.codec for t in manager.tiers}
            want: dict[str, torch.Tensor] = {}
            if expected is not None and key in expected:
                want["none"] = as_bytes(expected[key])
            for name in names:
                codec = codecs[name]
                got = manager.read_copy(key, name)
                got = got.detach().cpu().reshape(-1).view(torch.uint8)
                if codec.lossy:
                    header = torch.frombuffer(bytearray(codec.format.header()), dtype=torch.uint8)
                    assert torch.equal(got[:header.numel()], header), f"{key.hex()}: {name} copy has a bad header"
                ref = want.setdefault(codec.name, got)
                n = ref.numel()
                assert got.numel() >= n, f"{key.hex()}: {name} copy has {got.numel()} bytes, expected {n}"
                assert torch.equal(got[:n], ref), f"{key.hex()}: the {name} copy holds other bytes"
    for name, t in tiers.items():
        assert t.used_slots + t.free_slots == t.capacity_slots, (
            f"{name}: used {t.used_slots} + free {t.free_slots} != capacity {t.capacity_slots}")
        assert t.used_slots == in_tier[name], f"{name}: used_slots {t.used_slots}, copies {in_tier[name]}"
        assert stats.tiers[name].used_blocks == t.used_slots, (
            f"{name}: stats used_blocks {stats.tiers[name].used_blocks}, snapshot used {t.used_slots}")
        assert stats.tiers[name].capacity_blocks == t.capacity_slots
    return holders
