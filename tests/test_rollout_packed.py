"""Prepacked oneDNN linear weights in the rollout generator: same outputs as plain ``F.linear``, repacked when a
weight changes (in place, through ``.data``, or by an optimizer), never used under autocast, and the model left
as it was."""

import pytest
import torch
from torch import nn

from spo.models import tiny_model
from spo.rollout import Generator, SamplingParams
from spo.rollout.packed import PackedLinears, packing_available

from helpers import PROMPTS, WordTokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")

GREEDY = SamplingParams(max_new_tokens=10, greedy=True)


def _model(seed=1, dtype=torch.float32):
    model = tiny_model("qwen2", seed=seed, vocab_size=2048).to(dtype)  # qwen2: q/k/v projections carry a bias
    model.generation_config.eos_token_id = None
    return model


def _greedy(model, pack: bool, generator: Generator | None = None):
    generator = generator or Generator(model, WordTokenizer(), pack_weights=pack)
    batch = generator.generate(PROMPTS, GREEDY)
    return [r.completion_ids for r in batch.rollouts], torch.cat([r.logprobs for r in batch.rollouts])


def _no_instance_forwards(model) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_generation_equals_plain_linear(dtype):
    model = _model(dtype=dtype)
    ids, logprobs = _greedy(model, pack=True)
    plain_ids, plain_logprobs = _greedy(model, pack=False)
    assert ids == plain_ids
    assert torch.allclose(logprobs, plain_logprobs, atol=1e-4 if dtype == torch.float32 else 5e-2)
    assert _no_instance_forwards(model)


def test_packed_forward_is_used_and_computes_the_linear_map():
    layer = nn.Linear(64, 48)
    x = torch.randn(5, 1, 64)
    packed = PackedLinears()
    with torch.no_grad(), packed.applied(layer):
        assert "forward" in layer.__dict__
        out = layer(x)
    assert "forward" not in layer.__dict__ and packed._packed[layer] is not None
    assert torch.allclose(out, nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)


@pytest.mark.parametrize("change", ["in_place", "through_data", "optimizer"])
def test_weight_changes_are_repacked(change):
    model = _model(seed=2)
    generator = Generator(model, WordTokenizer())
    before, _ = _greedy(model, pack=True, generator=generator)
    head = model.lm_head.weight
    bump = torch.randn_like(head) * 0.5
    if change == "in_place":
        with torch.no_grad():
            head.add_(bump)
    elif change == "through_data":
        head.data.add_(bump)  # bypasses the version counter, like PEFT's merge
    else:
        optimizer = torch.optim.SGD([head], lr=1.0)
        head.grad = -bump
        optimizer.step()
    after, after_logprobs = _greedy(model, pack=True, generator=generator)
    fresh, fresh_logprobs = _greedy(model, pack=False)
    assert after != before  # the change matters to the output ...
    assert after == fresh  # ... and the reused generator sees it
    assert torch.allclose(after_logprobs, fresh_logprobs, atol=1e-4)


def test_unchanged_weights_are_packed_once():
    model = _model(seed=3)
    generator = Generator(model, WordTokenizer())
    _greedy(model, pack=True, generator=generator)
    first = {id(m): id(entry.weight) for m, entry in generator.packed._packed.items()}
    _greedy(model, pack=True, generator=generator)
    assert first and first == {id(m): id(entry.weight) for m, entry in generator.packed._packed.items()}


def test_autocast_disables_packing():
    model = _model(seed=4)
    generator = Generator(model, WordTokenizer())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids, logprobs = _greedy(model, pack=True, generator=generator)
        plain, plain_logprobs = _greedy(model, pack=False)
    assert ids == plain and torch.equal(logprobs, plain_logprobs)
    assert not generator.packed._packed  # nothing packed for nothing
    assert _no_instance_forwards(model)


def test_autocast_inside_the_forward_is_honoured():
    """accelerate's mixed precision wraps ``model.forward`` in autocast: packing must not bypass it."""
    model = _model(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_logprobs = _greedy(model, pack=False)
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    generator = Generator(model, WordTokenizer())
    ids, logprobs = _greedy(model, pack=True, generator=generator)
    assert ids == expected and torch.equal(logprobs, expected_logprobs)
    assert not generator.packed._packed


def test_live_lora_adapters_are_packed_with_their_base_layers():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(seed=5), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    generator = Generator(model, WordTokenizer())
    ids, logprobs = _greedy(model, pack=True, generator=generator)
    names = {module: name for name, module in model.named_modules()}
    packed = {names[module] for module in generator.packed._packed}
    assert any(name.endswith("q_proj.base_layer") for name in packed)
    assert any(name.endswith("q_proj.lora_A.default") for name in packed)
    plain, plain_logprobs = _greedy(model, pack=False)
    assert ids == plain
    assert torch.allclose(logprobs, plain_logprobs, atol=1e-4)
    assert _no_instance_forwards(model)


def test_model_is_restored_when_generation_fails():
    model = _model(seed=6)
    generator = Generator(model, WordTokenizer())

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    generator._forward = boom
    with pytest.raises(RuntimeError, match="boom"):
        generator.generate(PROMPTS, GREEDY)
    assert _no_instance_forwards(model)


def test_a_weight_that_cannot_be_packed_stays_on_plain_linear(monkeypatch):
    import spo.rollout.packed as packed_module

    def refuse(module):
        raise RuntimeError("no blocked layout here")

    monkeypatch.setattr(packed_module, "_Packed", refuse)
    model = _model(seed=7)
    with pytest.warns(RuntimeWarning, match="cannot prepack"):
        ids, logprobs = _greedy(model, pack=True)
    plain, plain_logprobs = _greedy(model, pack=False)
    assert ids == plain and torch.equal(logprobs, plain_logprobs)
    assert _no_instance_forwards(model)
