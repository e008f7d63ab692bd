"""Store configuration: one frozen dataclass; every field has its environment variable and description.

Conflicting settings are rejected with ``ValueError`` rather than silently resolved.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from .policy import POLICY_NAMES, resolve_policy

__all__ = ["StoreConfig", "parse_bytes", "CODECS", "POLICIES", "DISK_BACKENDS"]

# What this version implements; anything else is an error, not a silent fallback.
CODECS = ("none", "fp8", "int8")
POLICIES = POLICY_NAMES
DISK_BACKENDS = ("auto", "posix", "kvikio")
_COUNTS = ("io_threads", "disk_admit_uses")  # positive ints; the byte sizes parse their own units
_SIZES = ("device_bytes", "host_bytes", "disk_bytes", "writeback_bytes")

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4,
          "tib": 1 << 40}


def parse_bytes(value: Any, name: str = "size") -> int:
    """``4096``, ``"4096"``, ``"512M"``, ``"8GiB"``, ``"1.5G"`` -> bytes (K/M/G/T alone are binary units)."""
    if isinstance(value, bool):
        raise TypeError(f"expected {name} as bytes (int or a string like '8G'), got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise ValueError(f"expected {name} as bytes (int or a string like '8G'), got {value!r}")


def _field(default: Any, env: str, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True)
class StoreConfig:
    """Capacities and behaviour of a :class:`tierkv.BlockStore`.

    Sizes are in bytes; a capacity of 0 (or ``disk_path=None``) disables that tier. A nonzero capacity smaller
    than one block is rejected when the store is built (the block size comes from the layout).
    """

    device_bytes: int = _field(1 << 30, "TIERKV_DEVICE_BYTES",
                               "Device tier (GPU HBM; host memory without CUDA) capacity in bytes; 0 disables it.")
    host_bytes: int = _field(4 << 30, "TIERKV_HOST_BYTES",
                             "Host DRAM tier capacity in bytes (pinned when CUDA is available); 0 disables it.")
    disk_path: str | None = _field(None, "TIERKV_DISK_PATH",
                                   "Directory of the disk tier (data file + lmdb index); unset disables it.")
    disk_bytes: int = _field(0, "TIERKV_DISK_BYTES",
                             "Disk tier data-file size in bytes, per-block alignment included; needs disk_path.")
    host_codec: str = _field("none", "TIERKV_HOST_CODEC",
                             f"Encoding of blocks in the host tier: {CODECS}. 'fp8' (e4m3, one scale per layer, K/V "
                             "and head) halves a block; 'int8' (per-channel K, per-token V scales) is more exact and "
                             "a little larger. Lossy codecs take float16/bfloat16/float32 layouts.")
    disk_codec: str = _field("none", "TIERKV_DISK_CODEC",
                             f"Encoding of blocks in the disk tier: {CODECS}. A block moving between tiers with the "
                             "same codec keeps its encoded bytes (quantized once).")
    policy: str = _field("lru", "TIERKV_POLICY", f"Eviction order within each tier: {POLICIES}, or a dotted path "
                                 "'package.module:ClassName' to an EvictionPolicy subclass.")
    disk_backend: str = _field("auto", "TIERKV_DISK_BACKEND",
                               "Disk I/O: 'posix' (O_DIRECT on a thread pool), 'kvikio' (GPUDirect Storage), "
                               "or 'auto' (kvikio when it imports and a CUDA driver is present).")
    io_threads: int = _field(4, "TIERKV_IO_THREADS", "Threads issuing disk I/O in parallel.")
    disk_admit_uses: int = _field(1, "TIERKV_DISK_ADMIT_USES",
                                  "A block pushed down to the disk tier is written there only if it was used (put, "
                                  "or returned by get) at least this many times; others fall off instead, sparing "
                                  "SSD wear on one-off prompts. flush() and close() write every block regardless.")

    writeback_bytes: int = _field(128 << 20, "TIERKV_WRITEBACK_BYTES",
                                  "Memory (pinned with CUDA) staging blocks on their way to the disk tier, so a put "
                                  "or get that pushes blocks out of a full memory tier never waits for the SSD; when "
                                  "the disk falls this far behind, the next demotion waits. 0 writes synchronously.")

    def __post_init__(self) -> None:
        for name in _SIZES:
            value = parse_bytes(getattr(self, name), name)
            if value < 0:
                raise ValueError(f"expected {name} >= 0, got {value}")
            object.__setattr__(self, name, value)
        if self.disk_path is not None:
            if not isinstance(self.disk_path, (str, os.PathLike)):
                raise TypeError(f"expected disk_path as str or path, got {type(self.disk_path).__name__}")
            object.__setattr__(self, "disk_path", os.fspath(self.disk_path))
            if self.disk_path == "":
                raise ValueError("expected a non-empty disk_path (or None to disable the disk tier), got ''")
            if "\0" in self.disk_path:  # else os.open's bare "embedded null byte" when the store opens it
                raise ValueError(f"expected a disk_path without NUL characters, got {self.disk_path!r}")
            if self.disk_bytes == 0:
                raise ValueError(f"expected disk_bytes > 0 with disk_path={self.disk_path!r}, got disk_bytes=0")
        elif self.disk_bytes:
            raise ValueError(f"expected disk_path with disk_bytes={self.disk_bytes}, got disk_path=None")
        resolve_policy(self.policy)  # a built-in name or an importable EvictionPolicy subclass
        for name, allowed in (("host_codec", CODECS), ("disk_codec", CODECS), ("disk_backend", DISK_BACKENDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"expected {name} one of {list(allowed)}, got {getattr(self, name)!r}")
        lossy = {self.host_codec, self.disk_codec} - {"none"}
        if len(lossy) > 1:
            raise ValueError(f"expected host_codec and disk_codec to be the same lossy codec (or one of them 'none'), "
                             f"got {self.host_codec!r} and {self.disk_codec!r}: a block moving between them would "
                             "be quantized twice")
        for name in _COUNTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected {name} to be a positive int, got {value!r}")
        if not (self.device_bytes or self.host_bytes or self.disk_path):
            raise ValueError("expected at least one tier enabled (device_bytes, host_bytes or disk_path), "
                             "got all disabled")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "StoreConfig":
        """Build a config from ``TIERKV_*`` variables (see :meth:`describe`); keyword overrides win."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            if f.name in _COUNTS:
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"expected {f.metadata['env']} as an int, got {raw!r}") from None
            else:
                values[f.name] = raw
        values.update(overrides)
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """``(field, env variable, default, description)`` for every setting."""
        return [(f.name, f.metadata["env"], f.default, f.metadata["help"]) for f in fields(cls)]
