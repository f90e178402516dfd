"""The MoS tuner: places :class:`~lora_shards.layer.Linear` layers on the targeted modules, then builds one pool
pair per projection type and adapter, and routes every layer into it.

PEFT creates the layers one at a time, but a pool's size ``R * L * l`` needs ``L``, the number of matrices of
its type, so the pools are built after PEFT's injection pass (:meth:`MoSModel.inject_adapter`). A projection
type is the module's attribute name (``q_proj``, ``down_proj``, ...); modules with the same name but different
shapes get one type per shape (``name_{d_out}x{d_in}``).

Checkpoints hold each pool once (``base_model.mos_pools.<type>.A`` / ``.B``) and each layer's integer routing
(``<module>.mos_index_A`` / ``.mos_index_B``); loading copies into the pools in place, so the sharing survives.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import MoSConfig
from .layer import Linear, MoSLayer, ShardPool
from .routing import check_divisible, init_pools, pool_num_shards, routing_indices

POOLS_ATTRIBUTE = "mos_pools"


def type_seed(seed: int, type_key: str) -> int:
    """Seed of one projection type's generator: stable across runs and independent of the other types."""
    return (seed * 1_000_003 + zlib.crc32(type_key.encode())) % (2**63)


class MoSModel(BaseTuner):
    """Mixture-of-Shards adapters on a model; created by ``peft.get_peft_model(model, MoSConfig(...))``.

    ``self.mos_pools[adapter_name][type_key]`` is the :class:`ShardPool` of one projection type.
    """

    prefix: str = "mos_"
    tuner_layer_cls = MoSLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state: bool = True

    def _pre_injection_hook(self, model: nn.Module, config: MoSConfig, adapter_name: str) -> None:
        self.mos_pools = nn.ModuleDict({})

    def _create_and_replace(self, config: MoSConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str) -> None:
        layer_args = dict(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          shard_type=target_name)
        if isinstance(target, MoSLayer):
            target.update_layer(adapter_name, **layer_args)
            return
        new_module = Linear(target, adapter_name, **layer_args)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until it is activated
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        """PEFT's injection pass, then the pools of this adapter (see the module docstring)."""
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                               low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        config = self.peft_config[adapter_name]
        pools = self._build_pools(model, adapter_name, config, on_meta=low_cpu_mem_usage)
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        pools.requires_grad_(trainable)
        self.mos_pools[adapter_name] = pools

    @staticmethod
    def _layers_by_type(model: nn.Module, adapter_name: str) -> dict[str, list[MoSLayer]]:
        """The layers of one adapter, grouped by projection type, in module order."""
        by_name_and_shape: dict[tuple[str, int, int], list[MoSLayer]] = defaultdict(list)
        for module in model.modules():
            if isinstance(module, MoSLayer) and adapter_name in module.shard_type:
                key = (module.shard_type[adapter_name], module.in_features, module.out_features)
                by_name_and_shape[key].append(module)
        shapes_per_name = defaultdict(int)
        for name, _, _ in by_name_and_shape:
            shapes_per_name[name] += 1
        groups = {}
        for (name, d_in, d_out), layers in by_name_and_shape.items():
            type_key = name if shapes_per_name[name] == 1 else f"{name}_{d_out}x{d_in}"
            for layer in layers:
                layer.shard_type[adapter_name] = type_key
            groups[type_key] = layers
        return groups

    def _build_pools(self, model: nn.Module, adapter_name: str, config: MoSConfig, on_meta: bool) -> nn.ModuleDict:
        big_r, r = config.equivalent_rank, config.r
        l, p = config.effective_shards_per_vector, config.effective_private_rank
        pools = nn.ModuleDict({})
        for type_key, layers in self._layers_by_type(model, adapter_name).items():
            num_matrices, d_in, d_out = len(layers), layers[0].in_features, layers[0].out_features
            check_divisible(type_key, d_in, d_out, l)
            generator = torch.Generator(device="cpu").manual_seed(type_seed(config.seed, type_key))
            index_a, index_b = routing_indices(
                num_matrices, equivalent_rank=big_r, r=r, shards_per_vector=l, private_rank=p, generator=generator,
                subset_selection=config.subset_selection, pair_dissociation=config.pair_dissociation,
                type_key=type_key,
            )
            num_shards = pool_num_shards(num_matrices, big_r, l)
            device = layers[0].get_base_layer().weight.device
            if on_meta or device.type == "meta":
                meta = torch.device("meta")
                pool = ShardPool(torch.empty(num_shards, d_in // l, device=meta),
                                 torch.empty(num_shards, d_out // l, device=meta))
            else:
                pool = ShardPool(*(t.to(device) for t in init_pools(num_shards, d_in, d_out, l, generator)))
            for layer, row_a, row_b in zip(layers, index_a, index_b):
                layer.attach_shards(adapter_name, pool, row_a, row_b)
            pools[type_key] = pool
        return pools

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        del self.mos_pools[adapter_name]

    # -- checkpoint keys: "base_model.mos_pools.<adapter>.<type>.A" <-> "base_model.mos_pools.<type>.A" ---------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """The pools once and the routing indices; the layers hold no other adapter state."""
        pools_marker = f"{POOLS_ATTRIBUTE}.{adapter_name}."
        index_suffixes = (f".mos_index_A.{adapter_name}", f".mos_index_B.{adapter_name}")
        return {key: value for key, value in state_dict.items()
                if pools_marker in key or key.endswith(index_suffixes)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        head, marker, tail = key.partition(f"{POOLS_ATTRIBUTE}.{adapter_name}.")
        if marker and (not head or head.endswith(".")):
            return f"{head}{POOLS_ATTRIBUTE}.{tail}"
        return super()._remove_adapter_name_from_key(key, adapter_name)


def shard_pools(model: nn.Module, adapter_name: str = "default") -> dict[str, ShardPool]:
    """The pools of an adapter by projection type, from a ``PeftModel`` or its ``MoSModel``."""
    tuner = model.base_model if not isinstance(model, MoSModel) else model
    return dict(getattr(tuner, POOLS_ATTRIBUTE)[adapter_name].items())


def mos_layers(model: nn.Module) -> list[tuple[str, MoSLayer]]:
    """``(module name, layer)`` of every MoS layer of a model, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoSLayer)]
