"""tierkv keys for vLLM blocks: vLLM's own block hashes, namespaced.

vLLM hashes each full block of a request chained on its parent (``request.block_hashes``: sha256 by
default, so the same tokens give the same hashes in every process). A tierkv key is
``xxh3_128(namespace + block_hash)``: it names the same prefix vLLM's prefix cache names, and the namespace
keeps apart what must never be mixed up — another model, another KV shape or dtype, another tensor-parallel
rank (each rank holds other heads) — so one disk directory can serve several deployments without a wrong hit.
"""
from __future__ import annotations

import json
from typing import Sequence

import xxhash

from tierkv.layout import KVLayout

__all__ = ["Keyspace"]

_DOMAIN = b"tierkv-vllm-v1"


class Keyspace:
    """The keys of one rank's blocks for one model and KV layout."""

    def __init__(self, model: str, layout: KVLayout, tp_rank: int, tp_size: int) -> None:
        self.description = {"model": model, "layout": layout.to_dict(), "tp_rank": tp_rank, "tp_size": tp_size}
        self.namespace = xxhash.xxh3_128_digest(_DOMAIN + json.dumps(self.description, sort_keys=True).encode())

    def keys(self, block_hashes: Sequence[bytes]) -> list[bytes]:
        """One 16-byte key per vLLM block hash (``bytes``; vLLM's ``BlockHash``)."""
        namespace = self.namespace
        return [xxhash.xxh3_128_digest(namespace + bytes(h)) for h in block_hashes]
