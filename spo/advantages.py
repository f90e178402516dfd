"""Advantages, as pure functions over tensors: group baselines (GRPO, Dr. GRPO, RLOO) and whitening."""

from __future__ import annotations

import torch

EPS = 1e-8


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    return rewards.float().view(-1, group_size)


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO: ``A_i = (r_i - mean_group) / (std_group + 1e-8)``; with ``scale=False`` this is Dr. GRPO
    (no std division). ``rewards``: [N] ordered group by group."""
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + EPS)
    return centred.flatten()


def dr_grpo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO: ``A_i = r_i - mean_group``."""
    return grpo_advantages(rewards, group_size, scale=False)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: ``A_i = r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean_group)``."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per group")
    groups = _grouped(rewards, group_size)
    return (group_size / (group_size - 1) * (groups - groups.mean(dim=1, keepdim=True))).flatten()


def whiten(advantages: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           sum_over_processes=lambda moments: moments) -> torch.Tensor:
    """``(A - mean) / sqrt(var + 1e-8)`` with mean and variance taken over the tokens where ``mask`` is set
    (the probability mask, so tokens that get no gradient do not move the statistics). ``sum_over_processes``
    sums the moments ``[count, sum, sum of squares]`` over processes (an all-reduce), for statistics over a
    batch split across them."""
    weights = mask.double()
    values = advantages.double()
    moments = sum_over_processes(torch.stack([weights.sum(), (values * weights).sum(),
                                              (values * values * weights).sum()]))
    count, total, squares = moments.tolist()
    if count < 1:
        return advantages * 0
    mean = total / count
    variance = max(0.0, squares / count - mean * mean)
    if count > 1:  # unbiased, as the published code
        variance *= count / (count - 1)
    whitened = ((values - mean) / (variance + EPS) ** 0.5).to(advantages.dtype)
    return whitened if shift_mean else whitened + mean
