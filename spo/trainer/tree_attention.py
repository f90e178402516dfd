"""Attention over a packed prefix trie (``packing.TreeAttention``), as a transformers attention function.

Registered with ``AttentionInterface`` (every modern model dispatches through it) and selected on the model's config
for the learner's update (and kept for its backward passes, which recompute attention under gradient checkpointing).
Each query block of the trie attends to the keys of its own root-to-block path, gathered from the packed row
(post-RoPE, at each token's own position), with SDPA under the causal mask of that path. No mask over the whole
packed row is built or computed, so the attention costs what it would over each path. The model passes the index
to every layer as the ``packed_tree`` keyword; passes without it (padded rows) run plain SDPA with SDPA's masks. A
model whose layers do not route attention through the interface is refused (``check_every_layer_ran``), not run
with plain causal attention over the packed row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..rollout.attention import attention_selected

ATTENTION_NAME = "spo_packed_tree"


@dataclass
class PackedPass:
    """One forward pass over a packed row: its ``TreeAttention``, the layers that ran, the additive masks."""

    tree: object  # packing.TreeAttention
    layers: list[int] = field(default_factory=list)
    masks: dict = field(default_factory=dict)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """[S, 1, Q, K] 0 / dtype's minimum, made once per pass: every layer's attention holds the same tensor for
        its backward (a boolean mask would be converted, and kept, by each layer)."""
        if dtype not in self.masks:
            additive = torch.zeros(self.tree.mask.shape, dtype=dtype, device=self.tree.mask.device)
            self.masks[dtype] = additive.masked_fill_(~self.tree.mask, torch.finfo(dtype).min)[:, None]
        return self.masks[dtype]


def packed_tree_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, packed_tree=None, **kwargs):
    """query [1, Hq, N, D], key/value [1, Hkv, N, D] -> [1, N, Hq, D] (as transformers' attention functions)."""
    if packed_tree is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    tree = packed_tree.tree
    packed_tree.layers.append(module.layer_idx)
    heads, dim = query.shape[1], query.shape[3]
    gather = lambda states, index: states[0][:, index].transpose(0, 1)  # noqa: E731  [S, H, len, D]
    out, _ = sdpa_attention_forward(module, gather(query, tree.query_index), gather(key, tree.key_index),
                                    gather(value, tree.key_index), packed_tree.additive_mask(query.dtype),
                                    dropout=dropout, scaling=scaling, is_causal=False)
    return out.reshape(-1, heads, dim)[tree.output_index][None], None  # out: [S, Q, Hq, D]


AttentionInterface.register(ATTENTION_NAME, packed_tree_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def packed_tree_attention_on(model):
    """``packed_tree_attention`` selected on ``model`` (unwrapped) inside the block (nested uses are harmless)."""
    return attention_selected(model, ATTENTION_NAME)


def check_every_layer_ran(model, packed_pass: PackedPass) -> None:
    layers, ran = getattr(model.config, "num_hidden_layers", None), len(set(packed_pass.layers))
    if layers is not None and ran != layers:
        raise RuntimeError(f"{type(model).__name__}: {ran} of {layers} layers ran the packed attention; this model "
                           "does not dispatch attention through transformers' AttentionInterface: set "
                           "learner_packing: padded")
