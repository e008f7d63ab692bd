"""The lookup channel between the connector's scheduler side and worker ranks in other processes.

Each "rank" is a real process holding a real tierkv store and serving lookups on a real ipc socket; the client
is what the scheduler side uses. Needs pyzmq and msgspec (vLLM's dependencies; skipped without them).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

pytest.importorskip("zmq")
pytest.importorskip("msgspec")

import tierkv  # noqa: E402
from tierkv.integrations.vllm.keys import Keyspace  # noqa: E402
from tierkv.integrations.vllm.lookup import LookupClient, LookupServer, StoreView, socket_address  # noqa: E402

from conftest import tiny_layout  # noqa: E402

HASHES = [bytes([i]) * 32 for i in range(8)]  # stand-ins for vLLM's sha256 block hashes

RANK = textwrap.dedent("""
    import sys, time, torch, tierkv
    from tierkv.integrations.vllm.keys import Keyspace
    from tierkv.integrations.vllm.lookup import LookupServer, StoreView, socket_address
    engine, rank, held = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    layout = tierkv.KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, block_tokens=4, dtype=torch.bfloat16)
    keyspace = Keyspace("model", layout, rank, 2)
    store = tierkv.BlockStore(layout, tierkv.StoreConfig(device_bytes=0, host_bytes=64 * layout.block_nbytes))
    hashes = [bytes([i]) * 32 for i in range(8)]
    store.put(keyspace.keys(hashes[:held]), torch.zeros(held, *layout.block_shape, dtype=layout.dtype))
    server = LookupServer(StoreView(store, keyspace), socket_address(engine, rank))
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    server.close()
    store.close()
""")


def start_rank(engine: str, rank: int, held: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", RANK, engine, str(rank), str(held)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=30)


def test_the_scheduler_loads_only_what_every_rank_holds():
    engine = f"test-{uuid.uuid4().hex[:8]}"
    ranks = [start_rank(engine, 0, held=5), start_rank(engine, 1, held=3)]
    client = LookupClient([socket_address(engine, r) for r in range(2)])
    try:
        found, tiers = client.lookup_hashes(HASHES)
        assert (found, tiers) == (3, ["host"] * 3)
        assert client.missing_hashes(HASHES[2:6]) == [False, True, True, True]  # rank 1 lacks 3..7
    finally:
        client.close()
        for proc in ranks:
            stop(proc)


def test_a_rank_that_does_not_answer_costs_hits_not_a_stuck_scheduler():
    engine = f"test-{uuid.uuid4().hex[:8]}"
    alive = start_rank(engine, 0, held=4)
    client = LookupClient([socket_address(engine, 0), socket_address(engine, 1)], timeout_ms=200)  # rank 1 absent
    try:
        started = time.monotonic()
        assert client.lookup_hashes(HASHES) == (0, [])
        assert client.missing_hashes(HASHES[:2]) == [True, True]  # when in doubt, save
        assert time.monotonic() - started < 10
        late = start_rank(engine, 1, held=2)  # the rank comes up: the client reconnects and counts it
        try:
            assert client.lookup_hashes(HASHES)[0] == 2
        finally:
            stop(late)
    finally:
        client.close()
        stop(alive)


def test_a_malformed_request_is_answered_and_the_server_keeps_serving(tmp_path):
    import msgspec
    import torch
    import zmq

    layout = tiny_layout()
    keyspace = Keyspace("model", layout, 0, 1)
    with tierkv.BlockStore(layout, tierkv.StoreConfig(device_bytes=0, host_bytes=8 * layout.block_nbytes)) as store:
        store.put(keyspace.keys(HASHES[:2]), torch.zeros(2, *layout.block_shape, dtype=layout.dtype))
        address = socket_address(f"test-{uuid.uuid4().hex[:8]}", 0)
        server = LookupServer(StoreView(store, keyspace), address)
        try:
            socket = zmq.Context.instance().socket(zmq.REQ)
            socket.connect(address)
            for bad in (b"not msgpack", msgspec.msgpack.encode(["drop", []]), msgspec.msgpack.encode(["lookup", 7])):
                socket.send(bad)
                assert socket.poll(5000)
                assert "error" in msgspec.msgpack.decode(socket.recv())
            socket.close(linger=0)
            client = LookupClient([address])
            assert client.lookup_hashes(HASHES) == (2, ["host", "host"])
            client.close()
        finally:
            server.close()


def test_socket_directory_is_private():
    address = socket_address("x", 0)
    directory = os.path.dirname(address.removeprefix("ipc://"))
    assert os.stat(directory).st_mode & 0o777 == 0o700
