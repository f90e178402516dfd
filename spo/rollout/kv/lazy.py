"""LazyEviction (decoding): keep tokens whose attention recurs.

Per cached token (per KV head): TS, the last position whose query gave it attention >= alpha (initially its own
position), and MRI, its maximum recurrence interval (the largest gap between two such activations, 0 if none).
Importance at the newest position t:

    I = 2 sigmoid(-1 - (t - TS) / MRI) + [MRI > 0] * 2 sigmoid(1 - MRI)      (first term 0 when MRI = 0)

The budget B bounds the cache at every step, the lag window included: when a row is full it keeps its newest
W tokens plus the top ``B - 2W`` older ones by I, leaving room for the next W tokens, so evictions run every
W steps and the peak never exceeds B. A given W is capped at B // 2. By default W is 32 capped at B // 8: the
published W (the 80th percentile of observed recurrence intervals, 27-363) comes with budgets of thousands of
tokens, and at a budget of 70 tokens a window of 32 leaves 6 tokens to importance, a sliding window in all but
name (on the quickstart's arithmetic at 50% the sampler then drifted 0.7 nats per token from the learner).
"""

from __future__ import annotations

import torch

from .base import KVPolicy, compress_rows, forced, recent_mask


def lazy_importance(ts: torch.Tensor, mri: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """I for slots with statistics ts, mri [R, H, S] at newest position t [R] (formula in the module doc)."""
    elapsed = t[:, None, None].float() - ts
    ratio = torch.where(mri > 0, elapsed / mri.clamp_min(1e-6), torch.full_like(elapsed, float("inf")))
    return 2 * torch.sigmoid(-1 - ratio) + (mri > 0) * 2 * torch.sigmoid(1 - mri)


def update_recurrence(ts: torch.Tensor, mri: torch.Tensor, probs: torch.Tensor, t: torch.Tensor,
                      alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: slots whose attention from the query at position t [R] is >= alpha are activated.
    ts, mri, probs [R, H, S] -> new (ts, mri): MRI = max(MRI, t - TS), TS = t where activated."""
    now = t[:, None, None].float().expand_as(ts)
    active = probs >= alpha
    return torch.where(active, now, ts), torch.where(active, torch.maximum(mri, now - ts), mri)


def prefill_recurrence(ts: torch.Tensor, probs: torch.Tensor, query_pos: torch.Tensor,
                       alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TS and MRI after the prompt: ``probs`` [R, H, q, S] of queries at positions ``query_pos`` [R, q] (in
    order), ``ts`` [R, H, S] the slots' own positions. Same rule as ``update_recurrence`` applied query by query."""
    times = query_pos[:, None, :, None].float()
    active = probs >= alpha
    seen = torch.where(active, times, ts[:, :, None, :]).cummax(2).values  # TS after each query
    before = torch.cat([ts[:, :, None, :], seen[:, :, :-1]], dim=2)  # TS before each query
    gaps = torch.where(active, times - before, torch.zeros_like(before))
    return seen[:, :, -1], gaps.amax(2)


DEFAULT_WINDOW = 32


class LazyEviction(KVPolicy):
    name = "lazy"
    scores_prefill = True
    scores_decoding = True
    stats = {"ts": "pos", "mri": 0.0}

    def __init__(self, budget: int | float, alpha: float = 1e-4, window: int | None = None):
        super().__init__(budget)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.alpha, self.window = alpha, window

    def window_tokens(self, budget: int) -> int:
        """W for a cache of ``budget`` tokens (see the module doc)."""
        if self.window is None:
            return max(1, min(DEFAULT_WINDOW, budget // 8))
        return max(1, min(self.window, budget // 2))

    def observe(self, cache, layer: int, probs: torch.Tensor, query_pos: torch.Tensor) -> None:
        rows, length = cache.rows, probs.shape[-1]
        ts = cache.stats["ts"][layer, :rows, :, :length]
        mri = cache.stats["mri"][layer, :rows, :, :length]
        if probs.shape[2] == 1:
            new_ts, new_mri = update_recurrence(ts, mri, probs[:, :, 0], query_pos[:, 0], self.alpha)
        else:
            new_ts, new_mri = prefill_recurrence(ts, probs, query_pos, self.alpha)
        ts.copy_(new_ts)
        mri.copy_(new_mri)

    def before_step(self, cache) -> None:
        rows, budget = cache.rows, cache.decode_budget
        window = self.window_tokens(budget)
        full = cache.valid[0, :rows].sum(-1) >= budget
        if not bool(full.any()):
            return
        newest = cache.newest[:rows] - 1  # the token about to be written is not cached yet
        target = torch.where(full, budget - window, cache.capacity)
        for layer in range(cache.num_layers):
            importance = lazy_importance(cache.stats["ts"][layer, :rows], cache.stats["mri"][layer, :rows], newest)
            compress_rows(cache, layer, forced(importance, recent_mask(cache.pos[layer, :rows], newest, window)),
                          target)
