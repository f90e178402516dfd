"""The interface every KV cache policy implements, the budget rule, and scoring helpers they share.

A policy decides which cached tokens survive. The cache (``spo.rollout.cache.RolloutCache``) owns the tensors
and calls the policy at four points:

* ``observe(cache, layer, probs, query_pos)`` with the attention probabilities of the scored queries
  (prefill: the last ``prefill_queries`` prompt queries, or all of them, when ``scores_prefill``; decoding: the
  newest query, when ``scores_decoding``), averaged over each KV group (``group_attention``).
* ``after_prefill(cache)`` once the prompt is encoded (compress the prompt).
* ``before_step(cache)`` before each decoding forward pass (bulk eviction).
* ``victims(cache, layer)`` when a row is at its budget and the new token must overwrite a slot.

Scores are kept per KV head (grouped-query attention: never per query head). Slots hold keys with RoPE already
applied at their true positions, so slot order is irrelevant to attention; ``cache.pos`` keeps each slot's
logical position.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..cache import RolloutCache

NEG_INF = float("-inf")
POS_INF = float("inf")


def resolve_budget(budget: int | float | None, length: int, kept: int = 0) -> int | None:
    """Token budget from ``kv_budget``: None means no limit; an int (or an integral float > 1) is a number of
    tokens; a float in (0, 1] is ``kept`` tokens plus that fraction of ``length``, rounded up."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"kv_budget must be an int (tokens) or a float fraction in (0, 1], got {budget!r}")
    if isinstance(budget, float) and 0.0 < budget <= 1.0:
        return max(1, kept + math.ceil(budget * length))
    if budget >= 1 and float(budget).is_integer():
        return int(budget)
    raise ValueError(f"kv_budget must be a positive number of tokens or a fraction in (0, 1], got {budget!r}")


def check_budget(budget: int | float | None) -> None:
    """Fail early, with the field's name, on a budget ``resolve_budget`` would reject."""
    resolve_budget(budget, 1)


