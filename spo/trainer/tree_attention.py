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
# Below this many attention scores per layer (blocks x query heads x queries x keys; 32 MiB in float32), the CPU
# computes them with explicit products (``_small_blocks_attention``); above it, SDPA's memory-efficient kernels.
SMALL_BLOCKS_MAX_SCORES = 1 << 23


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
    query, key, value = gather(query, tree.query_index), gather(key, tree.key_index), gather(value, tree.key_index)
    mask = packed_tree.additive_mask(query.dtype)
    if query.device.type == "cpu" and query[..., :1].numel() * key.shape[2] <= SMALL_BLOCKS_MAX_SCORES:
        out = _small_blocks_attention(query, key, value, mask, dim ** -0.5 if scaling is None else scaling,
                                      dropout if module.training else 0.0)
    else:
        out, _ = sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                        is_causal=False)
    return out.reshape(-1, heads, dim)[tree.output_index][None], None  # out: [S, Q, Hq, D]


def _small_blocks_attention(query, key, value, mask, scaling: float, dropout: float) -> torch.Tensor:
    """Attention as explicit products, softmax in float32: query [S, Hq, Q, D], key/value [S, Hkv, K, D], additive
    mask [S, 1, Q, K] -> [S, Q, Hq, D]. On the CPU, for the small blocks of a packed row, SDPA's flash kernel under
    an explicit mask has a slow backward pass, in bf16 above all; these products are not slower in float32 and
    faster in bf16. They keep the [S, Hq, Q, K] probabilities, hence only below ``SMALL_BLOCKS_MAX_SCORES``."""
    blocks, heads, queries, dim = query.shape
    groups = heads // key.shape[1]  # grouped-query attention: each key head serves `groups` query heads
    query = query.view(blocks, key.shape[1], groups, queries, dim)
    scores = torch.matmul(query, key[:, :, None].transpose(-1, -2)) * scaling + mask[:, :, None]
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
    probabilities = torch.nn.functional.dropout(probabilities, p=dropout, training=dropout > 0)
    out = torch.matmul(probabilities, value[:, :, None])  # [S, Hkv, groups, Q, D]
    return out.view(blocks, heads, queries, dim).transpose(1, 2)


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
