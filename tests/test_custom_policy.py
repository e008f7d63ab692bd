"""Custom eviction policies load from a dotted path in the config (``policy="package.module:ClassName"``)."""
from __future__ import annotations

from typing import Callable

import pytest

import tierkv
from conftest import check_invariants, make_blocks, make_keys, make_tier_setup
from tierkv.policy import EvictionPolicy


class MostRecentFirst(EvictionPolicy):
    """The opposite of LRU (evicts the newest block), so a test can tell which policy ran."""

    instances = 0

    def __init__(self) -> None:
        type(self).instances += 1
        self._stamps: dict[bytes, int] = {}

    def insert(self, key: bytes, stamp: int) -> None:
        self._stamps[key] = stamp

    def touch(self, key: bytes, stamp: int) -> None:
        if key in self._stamps:
            self._stamps[key] = stamp

    def remove(self, key: bytes) -> None:
        self._stamps.pop(key, None)

    def evict(self, n: int, protected: Callable[[bytes], bool], newer_than: int | None = None
              ) -> list[bytes] | None:
        candidates = sorted((k for k in self._stamps if not protected(k)), key=self._stamps.get, reverse=True)
        if len(candidates) < n:
            return None
        for key in candidates[:n]:
            del self._stamps[key]
        return candidates[:n]

    def __len__(self) -> int:
        return len(self._stamps)

    def __contains__(self, key: bytes) -> bool:
        return key in self._stamps


class NotAPolicy:
    pass


@pytest.mark.parametrize("path", ["test_custom_policy:MostRecentFirst", "test_custom_policy.MostRecentFirst"])
def test_a_policy_named_by_dotted_path_orders_eviction(tmp_path, layout, path):
    """A device-only store of 3 blocks under the custom policy: the fourth put evicts the newest block, not the
    oldest as LRU would."""
    MostRecentFirst.instances = 0
    setup = make_tier_setup("device", tmp_path, layout)
    keys = make_keys(4, seed=81)
    blocks = make_blocks(4, layout, seed=82)
    with setup.open(device=3, policy=path) as store:
        assert MostRecentFirst.instances == 1, "one policy instance per tier"
        for i in range(4):
            store.put(keys[i:i + 1], blocks[i:i + 1])
        assert [k in store for k in keys] == [True, True, False, True]
        check_invariants(store)
    with setup.open(device=3) as store:  # the default is LRU: the oldest leaves
        for i in range(4):
            store.put(keys[i:i + 1], blocks[i:i + 1])
        assert [k in store for k in keys] == [False, True, True, True]


@pytest.mark.parametrize("path, says", [
    ("no_such_module_for_tierkv:Policy", "importable module"),
    ("test_custom_policy:Missing", "EvictionPolicy subclass, got nothing"),
    ("test_custom_policy:NotAPolicy", "EvictionPolicy subclass"),
    ("clock", "dotted path"),
])
def test_a_bad_policy_path_is_a_value_error_at_config_time(path, says):
    with pytest.raises(ValueError, match=says):
        tierkv.StoreConfig(host_bytes=1 << 20, policy=path)


def test_the_policy_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("TIERKV_POLICY", "test_custom_policy:MostRecentFirst")
    monkeypatch.setenv("TIERKV_HOST_BYTES", "1MiB")
    assert tierkv.StoreConfig.from_env().policy == "test_custom_policy:MostRecentFirst"
