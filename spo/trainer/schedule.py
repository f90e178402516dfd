"""The learning-rate schedule over the budget that ends the run.

With only ``max_steps``, the schedule is transformers' own, counted in steps. A run that a token or time budget
ends (``max_generated_tokens``, ``max_train_seconds``) has no known step count, so its schedule follows the run's
progress instead: the largest fraction spent of any of its budgets. "linear" then reaches zero where the run
ends, whichever budget ends it, instead of staying near its peak as it would over an unreachable ``max_steps``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def learning_rate_factor(kind: str, progress: float, warmup: float) -> float:
    """The multiplier of the peak learning rate after ``progress`` (0 to 1) of the run, with a linear warmup over
    its first ``warmup`` fraction; after it ``kind`` ("linear", "cosine" or "constant") decays to 0 at 1."""
    if progress < warmup:
        return progress / warmup
    if kind == "constant":
        return 1.0
    remaining = max(0.0, 1.0 - (progress - warmup) / (1.0 - warmup)) if warmup < 1 else 0.0
    if kind == "linear":
        return remaining
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (1.0 - remaining)))
    raise ValueError(f"lr_scheduler_type must be linear, cosine or constant, got {kind!r}")


def run_progress(step: int, max_steps: int, tokens: int, max_tokens: int | None, seconds: float,
                 max_seconds: float | None) -> float:
    """The fraction of the run done: the largest share spent of its step, token and time budgets (at most 1)."""
    shares = [step / max_steps]
    if max_tokens is not None:
        shares.append(tokens / max_tokens)
    if max_seconds is not None:
        shares.append(seconds / max_seconds)
    return min(1.0, max(shares))


def make_scheduler(args, optimizer: torch.optim.Optimizer, progress: Callable[[], float] | None):
    """The run's scheduler, stepped once per RL step; ``progress`` reads the run's progress (see ``run_progress``),
    which a budget-ended run's schedule follows."""
    if args.max_generated_tokens is None and args.max_train_seconds is None:
        from transformers import get_scheduler

        return get_scheduler(args.lr_scheduler_type, optimizer,
                             num_warmup_steps=math.ceil(args.warmup_ratio * args.max_steps),
                             num_training_steps=args.max_steps)
    if progress is None:
        raise ValueError("a run ended by max_generated_tokens or max_train_seconds needs its progress to schedule "
                         "the learning rate")
    kind, warmup = args.lr_scheduler_type, args.warmup_ratio
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: learning_rate_factor(kind, progress(), warmup))
