"""Eviction policies: they decide the order in which blocks leave a tier, and nothing else."""
from __future__ import annotations

import importlib

from .base import EvictionPolicy
from .lru import LRUPolicy
from .relevance import RelevancePolicy

__all__ = ["EvictionPolicy", "LRUPolicy", "RelevancePolicy", "make_policy", "resolve_policy", "POLICY_NAMES"]

_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "relevance": RelevancePolicy}
POLICY_NAMES = tuple(_POLICIES)  # the built-in ones


def resolve_policy(name: str) -> type[EvictionPolicy]:
    """The policy class called ``name``: a built-in one (POLICY_NAMES), or a dotted path to an ``EvictionPolicy``
    subclass, ``"package.module:ClassName"`` or ``"package.module.ClassName"``, constructed with no arguments."""
    if isinstance(name, str) and name in _POLICIES:  # (an unhashable name would raise a bare TypeError here)
        return _POLICIES[name]
    if not isinstance(name, str) or ("." not in name and ":" not in name):
        raise ValueError(f"expected policy one of {sorted(_POLICIES)} or a dotted path 'package.module:ClassName' "
                         f"to an EvictionPolicy subclass, got {name!r}")
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raised while importing
        raise ValueError(f"expected policy {name!r} to name an importable module, got "
                         f"{type(exc).__name__}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise ValueError(f"expected policy {name!r} to name an EvictionPolicy subclass, got "
                         f"{'nothing' if cls is None else repr(cls)}")
    return cls


def make_policy(name: str) -> EvictionPolicy:
    """A fresh policy instance for one tier."""
    return resolve_policy(name)()