def select_slots(scores: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots to keep per row and KV head: the ``keep[r]`` best-scoring valid slots.

    scores [R, H, S] (``+inf`` forces a slot in), valid [R, S] bool, keep [R] long.
    Returns (index [R, H, n] with n = max kept, kept [R] = min(keep, valid count)). For every row the first
    ``kept[r]`` entries of each head are valid slots, the rest point at invalid ones, so after gathering, validity
    is the same prefix for all heads of a row.
    """
    kept = torch.minimum(keep, valid.sum(-1))
    n = int(kept.max()) if kept.numel() else 0
    masked = scores.masked_fill(~valid[:, None, :], NEG_INF)
    index = masked.topk(n, dim=-1, sorted=True).indices
    return index, kept


def forced(scores: torch.Tensor, force: torch.Tensor) -> torch.Tensor:
    """``scores`` with ``+inf`` wherever ``force`` is true (slots that must survive)."""
    return scores.masked_fill(force, POS_INF)


def recent_mask(pos: torch.Tensor, newest: torch.Tensor, window: int) -> torch.Tensor:
    """Slots holding one of the ``window`` most recent positions: ``pos > newest - window``.
    pos [R, H, S], newest [R] -> bool [R, H, S]."""
    return pos > (newest - window)[:, None, None]


def group_attention(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention probabilities averaged over each KV group (fp32):

        p[r, h, i, s] = 1/g * sum_{j in group h} softmax_s(scaling * q[r, j, i] . k[r, h, s] | mask[r, i, s])

    query [R, Hq, q, D], key [R, Hkv, S, D], mask bool [R, 1, q, S] (true = attend) -> [R, Hkv, q, S].
    Query head j belongs to KV head j // g, g = Hq / Hkv (Hugging Face's ``repeat_kv`` order).
    """
    rows, q_heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = q_heads // kv_heads
    logits = query.float().reshape(rows, kv_heads, groups * length, dim) @ key.float().transpose(-1, -2)
    logits = logits.view(rows, kv_heads, groups, length, -1) * scaling
    logits = logits.masked_fill(~mask[:, :, None], NEG_INF)
    return logits.softmax(-1).nan_to_num_(0.0).mean(2)


def compress_rows(cache: RolloutCache, layer: int, scores: torch.Tensor, target: torch.Tensor) -> None:
    """Compact ``layer`` so that each row keeps at most ``target[r]`` slots, the best by ``scores``
    [rows, H, capacity]. Does nothing when every row already fits."""
    valid = cache.valid[layer, : cache.rows]
    if bool((valid.sum(-1) <= target).all()):
        return
    index, kept = select_slots(scores, valid, target)
    cache.compact(layer, index, kept)


class KVPolicy:
    """Base class. Subclasses set ``name`` (the registry key) and override the hooks they need.

    ``phase`` says what a fractional budget is a fraction of: "prompt" policies compress the prompt once
    (budget = fraction of the longest prompt), "decode" policies bound the cache while decoding (budget =
    fraction of prompt + max_new_tokens). ``stats`` names the per-slot float statistics the cache keeps for the
    policy, with the value a freshly written slot gets (a float, or "pos" for the slot's own position).
    """

    name: ClassVar[str] = ""
    phase: ClassVar[str] = "decode"
    scores_prefill: ClassVar[bool] = False
    scores_decoding: ClassVar[bool] = False
    prefill_queries: int | None = None  # trailing prompt queries scored at prefill; None = all
    stats: ClassVar[dict[str, float | str]] = {}

    registry: ClassVar[dict[str, type[KVPolicy]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            KVPolicy.registry[cls.name] = cls

    def __init__(self, budget: int | float | None = None):
        check_budget(budget)
        if budget is None and self.name != "full":
            raise ValueError(f"kv_policy {self.name!r} needs kv_budget (tokens, or a fraction in (0, 1])")
        self.budget = budget

    @property
    def needs_attention(self) -> bool:
        """Whether the cache must see attention probabilities (then rollouts route attention through
        ``spo.rollout.attention``)."""
        return self.scores_prefill or self.scores_decoding

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget!r})"

    # --- sizes ---------------------------------------------------------------------------------------------------

    def budget_tokens(self, prefill_len: int, max_new_tokens: int, rollout: tuple[int, int] | None = None
                      ) -> int | None:
        """The budget in tokens for a call that encodes prefixes of up to ``prefill_len`` tokens and adds up to
        ``max_new_tokens``. A fraction of a prompt policy's budget is a fraction of the prefix. A decoding
        policy's fraction is of the completion, on top of the prompt: reasoning prompts are short and the cache
        grows while decoding, and a budget below the prompt would drop part of the question before the first
        token. ``rollout``: (longest prompt, whole completion limit) when the call continues partial completions,
        so a continuation is sampled with the cache its rollout had, not one squeezed into its own length."""
        if self.phase == "prompt":
            return resolve_budget(self.budget, prefill_len)
        prompt_len, completion_len = rollout or (prefill_len, max_new_tokens)
        return resolve_budget(self.budget, completion_len, kept=prompt_len)

    def decode_budget(self, budget: int | None) -> int | None:
        """Most tokens a row may hold while decoding (None: unbounded)."""
        return budget if self.phase == "decode" else None

    # --- hooks -----------------------------------------------------------------------------------------------------

    def observe(self, cache: RolloutCache, layer: int, probs: torch.Tensor, query_pos: torch.Tensor) -> None:
        """Attention probabilities [R, H, q, S] of the scored queries at logical positions ``query_pos`` [R, q]."""

    def after_prefill(self, cache: RolloutCache) -> None:
        """Compress the encoded prompt (every layer)."""

    def before_step(self, cache: RolloutCache) -> None:
        """Evict in bulk before the next token is written."""

    def victims(self, cache: RolloutCache, layer: int) -> torch.Tensor:
        """Slot [R, H] to overwrite in rows that are at their budget."""
        raise RuntimeError(f"KV policy {self.name!r} has no room left for a new token")
