"""Sampling parameters and the per-step sampler (pure functions over a [rows, vocab] logits tensor)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to sample. ``greedy`` takes the argmax (log-probs then use temperature 1); otherwise tokens are drawn
    from softmax(logits / temperature) restricted to the ``top_k`` best tokens (0: all) and the smallest set whose
    probability reaches ``top_p``. Generation stops at an EOS token, at the first of the ``stop`` strings, or after
    ``max_new_tokens``. ``seed`` makes sampling reproducible."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def logprob_temperature(self) -> float:
        return 1.0 if self.greedy else self.temperature


def filter_logits(scaled: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """``scaled`` logits [R, V] with everything outside the top-k / nucleus set to -inf. The nucleus keeps the
    smallest prefix of tokens sorted by probability whose mass reaches top_p (always at least one token)."""
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= top_p  # the mass before this token already reaches top_p
        scaled = scaled.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return scaled


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` [R, V] by inversion: the first index whose cumulative probability exceeds
    u ~ U(0, 1) * total (much faster than ``torch.multinomial`` over a large vocabulary on CPU)."""
    cumulative = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=probs.dtype)
    tokens = (cumulative < u * cumulative[:, -1:]).sum(-1)
    # rounding can land past the last token with mass; step back onto it
    return torch.minimum(tokens, (probs > 0).cumsum(-1).argmax(-1))


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next tokens [R], their model log-probs [R] (log softmax(logits / T)[token], T the sampling temperature, 1
    for greedy) and their behaviour log-probs [R]: under the distribution the token was drawn from, after top-k /
    top-p truncation (the same tensor as the model log-probs when nothing is truncated, and for greedy)."""
    scaled = logits.float() / params.logprob_temperature
    if params.greedy:
        tokens = scaled.argmax(-1)
        filtered = scaled
    else:
        filtered = filter_logits(scaled, params.top_k, params.top_p)
        tokens = draw(filtered.softmax(-1), generator)
    model = scaled.gather(1, tokens[:, None]).squeeze(1) - scaled.logsumexp(-1)
    if filtered is scaled:
        return tokens, model, model
    return tokens, model, filtered.gather(1, tokens[:, None]).squeeze(1) - filtered.logsumexp(-1)
