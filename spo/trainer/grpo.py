"""GRPO and its variants (RLOO, Dr. GRPO): one advantage per sample from its group's rewards, on every token."""

from __future__ import annotations

import math

import torch

from ..advantages import dr_grpo_advantages, grpo_advantages, rloo_advantages
from .base import RLTrainer
from .config import GRPOConfig
from .samples import Sample, sampled_logprobs


def group_advantages(rewards: torch.Tensor, group_size: int, estimator: str, scale_rewards: bool = True
                     ) -> torch.Tensor:
    """Advantages [N] for rewards [N] ordered group by group; NaN rewards (skipped samples) are left out of
    their group's statistics and get advantage NaN."""
    functions = {"grpo": lambda r, n: grpo_advantages(r, n, scale=scale_rewards), "rloo": rloo_advantages,
                 "dr_grpo": dr_grpo_advantages}
    if estimator not in functions:
        raise ValueError(f"advantage_estimator must be one of {', '.join(functions)}, got {estimator!r}")
    out = torch.full_like(rewards, float("nan"))
    for start in range(0, rewards.numel(), group_size):
        group = rewards[start:start + group_size]
        valid = ~torch.isnan(group)
        count = int(valid.sum())
        if count >= (2 if estimator == "rloo" else 1):
            values = out[start:start + group_size]
            values[valid] = functions[estimator](group[valid], count)
    return out


class GRPOTrainer(RLTrainer):
    """Group-relative policy optimisation on the shared machinery (``args.advantage_estimator`` picks GRPO,
    RLOO or Dr. GRPO)."""

    algorithm = "grpo"

    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, **kwargs):
        super().__init__(model, reward_funcs, args or GRPOConfig(), **kwargs)

    def make_samples(self, rows: list[int], step: int) -> list[Sample]:
        rollouts, rewards = self.generate_groups(rows, step)
        advantages = group_advantages(rewards, self.args.num_generations, self.args.advantage_estimator,
                                      self.args.scale_rewards)
        samples = []
        for rollout, reward, advantage in zip(rollouts, rewards.tolist(), advantages.tolist()):
            if math.isnan(advantage) or not rollout.completion_ids:
                continue
            samples.append(Sample(
                prompt_ids=rollout.prompt_ids, completion_ids=rollout.completion_ids,
                **sampled_logprobs(rollout), reward=reward, step=step, dataset_row=rows[rollout.input_index],
                advantages=torch.full((len(rollout.completion_ids),), advantage),
                truncated=rollout.cut_off))
        self._metric("spo/mean_abs_advantage", float(advantages.nan_to_num().abs().mean()))
        return samples
