"""WindowKV (prompt): keep whole windows of consecutive prompt tokens, chosen per layer group, with pyramid
budgets.

Token scores come from the last ``window`` prompt queries (32 for the "max" strategy, 16 for "average"):
``score[s] = sum_i p_i[s]``. The prompt before that observation window is cut into segments of ``segment``
consecutive tokens (aligned to the window's start; the oldest segment may be shorter). A segment's score is the
mean of its ``top`` best token scores ("max") or the mean of all of them ("average"). The lowest-scoring
segments are dropped whole until the budget is met; the observation window is always kept.

Layers are grouped ``group_size`` at a time: the first layer of a group selects and the others reuse its
indices. Group budgets shrink linearly (a pyramid) from ``(1 + pyramid) * B`` to ``(1 - pyramid) * B``, so the
mean stays B; nothing is evicted when B covers every prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import POS_INF, KVPolicy, select_slots


def segment_scores(scores: torch.Tensor, segment: int = 8, top: int = 4, strategy: str = "max") -> torch.Tensor:
    """scores [R, H, M] of the tokens before the observation window -> each token's segment score [R, H, M].
    Segments are aligned to the right end; the leftmost one is padded with zeros (padding tokens score 0)."""
    rows, heads, length = scores.shape
    pad = (-length) % segment
    segments = F.pad(scores, (pad, 0)).view(rows, heads, -1, segment)
    if strategy == "max":
        value = segments.topk(min(top, segment), dim=-1).values.mean(-1)
    else:
        value = segments.mean(-1)
    return value.repeat_interleave(segment, dim=-1)[..., pad:]


def pyramid_budgets(budget: int, groups: int, pyramid: float) -> list[int]:
    """Per-group budgets falling linearly from (1 + pyramid) * budget to (1 - pyramid) * budget."""
    if groups == 1:
        return [budget]
    return [max(1, round(budget * (1 + pyramid * (1 - 2 * g / (groups - 1))))) for g in range(groups)]


class WindowKV(KVPolicy):
    name = "windowkv"
    phase = "prompt"
    scores_prefill = True
    stats = {"score": 0.0}

    def __init__(self, budget: int | float, strategy: str = "max", window: int | None = None, segment: int = 8,
                 top: int = 4, group_size: int = 8, pyramid: float = 0.5):
        super().__init__(budget)
        if strategy not in ("max", "average"):
            raise ValueError(f"strategy must be 'max' or 'average', got {strategy!r}")
        if not 0.0 <= pyramid < 1.0:
            raise ValueError(f"pyramid must be in [0, 1), got {pyramid}")
        for field, value in (("segment", segment), ("top", top), ("group_size", group_size)):
            if value < 1:
                raise ValueError(f"{field} must be >= 1, got {value}")
        self.strategy, self.segment, self.top = strategy, segment, top
        self.group_size, self.pyramid = group_size, pyramid
        self.window = window if window is not None else (32 if strategy == "max" else 16)
        self.prefill_queries = self.window

    def observe(self, cache, layer: int, probs: torch.Tensor, query_pos: torch.Tensor) -> None:
        if layer % self.group_size == 0:
            cache.stats["score"][layer, : cache.rows, :, : probs.shape[-1]] = probs.sum(2)

    def after_prefill(self, cache) -> None:
        rows, length = cache.rows, cache.prompt_length
        valid = cache.valid[0, :rows]
        if cache.budget >= int(valid.sum(-1).max()):
            return
        starts = range(0, cache.num_layers, self.group_size)
        for start, budget in zip(starts, pyramid_budgets(cache.budget, len(starts), self.pyramid)):
            window = min(self.window, budget)
            keep = window + (budget - window) // self.segment * self.segment
            scores = cache.stats["score"][start, :rows, :, :length]
            priority = torch.cat([segment_scores(scores[..., : length - window], self.segment, self.top, self.strategy),
                                  torch.full_like(scores[..., length - window:], POS_INF)], dim=-1)
            priority = F.pad(priority, (0, cache.capacity - length))
            index, kept = select_slots(priority, valid, torch.full((rows,), keep, device=valid.device))
            for layer in range(start, min(start + self.group_size, cache.num_layers)):
                cache.compact(layer, index, kept)
