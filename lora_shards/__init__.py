"""Mixture-of-Shards (MoS) LoRA adapters as a PEFT method.

    import lora_shards                       # registers the method "mos" with PEFT
    from peft import get_peft_model, PeftModel

    model = get_peft_model(base, lora_shards.MoSConfig(r=8, equivalent_rank=1, target_modules="all-linear"))
    model.save_pretrained(out)               # each pool once + integer routing indices
    model = PeftModel.from_pretrained(base, out, is_trainable=True)
    lora_shards.export_to_lora(model, lora_out)   # a plain LoRA adapter, loads without this package

Importing this package is what makes PEFT know the method: it adds ``MOS`` to ``peft.PeftType`` (PEFT offers
no public hook for that) and registers config, tuner and the ``mos_`` prefix with ``register_peft_method``.
Import it before ``PeftModel.from_pretrained`` or ``PeftConfig.from_pretrained`` of a MoS adapter.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method
from peft.utils.peft_types import PeftType

from .config import PEFT_TYPE_NAME, MoSConfig
from .export import export_to_lora
from .layer import Linear, MoSLayer, ShardPool
from .model import MoSModel, mos_layers, shard_pools
from .routing import assemble, delta_weight, routing_indices

__all__ = [
    "Linear", "MoSConfig", "MoSLayer", "MoSModel", "ShardPool", "assemble", "delta_weight", "export_to_lora",
    "mos_layers", "routing_indices", "shard_pools",
]


def _add_peft_type(name: str) -> None:
    """Add a member to the ``PeftType`` enum at run time (what ``aenum.extend_enum`` does), as
    ``register_peft_method`` only accepts names that are members."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)


def _register() -> None:
    _add_peft_type(PEFT_TYPE_NAME)
    if PeftType(PEFT_TYPE_NAME) not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=MoSConfig, model_cls=MoSModel,
                             prefix=MoSModel.prefix)


_register()
