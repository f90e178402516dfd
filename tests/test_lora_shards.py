"""Mixture-of-Shards adapters: the definition (pools, routing, counts), PEFT integration (save/load, merge,
export, disable), mixed precision and gradient checkpointing. Tiny random models; the LLaMA-2-7B parameter
counts are checked on the meta device."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, PeftType, get_peft_model
from safetensors import safe_open

import lora_shards
from lora_shards import MoSConfig, export_to_lora, mos_layers, routing_indices, shard_pools
from spo.models import tiny_model

torch.set_flush_denormal(True)

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**overrides) -> MoSConfig:
    args = dict(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1, target_modules=ALL_PROJECTIONS,
                lora_alpha=8.0)
    args.update(overrides)
    return MoSConfig(**args)


def randomize_pools(model, seed: int = 1) -> None:
    """Give the zero-initialised B pools values, so that the adapter is no longer a no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pool in shard_pools(model).values():
            pool.B.copy_(torch.randn(pool.B.shape, generator=generator) * 0.1)


@pytest.fixture
def tokens():
    return torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def mos_model():
    model = get_peft_model(tiny_model(seed=0, layers=4), small_config())
    randomize_pools(model)
    return model


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


# --- the definition --------------------------------------------------------------------------------------------


def test_registered_with_peft():
    assert PeftType("MOS") is PeftType.MOS
    model = get_peft_model(tiny_model(), small_config(equivalent_rank=2, r=2, private_rank=0))
    assert isinstance(model.base_model, lora_shards.MoSModel)
    assert model.peft_type == PeftType.MOS


def test_routing_indices_structure():
    big_l, big_r, r, l, p = 5, 3, 4, 2, 1
    index_a, index_b = routing_indices(big_l, equivalent_rank=big_r, r=r, shards_per_vector=l, private_rank=p,
                                       generator=torch.Generator().manual_seed(0))
    num_public = (big_r - p) * big_l * l
    assert index_a.shape == index_b.shape == (big_l, r * l) and index_a.dtype == torch.long
    for i in range(big_l):
        for row in (index_a[i], index_b[i]):
            public, private = row[: (r - p) * l], row[(r - p) * l:]
            assert public.max() < num_public and len(set(public.tolist())) == len(public)
            expected_private = torch.arange(p * l) + num_public + i * p * l
            assert torch.equal(private, expected_private)
    assert not torch.equal(index_a, index_b)  # pair dissociation
    assert len({tuple(row[: (r - p) * l].tolist()) for row in index_a}) > 1  # subset selection differs per matrix
    again = routing_indices(big_l, equivalent_rank=big_r, r=r, shards_per_vector=l, private_rank=p,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], index_a) and torch.equal(again[1], index_b)


def test_assembly_concatenates_shards(mos_model):
    layer = dict(mos_layers(mos_model))["base_model.model.model.layers.1.mlp.down_proj"]
    pool = layer.mos_shards["default"]
    a, b = layer.lora_matrices("default")
    r, l = 4, 2
    index_a, index_b = layer.mos_index_A["default"], layer.mos_index_B["default"]
    for j in range(r):
        assert torch.equal(a[j], torch.cat([pool.A[k] for k in index_a[j * l:(j + 1) * l]]))
        assert torch.equal(b[:, j], torch.cat([pool.B[k] for k in index_b[j * l:(j + 1) * l]]))
    expected = (8.0 / r) * b @ a
    assert torch.allclose(layer.get_delta_weight("default"), expected)


def test_fresh_adapter_is_noop_and_pools_are_shared(tokens):
    base = tiny_model(seed=0, layers=4)
    reference = logits(base, tokens)
    model = get_peft_model(base, small_config())
    assert torch.equal(logits(model, tokens), reference)
    pools = shard_pools(model)
    assert set(pools) == set(ALL_PROJECTIONS)
    for name, layer in mos_layers(model):
        assert layer.mos_shards["default"] is pools[name.rsplit(".", 1)[1]]
    # A uniform in +-1/sqrt(d_in), B zero
    d_in = 64
    assert pools["q_proj"].A.abs().max() <= d_in ** -0.5 and torch.count_nonzero(pools["q_proj"].B) == 0


@pytest.mark.parametrize("big_r, expected", [(2, 4_997_120), (8, 19_988_480), (64, 159_907_840)])
def test_llama2_7b_trainable_parameters_match_lora(big_r, expected):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000)

    def count(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    with torch.device("meta"):
        lora = get_peft_model(AutoModelForCausalLM.from_config(config),
                              LoraConfig(r=big_r, target_modules=ALL_PROJECTIONS))
    assert count(lora) == expected
    for r, l, p in [(big_r, 1, 0), (4 * big_r, 4, 1), (32, 2, 1)]:
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config)
        model = get_peft_model(base, MoSConfig(r=r, equivalent_rank=big_r, shards_per_vector=l, private_rank=p,
                                               target_modules=ALL_PROJECTIONS))
        assert count(model) == expected, (r, l, p)


