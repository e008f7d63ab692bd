"""Processes that tests/test_crash_consistency.py kills with SIGKILL, and what its checks need to recompute.

Not a test module (pytest does not collect it). The test runs these functions in real child processes
(``multiprocessing`` "forkserver": a clean server process imports torch and tierkv once, then forks each child,
so a kill costs milliseconds instead of a 2-second interpreter start). Everything a checker needs is derivable
from the seed: keys from ``(seed, run, j)``, and each block's bytes from its key alone.
"""
from __future__ import annotations

import hashlib
import os
import random
import time

import torch

import tierkv

# 2 layers * 2 (K, V) * 4 tokens * 2 heads * 16 dims * 2 bytes = a 1 KiB block; a 4096-byte slot on disk.
LAYOUT = dict(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=4)


def layout() -> tierkv.KVLayout:
    return tierkv.KVLayout(**LAYOUT, dtype=torch.bfloat16)


def key_of(seed: int, run: int, j: int) -> bytes:
    """The ``j``-th key writer ``run`` puts (16 bytes, like any tierkv key)."""
    return hashlib.blake2b(f"{seed}:{run}:{j}".encode(), digest_size=16, person=b"tierkv-crash").digest()


def bytes_of(key: bytes, nbytes: int) -> bytes:
    """The bits stored under ``key``: a pure function of the key, so any process can check a block."""
    return hashlib.shake_256(b"tierkv-crash-block" + key).digest(nbytes)


def blocks_of(keys: list[bytes], lay: tierkv.KVLayout) -> torch.Tensor:
    raw = bytearray(b"".join(bytes_of(k, lay.block_nbytes) for k in keys))
    return torch.frombuffer(raw, dtype=torch.uint8).view(lay.dtype).reshape(len(keys), *lay.block_shape)


def _journal(fd: int, tag: str, keys: list[bytes]) -> None:
    """Append ``tag key`` lines and fsync: once this returns, the checker may hold the store to them."""
    if keys:
        os.write(fd, "".join(f"{tag} {k.hex()}\n" for k in keys).encode())
        os.fsync(fd)


def writer(disk_path: str, config: dict, seed: int, run: int, journal: str, progress: str, flush_every: int,
           delete_every: int, get_every: int, ready) -> None:
    """Put blocks in batches of 1..8 keys, forever (until killed).

    Before each put, ``progress`` gets how many keys of this run have been handed to ``put`` (no fsync: a
    SIGKILL keeps the page cache), so the checker knows which keys this run could have written.
    Every ``flush_every`` puts: ``flush()``, then journal ``F`` for every key put since the last flush (and not
    deleted): flush promised them. Every ``delete_every`` puts: delete one earlier key of this run, journaling
    ``d`` before ``delete`` and ``D`` once it returned. Every ``get_every`` puts: read back a few earlier keys
    (promotions, index last-access records) and check their bytes here too. ``ready`` is set once the store is
    open.
    """
    rng = random.Random(f"{seed}:{run}")
    lay = layout()
    store = tierkv.BlockStore(lay, tierkv.StoreConfig(disk_path=disk_path, **config))
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    progress_fd = os.open(progress, os.O_WRONLY | os.O_CREAT, 0o600)
    ready.set()
    unflushed: list[bytes] = []
    alive: list[bytes] = []
    j = 0
    n_put = 0
    while True:
        n = rng.randint(1, 8)
        keys = [key_of(seed, run, j + i) for i in range(n)]
        j += n
        os.pwrite(progress_fd, f"{j:20d}".encode(), 0)
        store.put(keys, blocks_of(keys, lay))
        unflushed += keys
        alive += keys
        n_put += 1
        if delete_every and n_put % delete_every == 0 and alive:
            gone = alive.pop(rng.randrange(len(alive)))
            _journal(fd, "d", [gone])  # about to delete: from here on, the key may be gone
            store.delete([gone])
            _journal(fd, "D", [gone])
            if gone in unflushed:
                unflushed.remove(gone)
        if get_every and n_put % get_every == 0:
            for key in rng.sample(alive, min(4, len(alive))):
                if key in store:  # it may have fallen off a full disk
                    got = store.get([key])
                    assert bytes(got.view(torch.uint8).reshape(-1).numpy()) == bytes_of(key, lay.block_nbytes), (
                        f"writer read wrong bytes for {key.hex()}")
        if flush_every and n_put % flush_every == 0:
            store.flush()
            _journal(fd, "F", unflushed)
            unflushed = []


def opener(disk_path: str, config: dict, keys: list[bytes], seed: int, ready) -> None:
    """Open the store (recovery), read a random sample of ``keys`` (promotions stage index updates), close."""
    rng = random.Random(seed)
    ready.set()  # before the open: the kill is timed from here, so it can land inside the constructor
    lay = layout()
    store = tierkv.BlockStore(lay, tierkv.StoreConfig(disk_path=disk_path, **config))
    for _ in range(8 if keys else 0):
        batch = rng.sample(keys, min(32, len(keys)))
        got = store.get(batch)
        expected = blocks_of(batch, lay)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), "opener read wrong bytes"
    store.close()


def forking_owner(disk_path: str, config: dict, pidfile: str, ready) -> None:
    """Open the store, fork a child that outlives this process (as an engine's worker may), then wait to be
    killed. The child does nothing but sleep; it only holds what fork() gave it."""
    store = tierkv.BlockStore(layout(), tierkv.StoreConfig(disk_path=disk_path, **config))
    key = key_of(0, -4, 0)
    store.put([key], blocks_of([key], layout()))
    store.flush()
    child = os.fork()
    if child == 0:
        # Code after fork() runs after the at-fork hooks: once the pid file is there, the child is past them.
        with open(pidfile + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(pidfile + ".tmp", pidfile)
        time.sleep(60)
        os._exit(0)
    while not os.path.exists(pidfile):
        time.sleep(0.001)
    ready.set()
    time.sleep(60)


def where(conn) -> None:
    """Send the path of the tierkv package this child imported (the test checks it is the one it tests)."""
    conn.send(tierkv.__file__)
    conn.close()
