"""Per-token log-probs of completions under a model, computed only where they are needed.

``completion_logprobs`` runs one left/right-padded row per sample. ``packed_logprobs`` runs a ``PackedBatch`` (see
``packing.py``): shared prefixes once, no padding, logits only at the positions that predict a completion token.
There the vocabulary head is evaluated in chunks of positions: a chunk's logits exist only while its log-sum-exp
is taken (and are recomputed in the backward pass), so ``positions x vocabulary`` logits never materialise whole.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .packing import PackedBatch
from .samples import Batch
from .tree_attention import PackedPass, check_every_layer_ran, packed_tree_attention_on

# logits per chunk of the vocabulary head (64 Mi float32 elements = 256 MiB); smaller heads run in one piece
HEAD_CHUNK_ELEMENTS = 1 << 26


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / T)[target]`` for every position: [B, T, V], [B, T] -> [B, T] (float32)."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def completion_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False):
    """Log-probs [B, T] of each completion token given everything before it (and entropies when asked).
    Only the completion positions' logits are computed (``logits_to_keep``)."""
    width_c = batch.input_ids.shape[1] - batch.prompt_width
    outputs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, logits_to_keep=width_c + 1, use_cache=False)
    logits = outputs.logits[:, :-1]  # position P-1 predicts completion token 0
    targets = batch.input_ids[:, batch.prompt_width:]
    logp = token_logprobs(logits, targets, temperature)
    if with_entropy:
        with torch.no_grad():
            return logp, token_entropy(logits, temperature)
    return logp


def batch_logprobs(model, batch: Batch | PackedBatch, temperature: float, with_entropy: bool = False):
    """``packed_logprobs`` or ``completion_logprobs``, whichever ``batch`` is."""
    if isinstance(batch, PackedBatch):
        return packed_logprobs(model, batch, temperature, with_entropy=with_entropy)
    return completion_logprobs(model, batch, temperature, with_entropy=with_entropy)


def unwrapped_model(model):
    """The model inside DDP / DeepSpeed wrappers (FSDP2 wraps in place)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def packing_unsupported(model) -> str | None:
    """Why ``model`` cannot run packed sequences (None: it can). The packed attention is plain scaled dot-product
    attention over each token's path: no sliding window, no soft-capped attention logits."""
    config = unwrapped_model(model).config
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "the model uses sliding-window attention"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return "the model uses sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps its attention logits"
    return None


def packed_logprobs(model, packed: PackedBatch, temperature: float, with_entropy: bool = False,
                    chunk_elements: int = HEAD_CHUNK_ELEMENTS):
    """Log-probs [B, T] of each completion token of a packed batch (0 at padding), and entropies [B, T] when
    asked. ``model`` is called whole (so DDP, FSDP and ZeRO hooks run)."""
    device = packed.input_ids.device
    real = packed.completion_mask.bool()
    keep, slot = torch.unique(packed.predictors[real], sorted=True, return_inverse=True)  # positions with logits
    targets = packed.targets.to(device)[real]
    inner = unwrapped_model(model)
    head = _ChunkedHead(inner, slot, targets, temperature, with_entropy, chunk_elements)
    packed_pass = PackedPass(packed.attention)
    with head.installed(), packed_tree_attention_on(inner):
        outputs = model(input_ids=packed.input_ids, position_ids=packed.position_ids, logits_to_keep=keep,
                        use_cache=False, packed_tree=packed_pass)
    check_every_layer_ran(inner, packed_pass)
    if head.active:
        flat, entropy = outputs.logits[0], head.entropy
    else:  # a head we do not replace (an adapter on it, soft-capped logits): the model's own logits
        logits = outputs.logits[0]
        flat = token_logprobs(logits[slot], targets, temperature)
        with torch.no_grad():
            entropy = token_entropy(logits, temperature) if with_entropy else None
    logp = torch.zeros(real.shape, dtype=flat.dtype, device=device).masked_scatter(real, flat)
    if not with_entropy:
        return logp
    per_token = torch.zeros(real.shape, device=device).masked_scatter(real, entropy[slot].float())
    return logp, per_token


class _ChunkedHead:
    """Replaces the vocabulary head's ``forward`` (on the instance, for one call) by one that returns the log-probs
    of the wanted (position, target) pairs, computed in chunks of positions."""

    def __init__(self, model, slot, targets, temperature, with_entropy, chunk_elements):
        self.module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        config = getattr(model, "config", None)
        self.active = type(self.module) is torch.nn.Linear and not getattr(config, "final_logit_softcapping", None)
        self.slot, self.targets, self.temperature = slot, targets, temperature
        self.with_entropy, self.chunk_elements = with_entropy, chunk_elements
        self.entropy = None

    @contextlib.contextmanager
    def installed(self):
        if not self.active:
            yield
            return
        self.module.forward = self.forward
        try:
            yield
        finally:
            del self.module.forward

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden[0]  # [K, H]
        weight, bias = self.module.weight, self.module.bias
        rows = max(1, self.chunk_elements // weight.shape[0])
        order = torch.argsort(self.slot, stable=True)
        slot, targets = self.slot[order], self.targets[order]
        bounds = torch.searchsorted(slot, torch.arange(0, hidden.shape[0] + rows, rows, device=slot.device))
        pieces, entropies = [], []
        chunked = hidden.shape[0] > rows
        for k, start in enumerate(range(0, hidden.shape[0], rows)):
            lo, hi = int(bounds[k]), int(bounds[k + 1])
            args = (hidden[start:start + rows], weight, bias, slot[lo:hi] - start, targets[lo:hi])
            if chunked and torch.is_grad_enabled():
                logp, entropy = checkpoint(self._chunk, *args, use_reentrant=False)
            else:
                logp, entropy = self._chunk(*args)
            pieces.append(logp)
            entropies.append(entropy)
        self.entropy = torch.cat(entropies) if self.with_entropy else None
        flat = torch.cat(pieces)
        return torch.empty_like(flat).index_copy(0, order, flat)[None]

    def _chunk(self, hidden, weight, bias, slot, targets):
        # 1/T applied to the hidden states, not to [positions x vocabulary] logits
        scaled = F.linear(hidden / self.temperature, weight, None if bias is None else bias / self.temperature).float()
        normaliser = torch.logsumexp(scaled, dim=-1)
        logp = scaled[slot, targets] - normaliser[slot]
        if not self.with_entropy:
            return logp, None
        with torch.no_grad():  # H = log Z - E_p[logit]
            return logp, normaliser - (torch.softmax(scaled, dim=-1) * scaled).sum(-1)
