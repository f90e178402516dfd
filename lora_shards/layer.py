"""The MoS layer: an ``nn.Linear`` wrapped with a low-rank update gathered from shared shard pools.

    y = W x + (alpha / r) * B A dropout(x),    A = PoolA[idxA].reshape(r, d_in),  B = PoolB[idxB].reshape(r, d_out).T

The pools (:class:`ShardPool`) belong to the tuner (``MoSModel.mos_pools``), one pair per projection type and
adapter; every layer of that type holds a reference to the same module, deliberately in a plain dict rather
than as a registered submodule, so that each pool appears once in ``state_dict()`` and in the checkpoint.
Each layer registers only its own integer routing indices (``mos_index_A``, ``mos_index_B``).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .routing import assemble, delta_weight


class ShardPool(nn.Module):
    """The two shard pools of one projection type: ``A`` (n_shards x d_in/l) and ``B`` (n_shards x d_out/l)."""

    def __init__(self, pool_a: torch.Tensor, pool_b: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(pool_a)
        self.B = nn.Parameter(pool_b)


class MoSLayer(BaseTunerLayer):
    """PEFT bookkeeping of a MoS-adapted layer, one entry per adapter name in each container."""

    # Trainable weights, as PEFT sees them (it toggles their requires_grad): the shared pools.
    adapter_layer_names = ("mos_shards",)
    other_param_names = ("r", "scaling", "shard_type", "mos_dropout", "mos_index_A", "mos_index_B")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.shard_type: dict[str, str] = {}
        self.mos_dropout = nn.ModuleDict({})
        self.mos_index_A = BufferDict({}, persistent=True)
        self.mos_index_B = BufferDict({}, persistent=True)
        self.mos_shards: dict[str, ShardPool] = {}  # references to pools owned by the tuner, see module docstring
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MoS adapts torch.nn.Linear modules only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.kwargs = kwargs

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float, shard_type: str) -> None:
        """Register an adapter's hyper-parameters; its pools and indices come with :meth:`attach_shards`."""
        self.r[adapter_name] = r
        self.scaling[adapter_name] = lora_alpha / r
        self.shard_type[adapter_name] = shard_type
        self.mos_dropout[adapter_name] = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()

    def attach_shards(self, adapter_name: str, pool: ShardPool, index_a: torch.Tensor, index_b: torch.Tensor) -> None:
        """Point this layer at its projection type's pools and store its routing (integer, never cast)."""
        self.mos_shards[adapter_name] = pool
        device = self.get_base_layer().weight.device
        device = torch.device("cpu") if device.type == "meta" else device
        self.mos_index_A[adapter_name] = index_a.to(device=device, dtype=torch.long)
        self.mos_index_B[adapter_name] = index_b.to(device=device, dtype=torch.long)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move the indices to the base layer's device, never changing dtypes (PEFT's default would cast floats to
        the base dtype); the pools are moved with the tuner that owns them."""
        device = device if device is not None else self.get_base_layer().weight.device
        if device.type == "meta":
            return
        for indices in (self.mos_index_A, self.mos_index_B):
            if adapter_name in indices:
                indices[adapter_name] = indices[adapter_name].to(device)

    def lora_matrices(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of an adapter: A is r x d_in, B is d_out x r, in the pools' dtype (float32)."""
        pool = self.mos_shards[adapter_name]
        return assemble(pool.A, pool.B, self.mos_index_A[adapter_name], self.mos_index_B[adapter_name],
                        self.r[adapter_name])

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``(alpha / r) * B @ A`` in float32, on the pools' device."""
        pool = self.mos_shards[adapter_name]
        return delta_weight(pool.A, pool.B, self.mos_index_A[adapter_name], self.mos_index_B[adapter_name],
                            self.r[adapter_name], self.scaling[adapter_name])


class Linear(nn.Module, MoSLayer):
    """``nn.Linear`` with MoS adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float,
                 shard_type: str, **kwargs: Any) -> None:
        super().__init__()
        MoSLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, shard_type)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the active adapters' ``delta W`` to the base weight (``safe_merge`` checks for non-finite values)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.mos_shards:
                continue
            delta = self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)
            if safe_merge:
                merged = weight.data + delta
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs or infs in the merged weights: adapter {name} seems to be broken")
                weight.data = merged
            else:
                weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract the merged adapters' ``delta W`` again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data -= self.get_delta_weight(name).to(device=weight.device, dtype=weight.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.mos_shards:
                continue
            a, b = self.lora_matrices(name)
            a, b = a.to(x.device), b.to(x.device)
            h = self.mos_dropout[name](x).to(a.dtype)
            update = F.linear(F.linear(h, a), b) * self.scaling[name]
            result = result + update.to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "mos." + super().__repr__()
