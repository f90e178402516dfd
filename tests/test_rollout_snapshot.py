"""The merged sampling copy of a policy (spo.rollout.snapshot) follows the policy after every refresh."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_shards import MoSConfig
from spo.data import make_arithmetic_task
from spo.models import tiny_model
from spo.rollout import Generator, SamplingParams
from spo.rollout.snapshot import PolicySnapshot
from spo.trainer import GRPOConfig, GRPOTrainer

from helpers import vowel_share  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _perturb_trainable(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("adapter", [
    MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, target_modules=TARGETS),
    LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
    None,  # full fine-tuning: every parameter trainable
])
def test_snapshot_equals_the_policy_after_refresh_and_only_then(adapter):
    policy = tiny_model(seed=0)
    if adapter is not None:
        policy = get_peft_model(policy, adapter)
    policy.eval()
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    snapshot = PolicySnapshot(policy, "float32")
    assert not any(p.requires_grad for p in snapshot.model.parameters())
    assert "lora" not in str(type(snapshot.model)).lower() and not hasattr(snapshot.model, "peft_config")

    _perturb_trainable(policy, seed=1)  # a training step moves the adapters (or the weights)
    stale = (_logits(snapshot.model, ids) - _logits(policy, ids)).abs().max()
    assert stale > 1e-3
    snapshot.refresh()
    torch.testing.assert_close(_logits(snapshot.model, ids), _logits(policy, ids), atol=1e-5, rtol=1e-5)


def test_bfloat16_snapshot_stays_close_to_the_policy():
    policy = get_peft_model(tiny_model(seed=0), MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2,
                                                          private_rank=1, target_modules=TARGETS)).eval()
    _perturb_trainable(policy, seed=2)
    snapshot = PolicySnapshot(policy, "bfloat16")
    snapshot.refresh()
    assert all(p.dtype == torch.bfloat16 for p in snapshot.model.parameters())
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    reference = torch.log_softmax(_logits(policy, ids), -1)
    approx = torch.log_softmax(_logits(snapshot.model, ids), -1)
    assert (approx - reference).abs().max() < 0.1  # bf16 keeps about 3 significant digits


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="rollout dtype"):
        PolicySnapshot(tiny_model(seed=0), "int8")
    with pytest.raises(ValueError, match="rollout_dtype"):
        GRPOConfig(output_dir="unused", rollout_dtype="fp8", report_to=["none"])


def test_trainer_samples_from_a_refreshed_bfloat16_snapshot(tmp_path, embedded_tokenizer):
    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=2, prompts_per_step=2, num_generations=4,
                      max_completion_length=10, temperature=1.0, top_p=1.0, learning_rate=1e-2,
                      per_device_train_batch_size=8, report_to=["none"], save_steps=None, seed=0,
                      rollout_dtype="bfloat16")

    trainer = GRPOTrainer(model=tiny_model(seed=0), reward_funcs=[vowel_share], args=args,
                          train_dataset=make_arithmetic_task("train", 8), processing_class=embedded_tokenizer,
                          peft_config=MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1,
                                                target_modules=TARGETS))
    assert trainer.generator.model is trainer.snapshot.model
    history = trainer.train()
    assert len(history) == 2
    # the sampler's log-probs (bf16) differ a little from the policy's (fp32): the IS weights see the gap
    assert 0 < history[-1]["is/logprob_gap"] < 0.5
    ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    # after training, the snapshot was last refreshed before the final update; a refresh brings it level
    trainer.snapshot.refresh()
    reference = torch.log_softmax(_logits(trainer.unwrapped, ids), -1)
    assert (torch.log_softmax(_logits(trainer.snapshot.model, ids), -1) - reference).abs().max() < 0.1
    params = SamplingParams(max_new_tokens=4, greedy=True)
    assert Generator(trainer.snapshot.model, embedded_tokenizer).generate([[5, 6, 7]], params).rollouts[0].completion_ids


@pytest.mark.parametrize("adapter", [
    MoSConfig(r=4, equivalent_rank=3, shards_per_vector=2, private_rank=1, target_modules=TARGETS),
    LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
])
def test_float32_merged_copy_decodes_the_unmerged_policys_greedy_tokens(adapter):
    from helpers import PROMPTS, WordTokenizer

    policy = get_peft_model(tiny_model(seed=0), adapter).eval()
    _perturb_trainable(policy, seed=3)
    merged = PolicySnapshot(policy, "float32").model
    greedy = SamplingParams(max_new_tokens=16, greedy=True)

    def tokens(model):
        return [r.completion_ids for r in Generator(model, WordTokenizer()).generate(PROMPTS, greedy).rollouts]

    assert tokens(merged) == tokens(policy)
    assert tokens(merged) != tokens(tiny_model(seed=0))  # the adapters matter to these tokens
