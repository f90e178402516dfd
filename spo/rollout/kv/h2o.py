"""H2O (heavy hitters): keep the tokens with the largest accumulated attention plus a recent window.

Each slot accumulates the attention it receives, ``acc[s] = sum over queries t of p_t[s]`` (per KV head, averaged
over its query heads; prefill adds every prompt query's row). With budget B, the ``round(recent_ratio * B)``
newest tokens are always kept; a prompt longer than B keeps those plus the top ``B - recent`` by ``acc``; while
decoding, a row at its budget overwrites its lowest-``acc`` non-recent token with the new one.
"""

from __future__ import annotations

import torch

from .base import POS_INF, KVPolicy, compress_rows, forced, recent_mask


def h2o_scores(acc: torch.Tensor, pos: torch.Tensor, newest: torch.Tensor, recent: int) -> torch.Tensor:
    """Keep-priority: accumulated attention, ``+inf`` for the ``recent`` newest positions.
    acc [R, H, S], pos [R, H, S], newest [R] -> [R, H, S]."""
    return forced(acc, recent_mask(pos, newest, recent))


class H2O(KVPolicy):
    name = "h2o"
    scores_prefill = True
    scores_decoding = True
    stats = {"acc": 0.0}

    def __init__(self, budget: int | float, recent_ratio: float = 0.5):
        super().__init__(budget)
        if not 0.0 <= recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {recent_ratio}")
        self.recent_ratio = recent_ratio

    def _recent(self, cache) -> int:
        return round(self.recent_ratio * cache.decode_budget)

    def _scores(self, cache, layer: int, newest: torch.Tensor) -> torch.Tensor:
        rows = cache.rows
        return h2o_scores(cache.stats["acc"][layer, :rows], cache.pos[layer, :rows], newest, self._recent(cache))

    def observe(self, cache, layer: int, probs: torch.Tensor, query_pos: torch.Tensor) -> None:
        cache.stats["acc"][layer, : cache.rows, :, : probs.shape[-1]] += probs.sum(2)

    def after_prefill(self, cache) -> None:
        newest = cache.newest[: cache.rows]
        target = torch.full_like(newest, cache.decode_budget)
        for layer in range(cache.num_layers):
            compress_rows(cache, layer, self._scores(cache, layer, newest), target)

    def victims(self, cache, layer: int) -> torch.Tensor:
        # the token being written is not in the cache yet: protect the recent - 1 newest cached ones
        scores = self._scores(cache, layer, cache.newest[: cache.rows] - 1)
        return scores.masked_fill(~cache.valid[layer, : cache.rows, None, :], POS_INF).argmin(-1)
