"""A sampling copy of a policy: adapters merged into plain weights, optionally in a cheaper dtype.

Decoding with live adapters pays for the adapter matmuls of every targeted layer at every step (about 15% of
the embedded model's decode time with MoS on all projections), and float32 decoding on a CPU with AVX512-BF16
takes about twice as long as bfloat16. RL rollouts only need the policy's current function, so the trainer can
sample from a merged copy in the rollout dtype and correct the small numerical gap with its truncated
importance weights (logged as ``is/logprob_gap``), as GPU setups that sample with vLLM in bf16 do.

``PolicySnapshot(policy, dtype)`` builds the copy once; ``refresh()`` writes the policy's current weights into
it (the merged weight of every adapter layer and every other trainable parameter) and must run after each
optimizer step.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"rollout dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def _base_model(policy: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (with the adapter layers injected), or the policy itself."""
    from peft import PeftModel

    return policy.get_base_model() if isinstance(policy, PeftModel) else policy


def merged_weight(layer) -> torch.Tensor:
    """The weight an adapter layer currently applies: its base weight plus each active adapter's delta."""
    weight = layer.get_base_layer().weight
    if layer.merged or layer.disable_adapters:
        return weight
    for adapter in layer.active_adapters:
        if adapter in layer.scaling:
            weight = weight + layer.get_delta_weight(adapter).to(device=weight.device, dtype=weight.dtype)
    return weight


class PolicySnapshot:
    """A plain (adapter-free) copy of ``policy`` in ``dtype`` for sampling; see the module docstring."""

    def __init__(self, policy: nn.Module, dtype: str | torch.dtype | None = None):
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.dtype = resolve_dtype(dtype) if dtype is not None else next(policy.parameters()).dtype
        with torch.no_grad():
            if isinstance(policy, PeftModel):
                merged = copy.deepcopy(policy).merge_and_unload()
            else:
                merged = copy.deepcopy(policy)
        self.model = merged.to(self.dtype).eval().requires_grad_(False)
        live = _base_model(policy)
        own = dict(self.model.named_modules())
        self._adapter_layers = []  # (snapshot Linear, live adapter layer)
        adapter_prefixes = []
        for name, module in live.named_modules():
            if isinstance(module, BaseTunerLayer):
                if name not in own or not hasattr(own[name], "weight"):
                    raise RuntimeError(f"adapter layer {name!r} has no plain counterpart in the merged copy")
                self._adapter_layers.append((own[name], module))
                adapter_prefixes.append(f"{name}.")
        own_params = dict(self.model.named_parameters())
        # (snapshot parameter, live name) for trainable weights outside adapter layers; looked up by name at every
        # refresh, since FSDP replaces a module's parameters when it shards them
        self._policy, self._live = policy, live
        self._trainable = []
        adapter_prefixes = tuple(adapter_prefixes)
        for name, param in live.named_parameters():
            if not param.requires_grad or name.startswith(adapter_prefixes):
                continue
            if name not in own_params:
                raise RuntimeError(f"trainable parameter {name!r} has no counterpart in the merged copy (PEFT "
                                   "modules_to_save are not supported by PolicySnapshot)")
            self._trainable.append((own_params[name], name))

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        """Copy the policy's current weights into the snapshot; returns the snapshot model. Under FSDP every
        process must call it (the shards are gathered)."""
        with gathered(self._policy):
            for target, layer in self._adapter_layers:
                target.weight.copy_(merged_weight(layer))
            for target, name in self._trainable:
                target.copy_(self._live.get_parameter(name))
        return self.model


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Whole parameters inside the block when ``model`` is sharded by FSDP2 or partitioned by DeepSpeed ZeRO-3 (a
    collective: every process enters it); a no-op otherwise."""
    from torch.distributed.fsdp import FSDPModule

    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned):
            yield
        return
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
