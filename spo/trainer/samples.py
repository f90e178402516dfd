"""Training samples and their collation into padded tensors: ``[left-padded prompt | right-padded completion]``."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Sample:
    """One (query, response) pair to train on, with everything the loss needs.

    ``behaviour_logprobs`` come from the sampler (possibly with a compressed KV cache); ``old_logprobs`` are the
    learner's full-attention log-probs before the update; both under logits / temperature.
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    behaviour_logprobs: torch.Tensor  # [T]
    advantages: torch.Tensor  # [T], token-level
    reward: float
    step: int
    group: int = 0  # which prompt of the step it answers
    old_logprobs: torch.Tensor | None = None  # [T]
    ref_logprobs: torch.Tensor | None = None  # [T]
    truncated: bool = False

    def to_state(self) -> dict:
        """Plain dict of lists/tensors/numbers (safe for ``torch.load(weights_only=True)``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: dict) -> "Sample":
        return cls(**state)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    position_ids: torch.Tensor  # [B, P + T]
    completion_mask: torch.Tensor  # [B, T] real completion tokens
    prompt_width: int

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device),
                     self.completion_mask.to(device), self.prompt_width)


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


def pad_rows(rows: list[torch.Tensor], width: int, value: float = 0.0) -> torch.Tensor:
    """Stack 1-D tensors right-padded to ``width``."""
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :row.numel()] = row.float()
    return out
