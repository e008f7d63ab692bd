"""``kv_connector_extra_config`` -> the store's :class:`tierkv.StoreConfig`.

vLLM owns the GPU memory, so the connector's store has no device tier: blocks live in host DRAM (pinned with
CUDA) and on disk. Every other store setting can be given, by its ``StoreConfig`` name; an unknown name is a
``ValueError`` that lists the known ones (a typo must not silently fall back to a default).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping

from tierkv.config import StoreConfig

__all__ = ["store_config", "STORE_FIELDS"]

# The store settings a connector takes; device_bytes is vLLM's own KV cache.
STORE_FIELDS = tuple(f.name for f in fields(StoreConfig) if f.name != "device_bytes")


def store_config(extra: Mapping[str, Any] | None) -> StoreConfig:
    """The store configuration from vLLM's ``kv_connector_extra_config`` (missing fields take their
    ``TIERKV_*`` environment variable, then the default). Raises ``ValueError`` naming unknown fields."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - set(STORE_FIELDS))
    if "device_bytes" in unknown:
        raise ValueError("expected no device_bytes in kv_connector_extra_config (vLLM owns the GPU memory; tierkv "
                         "holds blocks in host memory and on disk), got device_bytes="
                         f"{extra['device_bytes']!r}")
    if unknown:
        raise ValueError(f"expected kv_connector_extra_config fields from {list(STORE_FIELDS)}, got unknown "
                         f"{unknown}")
    return StoreConfig.from_env(**extra, device_bytes=0)
