"""Export a MoS adapter to a plain PEFT LoRA adapter (rank r per matrix) that loads without this package.

Each adapted matrix's factors are gathered from the pools, ``lora_A = PoolA[idxA].reshape(r, d_in)`` and
``lora_B = PoolB[idxB].reshape(r, d_out).T``, with ``lora_alpha`` and ``r`` unchanged, so LoRA's scaling
``lora_alpha / r`` equals MoS's and the exported adapter computes the same function (lossless up to the
chosen dtype; float32 by default, the pools' own precision).
"""

from __future__ import annotations

import os

import torch
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file

from .model import mos_layers

_MODEL_PREFIX = "base_model.model."


def export_to_lora(model: PeftModel, output_dir: str | os.PathLike, adapter_name: str = "default",
                   dtype: torch.dtype = torch.float32) -> LoraConfig:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` of an equivalent LoRA adapter to
    ``output_dir``, load it with ``PeftModel.from_pretrained(base, output_dir)``; returns its config."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"export_to_lora takes the PeftModel returned by get_peft_model, got {type(model).__name__}")
    config = model.peft_config[adapter_name]
    weights, module_names = {}, []
    for name, layer in mos_layers(model):
        if adapter_name not in layer.mos_shards:
            continue
        if adapter_name in layer.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into {name}: unmerge it before exporting")
        with torch.no_grad():
            a, b = layer.lora_matrices(adapter_name)
        weights[f"{name}.lora_A.weight"] = a.detach().to("cpu", dtype).contiguous()
        weights[f"{name}.lora_B.weight"] = b.detach().to("cpu", dtype).contiguous()
        module_names.append(name.removeprefix(_MODEL_PREFIX))
    if not module_names:
        raise ValueError(f"the model has no MoS layers of adapter {adapter_name!r}")
    # modules_to_save (trained copies of whole modules) use the same checkpoint keys in LoRA
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False).items():
        if ".mos_pools." not in key and ".mos_index_" not in key:
            weights[key] = value.detach().to("cpu").contiguous()

    lora_config = LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=module_names,
        modules_to_save=config.modules_to_save, task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path, revision=config.revision, bias="none",
    )
    os.makedirs(output_dir, exist_ok=True)
    lora_config.save_pretrained(output_dir)
    save_file(weights, os.path.join(output_dir, SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
    return lora_config
