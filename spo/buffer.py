"""Selective sample buffer (docs/ALGORITHMS.md section 8).

When every sample of a group gets the same reward the group's advantages vanish. The buffer keeps samples with
``|A| > eps`` and, when a batch's share of samples with non-zero advantage falls under a target, re-injects cached
ones drawn with probability proportional to ``|A|^alpha``, evicting entries older than ``max_age`` steps. Samples
keep their behaviour log-probs, so the importance ratio keeps the update correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BufferEntry:
    sample: Any
    score: float  # |A| of the sample (for token-level advantages, the mean over the tokens that get gradient)
    step: int  # the step that generated it


class SelectiveSampleBuffer:
    def __init__(self, capacity: int = 512, eps: float = 1e-6, alpha: float = 1.0, max_age: int = 8,
                 target_fraction: float = 0.6, seed: int = 0):
        if capacity < 1 or max_age < 0 or not 0 <= target_fraction <= 1 or alpha < 0:
            raise ValueError("buffer needs capacity >= 1, max_age >= 0, alpha >= 0 and 0 <= target_fraction <= 1")
        self.capacity, self.eps, self.alpha = capacity, eps, alpha
        self.max_age, self.target_fraction = max_age, target_fraction
        self.entries: list[BufferEntry] = []
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, samples: list, scores: list[float], step: int) -> int:
        """Cache the samples whose |A| exceeds eps; the buffer keeps the newest ``capacity`` entries.
        Returns how many were added."""
        added = [BufferEntry(s, float(a), step) for s, a in zip(samples, scores) if abs(a) > self.eps]
        self.entries.extend(added)
        if len(self.entries) > self.capacity:
            self.entries = self.entries[-self.capacity:]
        return len(added)

    def evict_old(self, step: int) -> int:
        before = len(self.entries)
        self.entries = [e for e in self.entries if step - e.step <= self.max_age]
        return before - len(self.entries)

    def needed(self, effective: int, total: int) -> int:
        """How many samples to re-inject into a batch of ``total`` with ``effective`` non-zero-advantage ones so the
        effective share reaches the target (replacing zero-advantage samples)."""
        if total == 0:
            return 0
        want = int(torch.tensor(self.target_fraction * total).ceil().item())
        return max(0, min(want - effective, total - effective))

    def draw(self, count: int, step: int) -> list[BufferEntry]:
        """Draw up to ``count`` distinct entries with probability ∝ |A|^alpha after evicting stale ones; drawn
        entries leave the buffer."""
        self.evict_old(step)
        count = min(count, len(self.entries))
        if count <= 0:
            return []
        weights = torch.tensor([abs(e.score) ** self.alpha for e in self.entries], dtype=torch.float64)
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        picked = torch.multinomial(weights, count, replacement=False, generator=self.generator).tolist()
        chosen = [self.entries[i] for i in picked]
        keep = set(range(len(self.entries))) - set(picked)
        self.entries = [self.entries[i] for i in sorted(keep)]
        return chosen

    def state_dict(self) -> dict:
        return {"entries": [(e.sample, e.score, e.step) for e in self.entries],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [BufferEntry(*entry) for entry in state["entries"]]
        self.generator.set_state(state["generator"])
