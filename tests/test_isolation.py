"""Isolation and safety (issue 7, part 4): tenants, file permissions, one writer per directory, foreign caches,
symlinks. docs/security.md says what is guaranteed; these tests hold the code to it."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import time
from pathlib import Path

import lmdb
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tierkv
import tierkv.index
from conftest import assert_bit_equal, blocks_for_keys, make_blocks, make_keys, round_up, tiny_layout
from tierkv.integrations.vllm.keys import Keyspace

LAYOUT = tiny_layout()
BT = LAYOUT.block_tokens


def disk_config(path, blocks: int = 32, **kw) -> tierkv.StoreConfig:
    return tierkv.StoreConfig(device_bytes=0, host_bytes=4 * LAYOUT.block_nbytes, disk_path=str(path),
                              disk_bytes=blocks * round_up(LAYOUT.block_nbytes), **kw)


def open_store(path, layout=LAYOUT, **kw) -> tierkv.BlockStore:
    return tierkv.BlockStore(layout, disk_config(path, **kw))


def fill(path, n: int = 6, seed: int = 3) -> tuple[list[bytes], torch.Tensor]:
    keys, blocks = make_keys(n, seed=seed), make_blocks(n, LAYOUT, seed=seed)
    with open_store(path) as store:
        store.put(keys, blocks)
    return keys, blocks


# ---------------------------------------------------------------------------------------------------------------
# tenants: a salt is a disjoint key space


@pytest.fixture(scope="module")
def shared_store():
    with tierkv.BlockStore(LAYOUT, tierkv.StoreConfig(device_bytes=64 * LAYOUT.block_nbytes,
                                                      host_bytes=64 * LAYOUT.block_nbytes)) as store:
        yield store


token_ids = st.lists(st.integers(0, 2**32 - 1), min_size=BT, max_size=8 * BT)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=token_ids, salts=st.lists(st.binary(max_size=12), min_size=2, max_size=2, unique=True),
       shared=st.integers(0, 8 * BT), tail=token_ids)
def test_one_tenants_prompt_never_hits_another_tenants_blocks(shared_store, prompt, salts, shared, tail):
    """Tenant A stores a prompt; tenant B (another salt) asking for the same prompt, or one sharing any prefix of
    it, finds nothing of A's; B storing that prompt does not touch A's bytes; each finds exactly its own."""
    store = shared_store
    salt_a, salt_b = salts
    other = prompt[:shared] + tail  # B's prompt: some prefix of A's, then anything
    keys_a = tierkv.block_keys(prompt, block_tokens=BT, salt=salt_a)
    keys_b = tierkv.block_keys(other, block_tokens=BT, salt=salt_b)
    assert not set(keys_a) & set(keys_b), "two salts gave a common key"
    blocks_a = blocks_for_keys(keys_a, LAYOUT)
    try:
        store.put(keys_a, blocks_a)
        assert store.lookup_tokens(prompt, salt=salt_a) == len(keys_a)
        assert store.lookup_tokens(other, salt=salt_b) == 0
        assert store.lookup_tokens(prompt, salt=salt_b) == 0
        assert store.lookup(keys_b) == 0 and not any(k in store for k in keys_b)
        with pytest.raises(tierkv.BlockNotFound):
            store.get(keys_b[:1]) if keys_b else store.get([b"\0" * 16])
        # B stores its own blocks for the prompt: A's bytes are untouched, and each tenant reads its own
        blocks_b = blocks_for_keys(keys_b, LAYOUT)
        store.put(keys_b, blocks_b)
        assert store.lookup_tokens(other, salt=salt_b) == len(keys_b)
        assert_bit_equal(store.get(keys_a), blocks_a, "tenant A's blocks")
        if keys_b:
            assert_bit_equal(store.get(keys_b), blocks_b, "tenant B's blocks")
    finally:
        store.delete(keys_a + keys_b)


def test_the_empty_salt_is_a_tenant_like_any_other(shared_store):
    prompt = list(range(4 * BT))
    keys = tierkv.block_keys(prompt, block_tokens=BT)
    shared_store.put(keys, blocks_for_keys(keys, LAYOUT))
    try:
        assert shared_store.lookup_tokens(prompt) == 4
        for salt in (b"\0", b" ", b"tierkv-v1", b"\0" * 16):
            assert shared_store.lookup_tokens(prompt, salt=salt) == 0, salt
    finally:
        shared_store.delete(keys)


@settings(max_examples=30, deadline=None)
@given(hashes=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=8, unique=True))
def test_vllm_keyspaces_of_other_models_layouts_and_ranks_are_disjoint(hashes):
    spaces = [Keyspace("model-a", LAYOUT, 0, 2), Keyspace("model-b", LAYOUT, 0, 2),
              Keyspace("model-a", LAYOUT, 1, 2), Keyspace("model-a", LAYOUT, 0, 1),
              Keyspace("model-a", tiny_layout(dtype=torch.float16), 0, 2)]
    seen: set[bytes] = set()
    for space in spaces:
        keys = space.keys(hashes)
        assert all(len(k) == 16 for k in keys)
        assert not seen & set(keys)
        seen |= set(keys)
    assert Keyspace("model-a", LAYOUT, 0, 2).keys(hashes) == spaces[0].keys(hashes)  # and stable


# ---------------------------------------------------------------------------------------------------------------
# permissions


def modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.lstat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def assert_owner_only(root: Path) -> None:
    found = modes(root)
    assert {"LOCK", "blocks.data", "index.lmdb", "index.lmdb/data.mdb", "index.lmdb/lock.mdb"} <= set(found), found
    for name, mode in found.items():
        p = root / name
        assert not p.is_symlink(), name
        want = 0o700 if p.is_dir() else 0o600
        assert mode == want, f"{name}: mode {mode:o}, expected {want:o}"


@pytest.fixture
def umask_zero():
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_directory_and_files_are_owner_only_even_with_umask_0(tmp_path, umask_zero):
    path = tmp_path / "a" / "b" / "tierkv"  # missing parents are the store's to create: owner-only too
    keys, blocks = fill(path)
    os.umask(0o022)
    assert_owner_only(path)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    with open_store(path) as store:
        assert_bit_equal(store.get(keys), blocks)
    assert_owner_only(path)


def test_widened_file_modes_are_tightened_on_open(tmp_path):
    path = tmp_path / "tierkv"
    keys, blocks = fill(path)
    for name in ("LOCK", "blocks.data", "index.lmdb/data.mdb", "index.lmdb/lock.mdb"):
        os.chmod(path / name, 0o666)
    os.chmod(path / "index.lmdb", 0o755)
    with open_store(path) as store:
        assert_owner_only(path)
        assert_bit_equal(store.get(keys), blocks)


def test_an_existing_directory_keeps_its_mode_but_not_a_world_writable_one(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o750)
    os.chmod(mine, 0o750)  # the operator's choice for a directory they made: kept
    fill(mine)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o750
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp: anyone could swap the store's files
    with pytest.raises(ValueError, match="expected a writable directory for disk_path, got .*writable by every"):
        open_store(shared)
    assert list(shared.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------
# one writer per directory, across processes


def _writer(path: str, salt: bytes, n: int, barrier, hold_s: float, queue) -> None:
    """Open the store (retrying while the other process holds it), write n blocks, hold it, close."""
    import tierkv as tk
    from conftest import blocks_for_keys as blocks_of, tiny_layout as layout_of

    layout = layout_of()
    keys = tk.block_keys(list(range(n * layout.block_tokens)), block_tokens=layout.block_tokens, salt=salt)
    config = tk.StoreConfig(device_bytes=0, host_bytes=4 * layout.block_nbytes, disk_path=path,
                            disk_bytes=32 * 4096)  # as disk_config() has it
    barrier.wait(timeout=120)
    refused, deadline = 0, time.monotonic() + 120
    while True:
        try:
            store = tk.BlockStore(layout, config)
            break
        except tk.StoreInUse:
            refused += 1
            if time.monotonic() > deadline:
                queue.put((salt, refused, "gave up"))
                return
            time.sleep(0.02)
    with store:
        for i in range(n):  # one put at a time, flushed, while the other process keeps trying to get in
            store.put(keys[i:i + 1], blocks_of(keys[i:i + 1], layout))
            store.flush()
        time.sleep(hold_s)
    queue.put((salt, refused, "ok"))


def test_two_processes_writing_one_directory_take_turns_without_corruption(tmp_path):
    path = str(tmp_path / "tierkv")
    fill(path, n=2, seed=5)  # something already there, which neither writer may damage
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    n = 8
    salts = [b"writer-a", b"writer-b"]
    procs = [ctx.Process(target=_writer, args=(path, salt, n, barrier, 1.0, queue)) for salt in salts]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert {status for _, _, status in results} == {"ok"}, results
    # they started together and each held the directory for over a second: the later one was turned away
    assert sum(refused for _, refused, _ in results) >= 1, results
    with open_store(path) as store:
        assert_bit_equal(store.get(make_keys(2, seed=5)), make_blocks(2, LAYOUT, seed=5), "the earlier blocks")
        for salt in salts:
            keys = tierkv.block_keys(list(range(n * BT)), block_tokens=BT, salt=salt)
            assert store.lookup(keys) == n, salt
            assert_bit_equal(store.get(keys), blocks_for_keys(keys, LAYOUT), salt.decode())
        assert store.stats().corrupt == 0


def test_the_same_directory_through_a_symlink_is_the_same_lock(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    real.mkdir(mode=0o700)
    link.symlink_to(real)
    with open_store(link) as first:
        first.put(make_keys(1, seed=8), make_blocks(1, LAYOUT, seed=8))
        with pytest.raises(tierkv.StoreInUse):
            open_store(real)
    with open_store(real) as second:  # the link was resolved once: the blocks live in the real directory
        assert_bit_equal(second.get(make_keys(1, seed=8)), make_blocks(1, LAYOUT, seed=8))


# ---------------------------------------------------------------------------------------------------------------
# a cache written by another layout, dtype, codec or format version


def rewrite_header(path, edit) -> None:
    env = lmdb.open(str(Path(path) / "index.lmdb"), max_dbs=2, subdir=True)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True, db=meta) as txn:
            txn.put(b"header", edit(bytes(txn.get(b"header"))))
    finally:
        env.close()


def _json_edit(change):
    def edit(raw: bytes) -> bytes:
        header = json.loads(raw)
        change(header)
        return json.dumps(header, sort_keys=True).encode()
    return edit


HEADER_EDITS = {
    "format-2": (_json_edit(lambda h: h.update(format=2)), ["disk format 2", "disk format 1"]),
    "format-0": (_json_edit(lambda h: h.update(format=0)), ["disk format 0", "disk format 1"]),
    "no-format": (_json_edit(lambda h: h.pop("format")), ["disk format None", "disk format 1"]),
    "dtype": (_json_edit(lambda h: h["layout"].update(dtype="float16")), ["dtype=float16", "dtype=bfloat16"]),
    "head_dim": (_json_edit(lambda h: h["layout"].update(head_dim=32)), ["head_dim=32", "head_dim=16"]),
    "codec": (_json_edit(lambda h: h.update(codec="fp8")), ["'fp8'", "'none'"]),
    "slot": (_json_edit(lambda h: h.update(slot_nbytes=8192)), []),
    "garbage": (lambda raw: b"\xff\xfenot json", ["unreadable header", "disk format 1"]),
    "json-list": (lambda raw: b"[1, 2, 3]", ["unreadable header", "disk format 1"]),
    "layout-junk": (_json_edit(lambda h: h.update(layout={"dtype": "complex128"})), ["disk format 1"]),
}


@pytest.mark.parametrize("change", sorted(HEADER_EDITS))
def test_a_cache_of_another_layout_or_format_is_refused_naming_both(tmp_path, change):
    path = tmp_path / "tierkv"
    keys, blocks = fill(path)
    size_before = (path / "blocks.data").stat().st_size
    data_before = (path / "blocks.data").read_bytes()
    edit, names = HEADER_EDITS[change]
    rewrite_header(path, edit)
    with pytest.raises(tierkv.LayoutMismatch) as info:
        open_store(path)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "expected" in message and str(LAYOUT) in message, message
    for name in names:
        assert name in message, (name, message)
    # refused before anything was touched: the data file is as it was, and the directory is not left locked
    assert (path / "blocks.data").stat().st_size == size_before
    assert (path / "blocks.data").read_bytes() == data_before
    rewrite_header(path, lambda raw: json.dumps({"format": tierkv.index.FORMAT_VERSION, "layout": LAYOUT.to_dict(),
                                                 "slot_nbytes": round_up(LAYOUT.block_nbytes), "codec": "none"},
                                                sort_keys=True).encode())
    with open_store(path) as store:
        assert_bit_equal(store.get(keys), blocks)


@pytest.mark.parametrize("version", [tierkv.index.FORMAT_VERSION - 1, tierkv.index.FORMAT_VERSION + 1])
def test_another_tierkv_format_version_is_refused(tmp_path, monkeypatch, version):
    """What a tierkv of another on-disk format sees: the cache written by this one is refused, not misread."""
    path = tmp_path / "tierkv"
    keys, blocks = fill(path)
    monkeypatch.setattr(tierkv.index, "FORMAT_VERSION", version)
    with pytest.raises(tierkv.LayoutMismatch, match=f"disk format {tierkv.index.FORMAT_VERSION}"):
        open_store(path)
    monkeypatch.undo()
    with open_store(path) as store:
        assert_bit_equal(store.get(keys), blocks)


@pytest.mark.parametrize("other", [dict(dtype=torch.float16), dict(dtype=torch.float32), dict(num_kv_heads=1),
                                   dict(block_tokens=8)], ids=["float16", "float32", "kv_heads", "block_tokens"])
def test_a_cache_of_another_dtype_is_refused_even_with_the_same_block_size(tmp_path, other):
    # float16 blocks are exactly as large as bfloat16 ones, and kv_heads=1 at float32 too: the header, not the
    # size, tells them apart
    path = tmp_path / "tierkv"
    keys, blocks = fill(path)
    layout = tiny_layout(**{"dtype": LAYOUT.dtype, **other})
    with pytest.raises(tierkv.LayoutMismatch) as info:
        open_store(path, layout=layout)
    assert str(layout) in str(info.value) and str(LAYOUT) in str(info.value)
    with open_store(path) as store:
        assert_bit_equal(store.get(keys), blocks)


def test_damaged_index_records_are_dropped_not_misread(tmp_path):
    path = tmp_path / "tierkv"
    keys, blocks = fill(path, n=4)
    env = lmdb.open(str(path / "index.lmdb"), max_dbs=2, subdir=True)
    try:
        db = env.open_db(b"blocks")
        with env.begin(write=True, db=db) as txn:
            txn.put(keys[1], b"short")                       # a record of the wrong size
            txn.put(b"not-a-16-byte-key", bytes(txn.get(keys[0])))  # a key of the wrong size
    finally:
        env.close()
    with open_store(path) as store:
        assert store.lookup(keys) == 1 and keys[1] not in store
        assert_bit_equal(store.get([keys[0], keys[2], keys[3]]), blocks[[0, 2, 3]])


# ---------------------------------------------------------------------------------------------------------------
# symlinks


@pytest.fixture
def victim(tmp_path):
    """A directory of someone else's files the store must never touch."""
    d = tmp_path / "victim"
    d.mkdir()
    (d / "secret").write_bytes(b"do not overwrite")
    return d


