"""Routing attention through the rollout cache when a KV policy needs attention scores.

The cache sees keys and values but not queries. Rather than patching model classes or hooking ``q_proj`` and
re-applying RoPE, we register one attention function with transformers' ``AttentionInterface`` (the official
extension point every modern model dispatches through) and select it for the duration of a generation call.
It receives the post-RoPE queries and the keys the cache returned, hands the cache the KV-group-averaged
attention probabilities of the queries its policy scores, and then runs the standard SDPA kernel under the
layer's own validity mask (layers can hold different slots, e.g. WindowKV's pyramid budgets). The cache travels
to it as the ``rollout_cache`` keyword, which models pass through ``**kwargs`` to their attention function;
the generator checks that every layer reported in, so a model that does not route attention this way fails
loudly instead of silently skipping eviction.
"""

from __future__ import annotations

import contextlib

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTENTION_NAME = "spo_rollout"


def rollout_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      rollout_cache=None, **kwargs):
    if rollout_cache is None:
        raise RuntimeError(f"attention '{ATTENTION_NAME}' is only usable inside spo.rollout.Generator calls")
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    mask = rollout_cache.layer_mask(module.layer_idx, attention_mask)
    rollout_cache.observe(module.layer_idx, query, key, mask, scaling)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


AttentionInterface.register(ATTENTION_NAME, rollout_attention)


@contextlib.contextmanager
def attention_selected(model, name: str):
    """Select the registered attention function ``name`` on ``model``'s config inside the block, restoring the
    original after it."""
    config = model.config
    original = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = original


def scored_attention(model, enabled: bool):
    """``rollout_attention`` selected on ``model`` inside the block (when ``enabled``)."""
    return attention_selected(model, ATTENTION_NAME) if enabled else contextlib.nullcontext()
