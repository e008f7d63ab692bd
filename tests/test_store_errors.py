"""Bad input is a ValueError/TypeError that says "expected X, got Y", and a rejected call changes nothing."""
from __future__ import annotations

import pytest
import torch

import tierkv
from conftest import assert_bit_equal, make_blocks, make_keys, round_up, tiny_layout

BAD_INPUT = (ValueError, TypeError)


@pytest.fixture
def filled(tier_config, layout):
    """A store holding 4 blocks, the keys and blocks it holds, and 2 more keys it does not."""
    keys = make_keys(6, seed=1)
    blocks = make_blocks(4, layout, seed=2)
    with tier_config.open() as store:
        store.put(keys[:4], blocks)
        yield store, keys, blocks


def state(store, keys):
    return ([store.lookup(keys[i:]) for i in range(len(keys))], [k in store for k in keys],
            {name: t.used_blocks for name, t in store.stats().tiers.items()})


def rejected(store, keys, blocks, call, match="expected"):
    """``call`` raises a ValueError/TypeError whose message says what was expected; the store is unchanged."""
    before = state(store, keys)
    with pytest.raises(BAD_INPUT, match=match) as info:
        call()
    assert state(store, keys) == before, "a rejected call changed the store"
    assert_bit_equal(store.get(keys[:4]), blocks)
    return info.value


# ---------------------------------------------------------------------------------------------------------------
# put


def test_wrong_block_shape(filled, layout):
    store, keys, blocks = filled
    num_layers, two, tokens, heads, dim = layout.block_shape
    for shape in [(1, num_layers, two, tokens, heads, dim + 1), (1, num_layers, two, tokens, heads * dim),
                  (num_layers, two, tokens, heads, dim), (1, num_layers + 1, two, tokens, heads, dim)]:
        bad = torch.zeros(shape, dtype=layout.dtype)
        err = rejected(store, keys, blocks, lambda: store.put(keys[4:5], bad))
        assert isinstance(err, ValueError), shape
        assert "got" in str(err)


def test_wrong_dtype(filled, layout):
    store, keys, blocks = filled
    for dtype in (torch.float16, torch.float32, torch.uint8):
        bad = torch.zeros((1, *layout.block_shape), dtype=dtype)
        err = rejected(store, keys, blocks, lambda: store.put(keys[4:5], bad))
        assert "got" in str(err)
        assert "float16" in str(err) or "uint8" in str(err) or "float32" in str(err)


def test_number_of_keys_must_match_number_of_blocks(filled, layout):
    store, keys, blocks = filled
    two = make_blocks(2, layout, seed=3)
    err = rejected(store, keys, blocks, lambda: store.put(keys[4:5], two))
    assert isinstance(err, ValueError)
    err = rejected(store, keys, blocks, lambda: store.put(keys[4:6], two[:1]))
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("bad_key", [b"\x00" * 15, b"\x00" * 17, b"", "0" * 16, 12345, None],
                         ids=["15-bytes", "17-bytes", "empty", "str", "int", "None"])
def test_bad_key_is_rejected_by_put(filled, layout, bad_key):
    store, keys, blocks = filled
    new = make_blocks(2, layout, seed=4)
    # the valid key next to the bad one must not be stored either
    rejected(store, keys, blocks, lambda: store.put([keys[4], bad_key], new))
    assert keys[4] not in store


@pytest.mark.parametrize("method", ["get", "lookup", "delete"])
@pytest.mark.parametrize("bad_key", [b"\x00" * 15, "0" * 16], ids=["15-bytes", "str"])
def test_bad_key_is_rejected_by_other_methods(filled, method, bad_key):
    store, keys, blocks = filled
    rejected(store, keys, blocks, lambda: getattr(store, method)([keys[0], bad_key]))


def test_key_length_error_says_expected_16_bytes(filled):
    store, keys, blocks = filled
    err = rejected(store, keys, blocks, lambda: store.lookup([b"\x01" * 15]))
    assert isinstance(err, ValueError)
    assert "16" in str(err) and "15" in str(err)


def test_get_into_a_wrong_out_tensor(filled, layout):
    store, keys, blocks = filled
    wrong = {
        "shape": torch.empty((3, *layout.block_shape), dtype=layout.dtype),
        "dtype": torch.empty((4, *layout.block_shape), dtype=torch.float32),
    }
    for what, out in wrong.items():
        sentinel = out.clone()
        rejected(store, keys, blocks, lambda: store.get(keys[:4], out=out))
        assert torch.equal(out.view(torch.uint8), sentinel.view(torch.uint8)), f"{what}: out was written"


# ---------------------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_nonzero_capacity_smaller_than_one_block(tmp_path, tier):
    layout = tiny_layout()
    args = dict(device_bytes=0, host_bytes=1 << 20)
    if tier == "disk":
        args.update(disk_path=str(tmp_path / "disk"), disk_bytes=layout.block_nbytes - 1)
    else:
        args[f"{tier}_bytes"] = layout.block_nbytes - 1
    config = tierkv.StoreConfig(**args)  # the block size is known only with the layout
    with pytest.raises(ValueError, match="expected") as info:
        tierkv.BlockStore(layout, config)
    assert str(layout.block_nbytes - 1) in str(info.value)


def test_disk_capacity_counts_the_block_on_disk(tmp_path):
    # disk_bytes includes per-block overhead: a 1 KiB block takes a 4 KiB page on disk, so 2 KiB of disk holds
    # no block at all, which is a configuration error, not a silently useless tier
    layout = tiny_layout()
    assert layout.block_nbytes == 1024
    config = tierkv.StoreConfig(device_bytes=0, host_bytes=1 << 20, disk_path=str(tmp_path / "disk"),
                                disk_bytes=2048)
    with pytest.raises(ValueError, match="expected"):
        tierkv.BlockStore(layout, config)


def test_disk_path_with_zero_disk_bytes(tmp_path):
    with pytest.raises(ValueError, match="expected"):
        tierkv.StoreConfig(device_bytes=1 << 20, disk_path=str(tmp_path / "disk"), disk_bytes=0)


def test_all_tiers_disabled():
    with pytest.raises(ValueError, match="expected"):
        tierkv.StoreConfig(device_bytes=0, host_bytes=0, disk_path=None)


def test_negative_capacity():
    with pytest.raises(ValueError, match="expected"):
        tierkv.StoreConfig(device_bytes=-1, host_bytes=1 << 20)


def test_unwritable_disk_path(tmp_path):
    regular_file = tmp_path / "not-a-directory"
    regular_file.write_bytes(b"x")
    path = regular_file / "disk"
    layout = tiny_layout()
    config = tierkv.StoreConfig(device_bytes=0, host_bytes=1 << 20, disk_path=str(path),
                                disk_bytes=8 * round_up(layout.block_nbytes))
    with pytest.raises((ValueError, OSError)) as info:
        tierkv.BlockStore(layout, config)
    message = str(info.value)
    assert str(path) in message or str(regular_file) in message, message
    assert regular_file.read_bytes() == b"x"


def test_unknown_codec_or_policy_is_rejected():
    with pytest.raises(ValueError, match="expected"):
        tierkv.StoreConfig(device_bytes=1 << 20, host_codec="zstd")
    with pytest.raises(ValueError, match="expected"):
        tierkv.StoreConfig(device_bytes=1 << 20, policy="random")


def test_config_is_frozen():
    config = tierkv.StoreConfig(device_bytes=1 << 20)
    with pytest.raises(Exception):
        config.device_bytes = 0  # type: ignore[misc]