def untouched(victim: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(victim.iterdir())}


@pytest.mark.parametrize("name", ["blocks.data", "LOCK", "index.lmdb", "index.lmdb/data.mdb",
                                  "index.lmdb/lock.mdb"])
@pytest.mark.parametrize("target", ["file", "directory", "dangling"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_a_symlink_inside_disk_path_is_refused(tmp_path, victim, name, target, existing):
    path = tmp_path / "tierkv"
    keys = blocks = None
    if existing:  # an attacker replaces one of a working store's files with a link
        keys, blocks = fill(path)
        p = path / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    else:
        path.mkdir(mode=0o700)
        if "/" in name:
            (path / "index.lmdb").mkdir(mode=0o700)
    pointee = {"file": victim / "secret", "directory": victim, "dangling": victim / "created-by-the-store"}[target]
    (path / name).symlink_to(pointee)
    before = untouched(victim)
    with pytest.raises(ValueError, match=r"expected .*, got a symlink .*does not follow symlinks") as info:
        open_store(path)
    assert str(path / name) in str(info.value) and str(pointee) in str(info.value)
    assert untouched(victim) == before, "the store wrote through the symlink"
    assert not (victim / "created-by-the-store").exists()
    (path / name).unlink()  # with the link gone the directory is usable again (it was not left locked)
    with open_store(path) as store:
        if existing and name != "blocks.data" and "index" not in name:
            assert_bit_equal(store.get(keys), blocks)


def test_a_symlinked_disk_path_is_resolved_once(tmp_path):
    real = tmp_path / "nvme" / "tierkv"
    link = tmp_path / "tierkv-link"
    real.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)  # dangling until the store creates the directory
    keys, blocks = fill(link)
    assert (real / "blocks.data").is_file() and not (tmp_path / "blocks.data").exists()
    assert stat.S_IMODE(real.stat().st_mode) == 0o700
    with open_store(real) as store:
        assert_bit_equal(store.get(keys), blocks)
    with open_store(link) as store:
        assert_bit_equal(store.get(keys), blocks)


@pytest.mark.parametrize("what", ["fifo", "directory", "socket-like-file"])
def test_something_other_than_a_regular_file_is_refused(tmp_path, what):
    path = tmp_path / "tierkv"
    path.mkdir(mode=0o700)
    if what == "fifo":
        os.mkfifo(path / "blocks.data")
    elif what == "directory":
        (path / "blocks.data").mkdir()
    else:
        (path / "index.lmdb").write_bytes(b"a file where the index directory goes")
    with pytest.raises(ValueError, match="expected .* got a"):
        open_store(path)


def test_disk_path_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a writable directory for disk_path, got .*not a directory"):
        open_store(f)
    assert f.read_bytes() == b"x"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
@pytest.mark.parametrize("name", ["blocks.data", "LOCK", "index.lmdb/data.mdb"])
def test_a_file_planted_by_another_user_is_refused(tmp_path, name):
    path = tmp_path / "tierkv"
    fill(path)
    os.chown(path / name, 54321, 54321)
    with pytest.raises(ValueError, match="expected .* owned by .* got uid 54321"):
        open_store(path)
    os.chown(path / name, os.geteuid(), os.getegid())
    with open_store(path):
        pass
