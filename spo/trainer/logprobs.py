"""Per-token log-probs of completions under a model. Only completion positions get logits, and the trainer calls
this per micro-batch, so [batch x length x vocab] logits never sit in memory whole."""

from __future__ import annotations

import torch

from .samples import Batch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)[target]`` for every position: [B, T, V], [B, T] -> [B, T] (float32)."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def completion_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False):
    """Log-probs [B, T] of each completion token given everything before it (and entropies when asked).
    Only the completion positions' logits are computed (``logits_to_keep``)."""
    width_c = batch.input_ids.shape[1] - batch.prompt_width
    outputs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=width_c + 1, use_cache=False)
    logits = outputs.logits[:, :-1]  # position P-1 predicts completion token 0
    targets = batch.input_ids[:, batch.prompt_width:]
    logp = token_logprobs(logits, targets, temperature)
    if with_entropy:
        with torch.no_grad():
            return logp, token_entropy(logits, temperature)
    return logp

