"""Full cache: nothing is evicted. The correctness reference."""

from __future__ import annotations

from .base import KVPolicy


class FullCache(KVPolicy):
    name = "full"

    def __init__(self, budget: None = None):
        if budget is not None:
            raise ValueError(f"kv_budget must be None with kv_policy 'full' (it never evicts), got {budget!r}")
        super().__init__(None)
