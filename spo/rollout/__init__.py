"""Rollouts for RL post-training: batched sampling over any Hugging Face causal LM with a preallocated,
policy-compressed KV cache (``kv``) and prefix forking (``Generator.continue_from``)."""

from .generator import Generator, Rollout, RolloutBatch
from .kv import KVPolicy, available_policies, make_policy
from .sampling import SamplingParams

__all__ = ["Generator", "KVPolicy", "Rollout", "RolloutBatch", "SamplingParams", "available_policies", "make_policy"]
