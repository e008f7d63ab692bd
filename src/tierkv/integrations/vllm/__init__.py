"""tierkv's vLLM integration (vLLM 0.32/0.33): the KV connector vLLM loads with
``"kv_connector": "TierKVConnector", "kv_connector_module_path": "tierkv.integrations.vllm"`` (docs/vllm.md).

- ``connector``: ``TierKVConnector`` (imports vllm; loaded on first access, so that the modules below work
  without vLLM installed);
- ``pages``: vLLM's paged KV-cache tensors, whatever their physical layout, read and written as tierkv blocks;
- ``keys``: tierkv keys from vLLM's block hashes, namespaced by model, KV layout and rank;
- ``settings``: ``kv_connector_extra_config`` -> ``tierkv.StoreConfig``;
- ``registry``: where the scheduler side finds the worker side's store.
"""
from __future__ import annotations

from typing import Any

__all__ = ["TierKVConnector"]


def __getattr__(name: str) -> Any:
    if name == "TierKVConnector":  # vLLM imports this module, then asks for the class by name
        from .connector import TierKVConnector
        return TierKVConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