@pytest.mark.parametrize("overrides, message", [
    (dict(private_rank=3, equivalent_rank=2, r=4), r"p <= R"),
    (dict(private_rank=2, equivalent_rank=4, r=1), r"p <= r"),
])
def test_invalid_config_fails_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        small_config(**overrides)


@pytest.mark.parametrize("overrides, message", [
    (dict(r=8, equivalent_rank=2, private_rank=1), r"\(r - p\) <= \(R - p\) \* L.*\(8 - 1\) = 7 > \(2 - 1\) \* 4 = 4"),
    (dict(shards_per_vector=3), r"d_in and d_out divisible by l"),
])
def test_invalid_model_config_fails_at_get_peft_model(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(tiny_model(layers=4), small_config(**overrides))


def test_ablation_switches_keep_parameter_count():
    def build(**switches):
        return get_peft_model(tiny_model(layers=4), small_config(**switches))

    full = build()
    count = sum(p.numel() for p in full.parameters() if p.requires_grad)
    for switch in ("subset_selection", "pair_dissociation", "vector_sharding", "shard_privatization"):
        model = build(**{switch: False})
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count, switch
        layers = [layer for name, layer in mos_layers(model) if name.endswith("q_proj")]
        index_a = torch.stack([layer.mos_index_A["default"] for layer in layers])
        index_b = torch.stack([layer.mos_index_B["default"] for layer in layers])
        num_shards = shard_pools(model)["q_proj"].A.shape[0]
        if switch == "subset_selection":  # the same public vectors everywhere: (r - p) * l = 6 shards
            assert all(torch.equal(row[:6], torch.arange(6)) for row in torch.cat([index_a, index_b]))
        elif switch == "pair_dissociation":
            assert torch.equal(index_a, index_b)
        elif switch == "vector_sharding":  # whole vectors: r indices per matrix, pool of R * L vectors
            assert index_a.shape == (4, 4) and num_shards == 2 * 4
        else:  # no private block: all r * l shards of a matrix are drawn from the whole pool
            private_blocks = (num_shards // 2 + 2 * torch.arange(4))[:, None] + torch.arange(2)
            assert not torch.equal(index_a[:, -2:], private_blocks)
            assert all(len(set(row.tolist())) == 8 for row in index_a)


# --- PEFT integration ------------------------------------------------------------------------------------------


def test_save_load_roundtrip_restores_sharing_and_keeps_training(tokens, tmp_path):
    # a pool large enough that some q_proj matrices share no shard with layer 0's
    mos_model = get_peft_model(tiny_model(seed=0, layers=4), small_config(r=2, equivalent_rank=4))
    randomize_pools(mos_model)
    expected = logits(mos_model, tokens)
    mos_model.save_pretrained(tmp_path)
    weights_file = tmp_path / "adapter_model.safetensors"

    # each pool once, integer indices, nothing else
    pools = shard_pools(mos_model)
    pool_bytes = sum(p.numel() * 4 for pool in pools.values() for p in (pool.A, pool.B))
    index_bytes = sum(2 * layer.mos_index_A["default"].numel() * 8 for _, layer in mos_layers(mos_model))
    with safe_open(weights_file, "pt") as f:
        keys = list(f.keys())
        assert sum(".mos_pools." in k for k in keys) == 2 * len(pools)
        assert all(f.get_tensor(k).dtype == torch.int64 for k in keys if ".mos_index_" in k)
    assert os.path.getsize(weights_file) <= pool_bytes + index_bytes + 16_384

    loaded = PeftModel.from_pretrained(tiny_model(seed=0, layers=4), tmp_path, is_trainable=True)
    assert torch.equal(logits(loaded, tokens), expected)
    loaded_pools = shard_pools(loaded)
    for name, layer in mos_layers(loaded):
        assert layer.mos_shards["default"] is loaded_pools[name.rsplit(".", 1)[1]]

    # one step through a single layer: every layer sharing its shards changes, the others do not
    layers = {name: layer for name, layer in mos_layers(loaded) if name.endswith("q_proj")}
    stepped = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    before = {name: layer.get_delta_weight("default").detach().clone() for name, layer in layers.items()}
    optimizer = torch.optim.SGD([p for p in loaded.parameters() if p.requires_grad], lr=0.5)
    stepped(torch.randn(3, 64)).pow(2).sum().backward()
    optimizer.step()
    touched_a = set(stepped.mos_index_A["default"].tolist())
    touched_b = set(stepped.mos_index_B["default"].tolist())
    sharing = {}
    for name, layer in layers.items():
        sharing[name] = bool(touched_a & set(layer.mos_index_A["default"].tolist())) or bool(
            touched_b & set(layer.mos_index_B["default"].tolist()))
        changed = not torch.equal(layer.get_delta_weight("default"), before[name])
        assert changed == sharing[name], name
    assert sum(sharing.values()) >= 2 and not all(sharing.values())  # both cases occur


def test_load_with_low_cpu_mem_usage_under_another_name(mos_model, tokens, tmp_path):
    expected = logits(mos_model, tokens)
    mos_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(seed=0, layers=4), tmp_path, adapter_name="trained",
                                       low_cpu_mem_usage=True)
    assert torch.equal(logits(loaded, tokens), expected)
    pools = shard_pools(loaded, "trained")
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False: inference mode
    assert all(layer.mos_shards["trained"] is pools[name.rsplit(".", 1)[1]] for name, layer in mos_layers(loaded))


def test_merge_and_unload_is_exact(mos_model, tokens):
    unmerged = logits(mos_model, tokens)
    mos_model.merge_adapter()
    assert torch.allclose(logits(mos_model, tokens), unmerged, atol=1e-5)
    mos_model.unmerge_adapter()
    assert torch.allclose(logits(mos_model, tokens), unmerged, atol=1e-5)
    plain = mos_model.merge_and_unload()
    assert not mos_layers(plain)
    assert torch.allclose(logits(plain, tokens), unmerged, atol=1e-5)


def test_disable_adapter_gives_base_model(tokens):
    base = tiny_model(seed=0, layers=4)
    reference = logits(base, tokens)
    model = get_peft_model(base, small_config())
    randomize_pools(model)
    adapted = logits(model, tokens)
    assert not torch.allclose(adapted, reference)
    with model.disable_adapter():
        assert torch.equal(logits(model, tokens), reference)
    assert torch.equal(logits(model, tokens), adapted)
    assert all(p.requires_grad for pool in shard_pools(model).values() for p in pool.parameters())


def test_export_to_plain_lora_loads_without_this_package(mos_model, tokens, tmp_path):
    expected = logits(mos_model, tokens)
    export_to_lora(mos_model, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    torch.save(tokens, tmp_path / "tokens.pt")
    script = f"""
import sys, torch
from peft import PeftModel
from spo.models import tiny_model
torch.set_flush_denormal(True)
model = PeftModel.from_pretrained(tiny_model(seed=0, layers=4), {str(tmp_path / 'lora')!r})
assert "lora_shards" not in sys.modules
with torch.no_grad():
    torch.save(model(torch.load({str(tmp_path / 'tokens.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO_ROOT,
                   env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)


def test_second_adapter_gets_its_own_frozen_pools(mos_model, tokens):
    mos_model.add_adapter("other", small_config(seed=7))
    first, second = shard_pools(mos_model, "default"), shard_pools(mos_model, "other")
    assert all(first[k].A is not second[k].A for k in first)
    assert all(not p.requires_grad for pool in second.values() for p in pool.parameters())
    assert all(p.requires_grad for pool in first.values() for p in pool.parameters())
    before = logits(mos_model, tokens)
    mos_model.set_adapter("other")  # B pools of "other" are zero: the base model
    with mos_model.disable_adapter():
        base = logits(mos_model, tokens)
    assert torch.equal(logits(mos_model, tokens), base) and not torch.equal(before, base)
    mos_model.set_adapter("default")
    mos_model.delete_adapter("other")
    assert "other" not in mos_model.base_model.mos_pools
    assert all("other" not in layer.mos_shards for _, layer in mos_layers(mos_model))
    assert torch.equal(logits(mos_model, tokens), before)


# --- precision and memory --------------------------------------------------------------------------------------


def test_pools_stay_float32_on_a_bf16_model(tokens, tmp_path):
    model = get_peft_model(tiny_model(seed=0, layers=4).to(torch.bfloat16), small_config())
    for pool in shard_pools(model).values():
        assert pool.A.dtype == pool.B.dtype == torch.float32
    for _, layer in mos_layers(model):
        assert layer.mos_index_A["default"].dtype == torch.long
    assert model(tokens).logits.dtype == torch.bfloat16
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(seed=0, layers=4).to(torch.bfloat16), tmp_path)
    assert all(p.dtype == torch.float32 for pool in shard_pools(loaded).values() for p in pool.parameters())
    assert all(layer.mos_index_B["default"].dtype == torch.long for _, layer in mos_layers(loaded))


def test_gradient_checkpointing_non_reentrant_gives_the_same_gradients(tokens):
    def pool_grads(checkpointing: bool):
        base = tiny_model(seed=0, layers=4)
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(base, small_config())
        randomize_pools(model)
        model.train()
        calls = []
        layer = dict(mos_layers(model))["base_model.model.model.layers.2.mlp.up_proj"]
        layer.register_forward_hook(lambda *_: calls.append(1))
        model(tokens, labels=tokens).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward pass
        return {k: (pool.A.grad.clone(), pool.B.grad.clone()) for k, pool in shard_pools(model).items()}

    plain, checkpointed = pool_grads(False), pool_grads(True)
    for key in plain:
        for g_plain, g_ckpt in zip(plain[key], checkpointed[key]):
            assert g_plain.abs().sum() > 0
            assert torch.allclose(g_plain, g_ckpt, atol=1e-6)
