"""The typed seam between algorithms and the learner.

An algorithm turns prompts into ``Sample``s (one per trained completion, token-level advantages as computed by the
algorithm); ``train_batch`` turns them into the ``TrainBatch`` the learner consumes: final per-token advantages
(whitened when asked) and the mask of the tokens that get gradient (the probability mask applied).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from ..advantages import whiten
from ..loss import probability_mask


@dataclass
class Sample:
    """One (query, response) pair to train on.

    ``behaviour_logprobs`` come from the sampler (possibly a compressed KV cache or a bf16 copy), under the
    distribution it drew from (top-k / top-p truncation included); ``old_logprobs``
    are set for replayed samples, whose behaviour policy is an earlier one; both under logits / temperature.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: torch.Tensor  # [T]
    advantages: torch.Tensor  # [T], token-level
    reward: float
    step: int  # the training step that generated it
    dataset_row: int = 0  # the training data set row whose prompt it answers
    old_logprobs: torch.Tensor | None = None  # [T]
    truncated: bool = False
    # [T] the model's own log-probs of the tokens (no top-k / top-p truncation), for the probability mask; None:
    # the same as behaviour_logprobs (nothing was truncated)
    model_logprobs: torch.Tensor | None = None

    @property
    def token_logprobs(self) -> torch.Tensor:
        return self.behaviour_logprobs if self.model_logprobs is None else self.model_logprobs

    def to_state(self) -> dict:
        """Plain dict of lists/tensors/numbers (safe for ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> "Sample":
        return cls(**state)


def sampled_logprobs(sampled) -> dict:
    """``Sample`` log-prob fields of a rollout (or tree node): its behaviour log-probs, and the model's own where
    the sampler truncated the distribution."""
    model = sampled.logprobs if sampled.truncated_logprobs is not None else None
    return {"behaviour_logprobs": sampled.behaviour_logprobs, "model_logprobs": model}


@dataclass
class TrainBatch:
    """What the learner trains on: samples with final advantages and loss masks, aligned row by row."""

    samples: list[Sample]
    advantages: list[torch.Tensor]  # [T_i] per sample, final (whitened when asked)
    loss_masks: list[torch.Tensor]  # bool [T_i]: tokens that get gradient

    def __len__(self) -> int:
        return len(self.samples)


def loss_mask(sample: Sample, use_probability_mask: bool, threshold: float, mask_truncated: bool) -> torch.Tensor:
    mask = torch.ones(len(sample.completion_ids), dtype=torch.bool)
    if use_probability_mask:
        mask = probability_mask(mask, sample.token_logprobs.float().exp(), threshold)
    if mask_truncated and sample.truncated:
        mask = torch.zeros_like(mask)
    return mask


def buffer_score(sample: Sample, args) -> float:
    """The sample buffer's score of a sample: mean |A| over the tokens that get gradient (0 when none does). A
    sample whose only nonzero advantages sit on masked tokens would be replayed with no gradient."""
    mask = loss_mask(sample, args.probability_mask, args.probability_threshold, args.mask_truncated_completions)
    trained = sample.advantages.float().abs()[mask]
    return float(trained.mean()) if trained.numel() else 0.0


def train_batch(samples: list[Sample], args, sum_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                ) -> TrainBatch:
    """Masks and final advantages for ``samples`` under the trainer settings ``args``. Whitening statistics are
    taken over the trained tokens of every process (``sum_over_processes`` all-reduces a small tensor)."""
    masks = [loss_mask(s, args.probability_mask, args.probability_threshold, args.mask_truncated_completions)
             for s in samples]
    advantages = [s.advantages.float() for s in samples]
    if args.whiten_advantages:
        advantages = whiten_rows(advantages, masks, sum_over_processes)
    return TrainBatch(samples, advantages, masks)


def whiten_rows(rows: list[torch.Tensor], masks: list[torch.Tensor],
                sum_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> list[torch.Tensor]:
    """``spo.advantages.whiten`` over the masked tokens of all rows (of all processes), split back into rows."""
    if not rows:
        sum_over_processes(torch.zeros(3, dtype=torch.float64))  # every process takes part in the reduction
        return rows
    flat = whiten(torch.cat(rows), torch.cat(masks), sum_over_processes=sum_over_processes)
    return list(flat.split([r.numel() for r in rows]))


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    position_ids: torch.Tensor  # [B, P + T]
    completion_mask: torch.Tensor  # [B, T] real completion tokens
    prompt_width: int

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.completion_mask.to(device), self.prompt_width)

    def select(self, rows: list[int]) -> "Batch":
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)
        pick = lambda t: t.index_select(0, index)  # noqa: E731
        return Batch(pick(self.input_ids), pick(self.attention_mask), pick(self.position_ids),
                     pick(self.completion_mask), self.prompt_width)


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    """Pad prompts on the left and completions on the right so every completion starts at column P."""
    width_p = max(len(p) for p in prompts)
    width_c = max(1, max(len(c) for c in completions))
    n = len(prompts)
    input_ids = torch.full((n, width_p + width_c), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width_p + width_c), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, width_p - len(p):width_p] = torch.tensor(p, dtype=torch.long)
        attention[i, width_p - len(p):width_p] = 1
        if c:
            input_ids[i, width_p:width_p + len(c)] = torch.tensor(c, dtype=torch.long)
            attention[i, width_p:width_p + len(c)] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return Batch(input_ids, attention, position_ids, attention[:, width_p:].clone(), width_p)


def pad_rows(rows: list[torch.Tensor], width: int, value: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Stack 1-D tensors right-padded to ``width``."""
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :row.numel()] = row.to(dtype)
    return out
