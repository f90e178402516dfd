"""A preallocated, slot-based KV cache that any Hugging Face causal LM can write into.

``RolloutCache`` subclasses ``transformers.cache_utils.Cache``: the model's attention layers call
``update(key, value, layer_idx)`` and attend over what it returns, under the 4-D boolean mask we pass to the
model (``mask()``). Layout, per layer: keys and values ``[rows, kv_heads, capacity, head_dim]`` (per KV head, so
grouped-query models do not store repeated heads), allocated once per call.

Every slot has a validity bit ``valid[layer, row, slot]`` and a logical position ``pos[layer, row, head, slot]``
(keys carry RoPE at their true position, so where a token sits does not matter to attention). A new token goes
to the row's first free slot while the row is under its budget, otherwise to the slot its policy evicts
(``KVPolicy.victims``). Bulk evictions gather the kept slots to the front of the row (``compact``). Finished rows
leave the batch by moving surviving tail rows into their place (``drop_rows``), which copies only as many rows
as finished; the attention then runs on the first ``rows`` rows and the first ``filled`` slots only (the
high-water mark of slots ever written), so decoding reads the part of the buffers in use, not their capacity.

Token accounting is logical (what a paged allocator would hold): ``peak_tokens`` is the largest number of valid
slots, summed over layers and rows, at any point of the call.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .kv.base import KVPolicy, group_attention


class RolloutCache(Cache):
    def __init__(self, policy: KVPolicy, *, budget: int | None, layers: int, rows: int, kv_heads: int,
                 head_dim: int, capacity: int, dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[])
        self.policy, self.budget = policy, budget
        self.decode_budget = policy.decode_budget(budget)
        self.num_layers, self.kv_heads, self.head_dim, self.capacity = layers, kv_heads, head_dim, capacity
        self.prompt_length = 0
        shape = (rows, kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.valid = torch.zeros(layers, rows, capacity, dtype=torch.bool, device=device)
        self.pos = torch.full((layers, rows, kv_heads, capacity), -1, dtype=torch.long, device=device)
        self.stats = {name: torch.zeros(layers, rows, kv_heads, capacity, dtype=torch.float32, device=device)
                      for name in policy.stats}
        self._fill = {name: torch.tensor(float(value), device=device)
                      for name, value in policy.stats.items() if value != "pos"}
        self.newest = torch.zeros(rows, dtype=torch.long, device=device)  # logical position of each row's newest token
        self.rows = rows
        self.filled = 0  # slots [filled, capacity) have never held a token in any layer or row
        self._heads = torch.arange(kv_heads, device=device)[None, :]
        self._slots: torch.Tensor | None = None  # [layers, rows] slot of this step's token, -1: overwrite a victim
        self._prefill: tuple[torch.Tensor, torch.Tensor] | None = None  # (query validity, query positions)
        self.observed = 0
        self.peak_tokens = 0
        self.bytes_per_token = kv_heads * head_dim * 2 * torch.empty(0, dtype=dtype).element_size()
        self.allocated_bytes = layers * rows * capacity * self.bytes_per_token

    # --- transformers' Cache interface -----------------------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.newest[: self.rows].max()) + 1 if self.rows else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows, k, v = self.rows, self.k[layer_idx], self.v[layer_idx]
        if self._prefill is not None:
            length = key_states.shape[2]
            k[:rows, :, :length] = key_states
            v[:rows, :, :length] = value_states
            return k[:rows, :, :length], v[:rows, :, :length]
        slot = self._slots[layer_idx][:, None].expand(rows, self.kv_heads)
        if (slot < 0).any():
            slot = torch.where(slot < 0, self.policy.victims(self, layer_idx), slot)
        index = (torch.arange(rows, device=slot.device)[:, None], self._heads, slot)
        # under autocast the projections come out in the autocast dtype; the cache keeps its own
        k.index_put_(index, key_states[:, :, 0].to(k.dtype))
        v.index_put_(index, value_states[:, :, 0].to(v.dtype))
        fresh = self.newest[:rows, None].expand(rows, self.kv_heads)
        self.pos[layer_idx].index_put_(index, fresh)
        for name, value in self.policy.stats.items():
            self.stats[name][layer_idx].index_put_(index, fresh.float() if value == "pos" else self._fill[name])
        return k[:rows, :, : self.filled], v[:rows, :, : self.filled]

    # --- the generator's side ----------------------------------------------------------------------------------------

    def mask(self, layer: int = 0) -> torch.Tensor:
        """Decoding mask [rows, 1, 1, filled] (a view: it follows ``valid``)."""
        return self.valid[layer, : self.rows, None, None, : self.filled]

    def begin_prefill(self, valid: torch.Tensor, positions: torch.Tensor) -> None:
        """The next forward pass encodes prompts [rows, T] left-padded (``valid`` false on padding)."""
        length = self.prompt_length = valid.shape[1]
        self.valid[:, : self.rows, :length] = valid
        slot_pos = positions.masked_fill(~valid, -1)[None, :, None, :]
        self.pos[:, : self.rows, :, :length] = slot_pos
        for name, value in self.policy.stats.items():
            self.stats[name][:, : self.rows, :, :length] = slot_pos.float() if value == "pos" else value
        self.newest[: self.rows] = positions[:, -1]
        self.filled = max(self.filled, length)
        self._prefill = (valid, positions)
        self._account()

    def end_prefill(self) -> None:
        self._prefill = None
        self.policy.after_prefill(self)
        self._account()

    def prepare_step(self) -> None:
        """Before a decoding forward pass (``newest`` already advanced): run the policy's bulk eviction, choose
        each row's slot for the new token and mark it valid, so ``mask()`` covers it."""
        self.policy.before_step(self)
        valid = self.valid[:, : self.rows]
        free = ~valid
        first = free.to(torch.uint8).argmax(-1, keepdim=True)  # [layers, rows, 1]
        room = free.any(-1, keepdim=True)
        if self.decode_budget is not None:
            room &= valid.sum(-1, keepdim=True) < self.decode_budget
        valid.scatter_(2, first, valid.gather(2, first) | room)
        self._slots = torch.where(room, first, -1).squeeze(-1)
        self.filled = max(self.filled, int(self._slots.max()) + 1)
        self.observed = 0
        self._account()

    def _account(self) -> None:
        self.peak_tokens = max(self.peak_tokens, int(self.valid[:, : self.rows].sum()))

    def compact(self, layer: int, index: torch.Tensor, kept: torch.Tensor) -> None:
        """Keep, per row and head, the slots ``index`` [rows, H, n] (gathered to slots 0..n-1); the first
        ``kept[r]`` of them are valid (see ``kv.base.select_slots``)."""
        rows, n = self.rows, index.shape[-1]
        full_index = index[..., None].expand(-1, -1, -1, self.head_dim)
        for buf in (self.k[layer], self.v[layer]):
            buf[:rows, :, :n] = buf[:rows].gather(2, full_index)
        for stat in (self.pos, *self.stats.values()):
            stat[layer, :rows, :, :n] = stat[layer, :rows].gather(2, index)
            stat[layer, :rows, :, n:] = -1 if stat is self.pos else 0
        self.valid[layer, :rows] = torch.arange(self.capacity, device=kept.device)[None, :] < kept[:, None]

    def drop_rows(self, keep: torch.Tensor) -> torch.Tensor:
        """Remove the rows where ``keep`` [rows] is false. Returns, for each new row, the old row it came from."""
        survivors = keep.nonzero().squeeze(1)
        n = survivors.numel()
        src = survivors[survivors >= n]
        dst = (~keep[:n]).nonzero().squeeze(1)
        if src.numel():
            for buf in (*self.k, *self.v):
                buf.index_copy_(0, dst, buf.index_select(0, src))
            for stat in (self.valid, self.pos, *self.stats.values()):
                stat.index_copy_(1, dst, stat.index_select(1, src))
            self.newest.index_copy_(0, dst, self.newest.index_select(0, src))
        self.rows = n
        order = torch.arange(n, device=keep.device)
        order[dst] = src
        return order

    def repeat_rows(self, times: torch.Tensor) -> None:
        """Row i becomes ``times[i]`` consecutive rows (forking each encoded prefix), in order."""
        source = torch.arange(self.rows, device=self.newest.device).repeat_interleave(times)
        n = source.numel()
        for buf in (*self.k, *self.v):
            buf[:n] = buf.index_select(0, source)
        for stat in (self.valid, self.pos, *self.stats.values()):
            stat[:, :n] = stat.index_select(1, source)
        self.newest[:n] = self.newest.index_select(0, source)
        self.rows = n
        self._account()

    # --- attention scores (called from spo.rollout.attention) ----------------------------------------------------

    def layer_mask(self, layer: int, model_mask: torch.Tensor) -> torch.Tensor:
        """The mask for one layer: the model-level mask during prefill, the layer's own validity afterwards
        (layers may hold different slots, e.g. WindowKV's pyramid budgets)."""
        return model_mask if self._prefill is not None else self.mask(layer)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor, scaling: float) -> None:
        """Hand the policy the KV-group-averaged attention probabilities of the scored queries."""
        self.observed += 1
        if self._prefill is not None:
            query_valid, query_pos = self._prefill
            last = self.policy.prefill_queries
            if last is not None:
                query, mask = query[:, :, -last:], mask[:, :, -last:]
                query_valid, query_pos = query_valid[:, -last:], query_pos[:, -last:]
            probs = group_attention(query, key, mask, scaling) * query_valid[:, None, :, None]
        elif self.policy.scores_decoding:
            probs = group_attention(query, key, mask, scaling)
            query_pos = self.newest[: self.rows, None]
        else:
            return
        self.policy.observe(self, layer, probs, query_pos)
