"""tierkv: a tiered KV-cache block store (GPU HBM -> host DRAM -> NVMe) keyed by chained prefix hashes.

Importing tierkv touches no GPU, starts no thread and loads no compiled code.
"""
from .config import StoreConfig
from .errors import BlockNotFound, LayoutMismatch, StoreClosed, StoreInUse, TierKVError
from .keys import block_keys
from .layout import KVLayout
from .stats import StoreStats, TierStats
from .store import BlockStore

__version__ = "0.1.0"

__all__ = [
    "BlockNotFound",
    "BlockStore",
    "KVLayout",
    "LayoutMismatch",
    "StoreClosed",
    "StoreConfig",
    "StoreInUse",
    "StoreStats",
    "TierKVError",
    "TierStats",
    "block_keys",
    "__version__",
]
