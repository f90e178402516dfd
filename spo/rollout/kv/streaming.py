"""StreamingLLM: keep the first ``n_sink`` tokens (attention sinks) plus the most recent window.

With budget B a row holds the sinks plus the newest ``B - n_sink`` tokens: a prompt longer than B is cut to that
after prefill, and while decoding each new token overwrites the oldest non-sink token.
"""

from __future__ import annotations

import torch

from .base import POS_INF, KVPolicy, compress_rows, forced


def streaming_scores(pos: torch.Tensor, n_sink: int) -> torch.Tensor:
    """Keep-priority of each slot: its position (newer first), ``+inf`` for sinks (position < n_sink).
    pos [..., S] long -> float [..., S]."""
    return forced(pos.float(), pos < n_sink)


class StreamingLLM(KVPolicy):
    name = "streaming"

    def __init__(self, budget: int | float, n_sink: int = 4):
        super().__init__(budget)
        if n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {n_sink}")
        self.n_sink = n_sink

    def after_prefill(self, cache) -> None:
        target = torch.full((cache.rows,), cache.decode_budget, device=cache.newest.device)
        for layer in range(cache.num_layers):
            compress_rows(cache, layer, streaming_scores(cache.pos[layer, : cache.rows], self.n_sink), target)

    def victims(self, cache, layer: int) -> torch.Tensor:
        scores = streaming_scores(cache.pos[layer, : cache.rows], self.n_sink)
        return scores.masked_fill(~cache.valid[layer, : cache.rows, None, :], POS_INF).argmin(-1)
