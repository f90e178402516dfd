"""KV cache policies behind one interface (``KVPolicy``), one module per policy. A policy registers itself by
subclassing ``KVPolicy`` with a ``name``; every module of this package is imported here, so adding a policy means
adding one file."""

from __future__ import annotations

import importlib
import pkgutil

from .base import KVPolicy, resolve_budget

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def available_policies() -> list[str]:
    return sorted(KVPolicy.registry)


def make_policy(policy: str | KVPolicy = "full", budget: int | float | None = None, **kwargs) -> KVPolicy:
    """A policy instance from its registry name (``budget`` and ``kwargs`` go to its constructor), or the given
    instance unchanged."""
    if isinstance(policy, KVPolicy):
        if budget is not None or kwargs:
            raise ValueError("pass kv_budget and kv_kwargs to the KVPolicy instance, not alongside it")
        return policy
    if policy not in KVPolicy.registry:
        raise ValueError(f"unknown kv_policy {policy!r}; valid: {', '.join(available_policies())}")
    cls = KVPolicy.registry[policy]
    try:
        return cls(budget, **kwargs)
    except TypeError as error:
        raise ValueError(f"bad kv_kwargs for kv_policy {policy!r}: {error}") from None


__all__ = ["KVPolicy", "available_policies", "make_policy", "resolve_budget"]
