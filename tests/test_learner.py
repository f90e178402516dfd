"""The Learner on one process: micro-batching and accumulation must not change the loss, the KL or the gradient,
idle rows are skipped without changing the update, and a zero-weight padding micro-batch trains nothing."""

import pytest
import torch
from accelerate import Accelerator

from spo.models import tiny_model
from spo.trainer import GRPOConfig
from spo.trainer.learner import Learner
from spo.trainer.samples import Sample, train_batch

from helpers import tiny_run


def make_samples(count=12, idle_every=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(count):
        length = 3 + i % 5
        advantage = float(torch.randn((), generator=gen))
        if idle_every and i % idle_every:
            advantage = 0.0
        samples.append(Sample(prompt_ids=torch.randint(3, 500, (4 + i % 3,), generator=gen).tolist(),
                              completion_ids=torch.randint(3, 500, (length,), generator=gen).tolist(),
                              behaviour_logprobs=-torch.rand(length, generator=gen) * 3,
                              advantages=torch.full((length,), advantage), reward=0.0, step=0, dataset_row=i))
    return samples


def learner_for(tmp_path, **overrides):
    # the samples' behaviour log-probs are random, far from the tiny model's: no sequence band unless a test sets one
    args = GRPOConfig(**tiny_run(tmp_path, **{"warmup_ratio": 0.0, "lr_scheduler_type": "constant",
                                              "importance_sampling_sequence_band": None, **overrides}))
    model = tiny_model(seed=0)
    learner = Learner(Accelerator(cpu=True), model, args, pad_token_id=0, uses_adapters=False)
    if learner.reference is not None:  # move the policy away from its reference so the KL is not zero
        with torch.no_grad():
            for p in learner.unwrapped.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return learner, args


def update_capturing_gradients(learner, args, samples):
    """One update; the gradient each optimizer step applies (before clipping) is captured instead of stepping."""
    gradients = []

    def capture():
        gradients.append({n: p.grad.detach().clone() for n, p in learner.unwrapped.named_parameters()
                          if p.grad is not None})

    learner.optimizer.step = capture
    metrics = learner.update(train_batch(samples, args), step=0)
    return metrics, gradients


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_micro_batches_and_accumulation_equal_one_big_batch(tmp_path, loss_type):
    samples = make_samples()
    common = dict(loss_type=loss_type, beta=0.2, max_grad_norm=None, importance_sampling_cap=None)
    big, big_args = learner_for(tmp_path / "big", per_device_train_batch_size=12, **common)
    small, small_args = learner_for(tmp_path / "small", per_device_train_batch_size=3, gradient_accumulation_steps=4,
                                    **common)
    big_metrics, big_grads = update_capturing_gradients(big, big_args, samples)
    small_metrics, small_grads = update_capturing_gradients(small, small_args, samples)
    assert len(big_grads) == len(small_grads) == 1  # one optimizer step each
    assert big_metrics["kl"] > 1e-4
    for key in ("loss", "kl"):
        assert small_metrics[key] == pytest.approx(big_metrics[key], rel=1e-5), key
    for name, grad in big_grads[0].items():
        torch.testing.assert_close(small_grads[0][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_kl_share_of_the_loss_does_not_grow_with_accumulation(tmp_path):
    """Two equal micro-batches used to add the KL of each: twice the one-batch value."""
    samples = make_samples(count=8)
    zero_advantage = [Sample(**{**s.to_state(), "advantages": torch.zeros(len(s.completion_ids))}) for s in samples]
    losses = []
    for size, accumulate in ((8, 1), (4, 2)):
        learner, args = learner_for(tmp_path / f"{size}", per_device_train_batch_size=size,
                                    gradient_accumulation_steps=accumulate, beta=0.5, max_grad_norm=None)
        metrics, _ = update_capturing_gradients(learner, args, zero_advantage)
        losses.append(metrics["loss"])
        assert metrics["loss"] == pytest.approx(0.5 * metrics["kl"], rel=1e-5)  # the loss is beta * token-mean KL
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_idle_rows_are_skipped_without_changing_the_update(tmp_path, loss_type, monkeypatch):
    """Completions whose advantages are all zero carry no gradient (beta = 0): the update skips their forward and
    backward passes but still counts them in the loss denominator, so the gradient is exactly as before."""
    import spo.trainer.learner as learner_module

    samples = make_samples(idle_every=3)
    results = {}
    for prune in (True, False):
        learner, args = learner_for(tmp_path / f"{prune}", loss_type=loss_type, per_device_train_batch_size=3,
                                    gradient_accumulation_steps=2, importance_sampling_cap=None)
        with monkeypatch.context() as patch:
            if not prune:
                patch.setattr(learner_module, "_without_idle_rows", lambda micro: micro)
            results[prune] = update_capturing_gradients(learner, args, samples)
    (pruned, pruned_grads), (full, full_grads) = results[True], results[False]
    assert pruned["train/idle_rows_skipped"] >= 6 and full["train/idle_rows_skipped"] == 0
    assert pruned["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert len(pruned_grads) == len(full_grads) == 2
    for step_pruned, step_full in zip(pruned_grads, full_grads):
        for name, grad in step_full.items():
            torch.testing.assert_close(step_pruned[name], grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()),
                                       msg=name)


def test_padding_micro_batches_train_nothing(tmp_path):
    """A process with fewer samples runs zero-weight micro-batches so that every process runs as many passes: the
    padded update equals the unpadded one."""
    samples = make_samples(count=4)
    learner, args = learner_for(tmp_path / "plain", per_device_train_batch_size=2, gradient_accumulation_steps=8,
                                max_grad_norm=None)
    plain_metrics, plain = update_capturing_gradients(learner, args, samples)
    padded, padded_args = learner_for(tmp_path / "padded", per_device_train_batch_size=2,
                                      gradient_accumulation_steps=8, max_grad_norm=None)
    padded._max = lambda value: value + 3  # as if another process had 3 more micro-batches
    metrics, grads = update_capturing_gradients(padded, padded_args, samples)
    assert metrics["train/padding_micro_batches"] == 3 and plain_metrics["train/padding_micro_batches"] == 0
    assert metrics["loss"] == pytest.approx(plain_metrics["loss"], rel=1e-6)
    assert len(grads) == len(plain) == 1
    for name, grad in plain[0].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_half_precision_trained_weights_get_float32_master_copies(tmp_path):
    """AdamW on bf16 weights rounds most small updates away (an update of 1e-6 on a weight near 1 is below bf16's
    resolution): trained weights are kept in float32, frozen ones stay as loaded."""
    model = tiny_model(seed=0).to(torch.bfloat16)
    model.model.embed_tokens.weight.requires_grad_(False)
    args = GRPOConfig(**tiny_run(tmp_path))
    learner = Learner(Accelerator(cpu=True), model, args, pad_token_id=0, uses_adapters=False)
    dtypes = {n: p.dtype for n, p in learner.unwrapped.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert {d for n, d in dtypes.items() if n != "model.embed_tokens.weight"} == {torch.float32}


def test_precision_follows_the_launcher_unless_the_recipe_sets_it(tmp_path, monkeypatch):
    from spo.trainer.distributed import make_accelerator

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert make_accelerator(mixed_precision=None).mixed_precision == "bf16"  # bf16: null in the recipe
    assert make_accelerator(mixed_precision="no").mixed_precision == "no"  # bf16: false in the recipe


def test_metrics_are_reduced_over_declared_keys_whatever_each_process_measured():
    from spo.trainer.tracking import reduce_metrics

    keys = ("reward", "kl", "tree/edges")
    ranks = [{"reward": 1.0, "tree/edges": 4.0}, {"reward": float("nan"), "kl": 0.5, "tree/edges": 2.0}]
    tensors = []  # what each process hands to the all-reduce: values and counts in the declared order
    for row in ranks:
        reduce_metrics(row, keys, lambda t: tensors.append(t) or t)
    summed = reduce_metrics(ranks[0], keys, lambda t: tensors[0] + tensors[1])
    assert summed == {"reward": 1.0, "kl": 0.5, "tree/edges": 3.0}  # NaN and missing values are left out
    with pytest.raises(KeyError, match="not declared"):
        reduce_metrics({"typo/metric": 1.0}, keys, lambda t: t)


def test_completions_outside_the_sequence_band_train_nothing(tmp_path):
    """A completion whose sampler was far from the learner (its geometric-mean ratio outside the band) is masked
    out whole: the update equals the one without it, and the rejection is counted."""
    samples = make_samples(count=4)
    far = samples[0]
    far.behaviour_logprobs = torch.full_like(far.behaviour_logprobs, -30.0)  # the sampler gave them ~0 probability
    common = dict(per_device_train_batch_size=4, max_grad_norm=None, importance_sampling_cap=None, loss_type="grpo")
    # the random tiny model is far from the random behaviour log-probs too (ratios about e^-9): a wide band
    banded, args = learner_for(tmp_path / "band", importance_sampling_sequence_band=[1e-6, 1e6], **common)
    metrics, grads = update_capturing_gradients(banded, args, samples)
    assert metrics["is/rejected_fraction"] == pytest.approx(0.25)
    without, args = learner_for(tmp_path / "without", **common)
    zeroed = [Sample(**{**far.to_state(), "advantages": torch.zeros(len(far.completion_ids))}), *samples[1:]]
    _, expected = update_capturing_gradients(without, args, zeroed)
    for name, grad in expected[0].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_replayed_samples_use_their_own_old_logprobs_and_fresh_ones_the_current_policy(tmp_path):
    """One optimisation pass: a replayed sample's ratio is against its stored (behaviour) log-probs, a fresh
    sample's against the learner's own log-probs in the same pass (ratio 1), in the same micro-batch."""
    samples = make_samples(count=4)
    for sample in samples:
        sample.advantages = sample.advantages.abs() + 0.5
    samples[0].old_logprobs = torch.full_like(samples[0].behaviour_logprobs, -30.0)  # ratio ~e^20: clipped
    learner, args = learner_for(tmp_path, per_device_train_batch_size=4, importance_sampling_cap=None, beta=0.0)
    metrics = learner.update(train_batch(samples, args), step=0)
    total = sum(len(s.completion_ids) for s in samples)
    assert metrics["clip_ratio/high_mean"] == pytest.approx(len(samples[0].completion_ids) / total)
    assert metrics["clip_ratio/low_mean"] == 0.0


def test_the_buffer_scores_only_tokens_that_get_gradient(tmp_path):
    """Under the probability mask, a sample whose nonzero advantages sit on masked (confident) tokens trains nothing:
    the sample buffer must neither count it as effective nor cache it for replay."""
    from spo.trainer.samples import buffer_score

    args = GRPOConfig(**tiny_run(tmp_path, probability_mask=True, probability_threshold=0.9))
    confident, unsure = torch.log(torch.tensor(0.99)), torch.log(torch.tensor(0.3))
    logprobs = torch.tensor([confident, confident, unsure, unsure])

    def sample(advantages):
        return Sample(prompt_ids=[1, 2], completion_ids=[3, 4, 5, 6], behaviour_logprobs=logprobs,
                      advantages=torch.tensor(advantages), reward=1.0, step=0)

    assert buffer_score(sample([0.8, 0.8, 0.0, 0.0]), args) == 0.0  # |A| on masked tokens only
    assert buffer_score(sample([0.8, 0.8, 0.2, -0.4]), args) == pytest.approx(0.3)  # mean over the unmasked two
    args.probability_mask = False
    assert buffer_score(sample([0.8, 0.8, 0.0, 0.0]), args) == pytest.approx(0.4)
