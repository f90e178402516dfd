"""The clipped policy-gradient loss shared by every algorithm, with the probability mask and the k3 KL term."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


def probability_mask(response_mask: torch.Tensor, token_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``mask_t = response_mask_t * 1[p_t < threshold]``: only uncertain tokens get gradient (SPO 1.4)."""
    return response_mask.bool() & (token_probs < threshold)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    delta = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(delta) - delta - 1


@dataclass
class LossOutput:
    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    clip_low_fraction: torch.Tensor
    clip_high_fraction: torch.Tensor
    ratio_mean: torch.Tensor


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    importance_weights: torch.Tensor | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    normaliser: float | None = None,
) -> LossOutput:
    """Clipped surrogate over [N, T] tokens.

    ``r_t = exp(clamp(logp_t - oldlogp_t, -10, 10))``;
    ``L_pg = sum_t mask_t * max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)) * w_t / norm`` where
    ``w_t`` are optional (truncated) importance weights for samples drawn by a different sampler, and ``norm``
    is the masked token count (``dapo``: token mean), per sequence (``grpo``: mean of sequence means), or
    ``N * max_completion_length`` (``dr_grpo``). ``normaliser`` overrides the count (for gradient accumulation
    over micro-batches of one batch). KL: ``beta * mean_seq sum_t mask_t k3_t``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    mask = mask.float()
    ratio = torch.exp((logp - old_logp).clamp(-10, 10))
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = torch.maximum(-advantages * ratio, -advantages * clipped)
    if importance_weights is not None:
        per_token = per_token * importance_weights
    n = logp.shape[0]
    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        pg = per_sequence.sum() / (normaliser if normaliser is not None else n)
    else:
        if normaliser is None:
            if loss_type == "dr_grpo":
                if max_completion_length is None:
                    raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
                normaliser = n * max_completion_length
            else:
                normaliser = mask.sum().clamp(min=1)
        pg = (per_token * mask).sum() / normaliser

    kl = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if beta and ref_logp is not None:
        kl = (k3_kl(logp, ref_logp) * mask).sum(dim=1).mean()
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
        stats = ((low * mask).sum() / count, (high * mask).sum() / count, (ratio * mask).sum() / count)
    return LossOutput(loss=pg + beta * kl, policy_loss=pg.detach(), kl=kl.detach(), clip_low_fraction=stats[0],
                      clip_high_fraction=stats[1], ratio_mean=stats[2])
