"""SnapKV (prompt): score prompt tokens by the attention they get from the last ``window`` prompt queries,
smooth with a 1-D pool, keep the top ``B - window`` per KV head plus the window itself.

    score[s] = pool_k( sum_{i in last window queries} p_i[s] )

Decoding then appends without eviction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import KVPolicy, compress_rows, forced, recent_mask


def snapkv_scores(probs: torch.Tensor, kernel: int = 5, pooling: str = "avg") -> torch.Tensor:
    """probs [R, H, w, S] (attention of the observation window) -> pooled votes [R, H, S]. ``kernel`` is odd;
    the pool has stride 1 and keeps the length."""
    votes = probs.sum(2)
    rows, heads, length = votes.shape
    flat = votes.reshape(rows * heads, 1, length)
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    return pool(flat, kernel, stride=1, padding=kernel // 2).view(rows, heads, length)


class SnapKV(KVPolicy):
    name = "snapkv"
    phase = "prompt"
    scores_prefill = True
    stats = {"score": 0.0}

    def __init__(self, budget: int | float, window: int = 32, kernel: int = 5, pooling: str = "avg"):
        super().__init__(budget)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number, got {kernel}")
        if pooling not in ("avg", "max"):
            raise ValueError(f"pooling must be 'avg' or 'max', got {pooling!r}")
        self.window, self.kernel, self.pooling = window, kernel, pooling
        self.prefill_queries = window

    def observe(self, cache, layer: int, probs: torch.Tensor, query_pos: torch.Tensor) -> None:
        scores = snapkv_scores(probs, self.kernel, self.pooling)
        cache.stats["score"][layer, : cache.rows, :, : probs.shape[-1]] = scores

    def after_prefill(self, cache) -> None:
        rows, budget = cache.rows, cache.budget
        newest = cache.newest[:rows]
        target = torch.full_like(newest, budget)
        window = min(self.window, budget)
        for layer in range(cache.num_layers):
            scores = forced(cache.stats["score"][layer, :rows], recent_mask(cache.pos[layer, :rows], newest, window))
            compress_rows(cache, layer, scores, target)
