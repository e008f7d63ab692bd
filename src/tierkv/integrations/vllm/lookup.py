"""The lookup channel between the connector's scheduler side and workers in other processes.

With tensor or pipeline parallelism vLLM runs each rank's worker in its own process, and each rank's store
holds its own slice of every block (its heads, or its layers). The scheduler side asks every rank, over a ZeroMQ
request/reply socket per rank (``ipc://`` in a directory only this user can open), how many leading blocks of a
request it holds, and loads only what all of them hold. Each rank keys the hashes itself (its own namespace).

Requests and replies are msgpack: ``["lookup", [hash, ...]]`` -> ``[count, [tier name or None, ...]]`` and
``["missing", [hash, ...]]`` -> ``[bool, ...]``. A rank that does not answer within ``timeout_ms`` counts as
holding nothing (logged once), so a stuck worker costs hits, never a stuck scheduler.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import Any, Sequence

import msgspec
import zmq

__all__ = ["StoreView", "LookupServer", "LookupClient", "socket_address"]

log = logging.getLogger("tierkv.vllm")

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def socket_address(engine_id: str, rank: int) -> str:
    """The ipc address of ``rank``'s lookup server for one engine, in a directory private to this user."""
    directory = os.path.join(tempfile.gettempdir(), f"tierkv-{os.getuid()}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in engine_id)
    return f"ipc://{directory}/lookup-{safe}-{rank}.sock"


class StoreView:
    """What the scheduler side asks of one rank's store (a ``tierkv.BlockStore``), by vLLM block hash; each rank
    keys the hashes in its own namespace (``keyspace``: a :class:`tierkv.integrations.vllm.keys.Keyspace`)."""

    def __init__(self, store: Any, keyspace: Any) -> None:
        self.store = store
        self.keyspace = keyspace

    def lookup_hashes(self, hashes: Sequence[bytes]) -> tuple[int, list[str | None]]:
        """How many leading blocks of ``hashes`` the store holds, and in which tier each of them is."""
        keys = self.keyspace.keys(hashes)
        found = self.store.lookup(keys)
        return found, self.store.locate(keys[:found])

    def missing_hashes(self, hashes: Sequence[bytes]) -> list[bool]:
        """Per hash: whether the store lacks that block (a block to save)."""
        return [key not in self.store for key in self.keyspace.keys(hashes)]


class LookupServer:
    """Answers lookups about one rank's store (``view``: a :class:`StoreView`) on a background thread until
    :meth:`close`."""

    def __init__(self, view: StoreView, address: str) -> None:
        self._worker = view
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.REP)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self.address = address
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tierkv-lookup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            try:
                op, hashes = _decode(self._socket.recv())
                if op == "lookup":
                    reply: Any = list(self._worker.lookup_hashes(hashes))
                elif op == "missing":
                    reply = self._worker.missing_hashes(hashes)
                else:
                    reply = {"error": f"expected op 'lookup' or 'missing', got {op!r}"}
            except Exception as exc:  # a bad request is answered, never allowed to stop the server
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self._socket.send(_encode(reply))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


class LookupClient:
    """The scheduler side's view of every rank's store, through their lookup servers."""

    def __init__(self, addresses: Sequence[str], timeout_ms: int = 1000) -> None:
        self._addresses = list(addresses)
        self._timeout_ms = timeout_ms
        self._context = zmq.Context.instance()
        self._sockets = [self._connect(a) for a in self._addresses]
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def _connect(self, address: str) -> zmq.Socket:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(address)
        return socket

    def _ask_all(self, op: str, hashes: list[bytes]) -> list[Any | None]:
        """Send one request to every rank, then collect the replies (None for a rank that failed to answer)."""
        message = _encode([op, hashes])
        with self._lock:
            for socket in self._sockets:
                socket.send(message)
            replies: list[Any | None] = []
            for i, socket in enumerate(self._sockets):
                if socket.poll(self._timeout_ms, zmq.POLLIN):
                    reply = _decode(socket.recv())
                    if isinstance(reply, dict):
                        self._warn(self._addresses[i], reply.get("error", "a malformed reply"))
                        reply = None
                    replies.append(reply)
                    continue
                self._warn(self._addresses[i], f"no reply within {self._timeout_ms} ms")
                socket.close()  # a REQ socket that missed its reply cannot send again: start afresh
                self._sockets[i] = self._connect(self._addresses[i])
                replies.append(None)
            return replies

    def _warn(self, address: str, why: str) -> None:
        level = logging.DEBUG if address in self._warned else logging.WARNING
        self._warned.add(address)
        log.log(level, "tierkv: lookup at %s failed (%s); counting no hits from that rank", address, why)

    def lookup_hashes(self, hashes: Sequence[bytes]) -> tuple[int, list[str | None]]:
        """Leading blocks every rank holds, and where the first rank holds each of them."""
        replies = self._ask_all("lookup", [bytes(h) for h in hashes])
        if not replies or any(r is None for r in replies):
            return 0, []
        count = min(r[0] for r in replies)
        return count, list(replies[0][1][:count])

    def missing_hashes(self, hashes: Sequence[bytes]) -> list[bool]:
        """Per hash: whether some rank lacks it (a block to save)."""
        replies = self._ask_all("missing", [bytes(h) for h in hashes])
        if any(r is None for r in replies):
            return [True] * len(hashes)
        return [any(r[i] for r in replies) for i in range(len(hashes))]

    def close(self) -> None:
        with self._lock:
            for socket in self._sockets:
                socket.close()
