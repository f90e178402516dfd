"""Partitions of a response into segments (SPO-chain), as pure functions over tensors.

A partition is given by its boundaries: sorted state indices ``c`` where the state is "prompt + response tokens
0..c" (``c = -1`` is the bare prompt). Segment k covers the tokens ``(c_{k-1}, c_k]``; the last segment runs from
``c_m + 1`` to the end. Tokens before the first boundary belong to no valued segment.
"""

from __future__ import annotations

import torch


def cutpoint_boundaries(token_probs: torch.Tensor, threshold: float = 0.9, interval: int = 5) -> torch.Tensor:
    """SPO-chain's cutpoint partition.

    ``low = {t : p_t < threshold}``; each low-probability token t puts a candidate boundary just before it,
    ``c = t - 1``; every ``interval``-th candidate is kept, starting with the first. So every segment after the
    first starts with a low-probability token. ``token_probs``: [T] probabilities of the sampled tokens (under
    logits / temperature). Returns a LongTensor of boundaries (possibly empty, possibly starting with -1).
    """
    if token_probs.dim() != 1:
        raise ValueError(f"token_probs must be 1-D [T], got shape {tuple(token_probs.shape)}")
    if interval < 1:
        raise ValueError(f"cutpoint interval must be >= 1, got {interval}")
    low = torch.nonzero(token_probs < threshold, as_tuple=False).flatten()
    return (low - 1)[::interval]


def fixed_boundaries(length: int, num_segments: int) -> torch.Tensor:
    """Ablation: ``num_segments`` segments of (nearly) equal length, the first valued from the bare prompt."""
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if length <= 0:
        return torch.tensor([-1])
    ends = torch.linspace(0, length, min(num_segments, length) + 1)[:-1].round().long()  # segment starts
    return torch.unique(ends - 1)


def newline_boundaries(token_ids: torch.Tensor, newline_token_mask: torch.Tensor) -> torch.Tensor:
    """Ablation: one segment per line (reasoning step). ``newline_token_mask[v]`` is True for vocabulary entries
    containing a newline; a boundary sits after each such token (except the last token), plus the bare prompt."""
    ends = torch.nonzero(newline_token_mask[token_ids[:-1]], as_tuple=False).flatten()
    return torch.cat([torch.tensor([-1], dtype=torch.long), ends])


def segment_advantages(boundaries: torch.Tensor, state_values: torch.Tensor, reward: float, length: int
                       ) -> torch.Tensor:
    """Per-token advantages of a chain partition.

    With values ``V(s_{c_k})`` at the boundaries and the trajectory's own reward R as terminal value:
    ``A_k = V(s_{c_k}) - V(s_{c_{k-1}})`` for the tokens of ``(c_{k-1}, c_k]``, ``R - V(s_{c_m})`` for the
    tokens after the last boundary, and 0 for tokens before the first boundary (there is no base value for
    them unless the first boundary is the bare prompt, ``c_1 = -1``).
    """
    if boundaries.numel() != state_values.numel():
        raise ValueError(f"{boundaries.numel()} boundaries but {state_values.numel()} state values")
    advantages = torch.zeros(length, dtype=torch.float32)
    if boundaries.numel() == 0:
        return advantages
    values = torch.cat([state_values.float(), torch.tensor([float(reward)])])
    edges = torch.cat([boundaries, torch.tensor([length - 1])])
    for k in range(boundaries.numel()):
        start, end = int(edges[k]) + 1, int(edges[k + 1]) + 1
        advantages[start:end] = values[k + 1] - values[k]
    return advantages
