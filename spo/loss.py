"""The clipped policy-gradient loss shared by every algorithm, with the probability mask and the k3 KL term.

The loss of one optimizer step is a sum over its micro-batches of ``sum(per-token terms) / normaliser``, where the
normaliser is fixed for the whole step (see ``LOSS_TYPES`` and ``spo.trainer.learner``), so that splitting a batch
into micro-batches, or over processes, gives the same loss and gradient as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# dapo: token mean over every process and accumulation step of the optimizer step (the global token count);
# bnpo: token mean over this process's micro-batches of the step (the local token count);
# grpo: mean over sequences of each sequence's token mean; dr_grpo: token sum / (sequences * max_completion_length)
LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")


def probability_mask(response_mask: torch.Tensor, token_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``mask_t = response_mask_t * 1[p_t < threshold]``: only uncertain tokens get gradient."""
    return response_mask.bool() & (token_probs < threshold)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(policy || reference): ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    delta = (ref_logp - logp).clamp(-20, 20)
    return torch.exp(delta) - delta - 1


def sequence_ratios(logp: torch.Tensor, behaviour_logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per sequence, the geometric mean over its ``tokens`` of the learner/sampler probability ratio:
    ``exp(mean_t (logp_t - behaviour_t))`` [N] (1 for a sequence without tokens)."""
    tokens = tokens.float()
    mean = ((logp - behaviour_logp) * tokens).sum(dim=1) / tokens.sum(dim=1).clamp(min=1)
    return torch.exp(mean.clamp(-20, 20))


def within_band(ratios: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Sequences whose ratio lies in ``[low, high]``: the others come from a sampler too far from the learner and
    are masked out whole (sequence-level rejection, as TRL's ``sequence_mask`` and Sparse-RL do)."""
    return (ratios >= low) & (ratios <= high)


def threshold_flips(logp: torch.Tensor, behaviour_logp: torch.Tensor, tokens: torch.Tensor, threshold: float) -> float:
    """Share of ``tokens`` whose probability lies on the other side of ``threshold`` under the learner than under the
    sampler: how often cutpoints and the probability mask, taken from the sampler, differ from the learner's."""
    flips = (logp.exp() < threshold) != (behaviour_logp.exp() < threshold)
    return flips[tokens].float().mean().item() if bool(tokens.any()) else 0.0


@dataclass
class LossOutput:
    loss: torch.Tensor  # this micro-batch's share of the step's loss (differentiable)
    kl_sum: torch.Tensor  # sum of k3 over the masked tokens
    clipped_low: torch.Tensor  # masked tokens clipped below (negative advantage)
    clipped_high: torch.Tensor  # masked tokens clipped above (positive advantage)
    ratio_sum: torch.Tensor  # sum of the ratio over the masked tokens
    tokens: torch.Tensor  # masked tokens


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    normaliser: float,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    importance_weights: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped surrogate over [N, T] tokens, KL added per token before normalising (as TRL does).

    ``r_t = exp(clamp(logp_t - oldlogp_t, -10, 10))``;
    ``l_t = max(-A_t r_t, -A_t clip(r_t, 1 - eps_low, 1 + eps_high)) * w_t + beta * k3_t``, with ``w_t`` optional
    (truncated) importance weights for samples drawn by a different sampler. The result is
    ``sum_t mask_t l_t / normaliser`` (``grpo``: ``sum_seq mean_t(mask_t l_t) / normaliser``); the caller passes
    the normaliser of the whole optimizer step (a token count, a sequence count, or sequences x max length).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    mask = mask.float()
    ratio = torch.exp((logp - old_logp).clamp(-10, 10))
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    per_token = torch.maximum(-advantages * ratio, -advantages * clipped)
    if importance_weights is not None:
        per_token = per_token * importance_weights
    kl = torch.zeros_like(logp)
    if beta and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        total = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    else:
        total = (per_token * mask).sum()
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
        stats = ((kl * mask).sum(), (low * mask).sum(), (high * mask).sum(), (ratio * mask).sum(), mask.sum())
    return LossOutput(total / normaliser, *stats)
