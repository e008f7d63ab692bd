"""Where the scheduler side of the connector finds the worker side's store.

vLLM runs its scheduler and, with one GPU per engine (tensor_parallel_size=1, the "uni" executor), its worker
in one process: the worker's connector opens the store when vLLM registers its KV caches and publishes it here
under the engine id, and the scheduler's connector looks it up by the same id. Engines with workers in other
processes need a lookup channel between them, which this version does not have.
"""
from __future__ import annotations

import threading
from typing import Any

__all__ = ["publish", "withdraw", "find"]

_lock = threading.Lock()
_stores: dict[str, Any] = {}


def publish(engine_id: str, worker: Any) -> None:
    with _lock:
        if engine_id in _stores and _stores[engine_id] is not worker:
            raise ValueError(f"expected one tierkv worker per vLLM engine, got a second one for engine {engine_id!r}")
        _stores[engine_id] = worker


def withdraw(engine_id: str, worker: Any) -> None:
    with _lock:
        if _stores.get(engine_id) is worker:
            del _stores[engine_id]


def find(engine_id: str) -> Any | None:
    with _lock:
        return _stores.get(engine_id)
