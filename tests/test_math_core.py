"""Pure functions of SPO and the shared loss, checked against hand-computed examples."""

import math

import pytest
import torch

from spo.advantages import dr_grpo_advantages, grpo_advantages, rloo_advantages, whiten
from spo.buffer import SelectiveSampleBuffer
from spo.loss import k3_kl, policy_loss, probability_mask
from spo.segments import cutpoint_boundaries, fixed_boundaries, newline_boundaries, segment_advantages


def test_cutpoints_every_kth_low_probability_token():
    p = torch.tensor([0.99, 0.5, 0.95, 0.3, 0.2, 0.99, 0.1, 0.4])  # low at 1, 3, 4, 6, 7
    assert cutpoint_boundaries(p, 0.9, 1).tolist() == [0, 2, 3, 5, 6]
    assert cutpoint_boundaries(p, 0.9, 2).tolist() == [0, 3, 6]
    assert cutpoint_boundaries(p, 0.9, 5).tolist() == [0]


def test_cutpoint_at_first_token_is_the_bare_prompt():
    assert cutpoint_boundaries(torch.tensor([0.2, 0.95, 0.5]), 0.9, 1).tolist() == [-1, 1]


def test_no_low_probability_token_means_no_boundary():
    assert cutpoint_boundaries(torch.tensor([0.95, 0.99]), 0.9, 5).numel() == 0
    assert segment_advantages(torch.tensor([], dtype=torch.long), torch.tensor([]), 1.0, 2).tolist() == [0.0, 0.0]


def test_segment_advantages_with_prompt_value_base():
    # boundaries -1 (prompt, V=0.5) and 2 (V=0.75); reward 1; 5 tokens
    adv = segment_advantages(torch.tensor([-1, 2]), torch.tensor([0.5, 0.75]), 1.0, 5)
    assert adv.tolist() == [0.25, 0.25, 0.25, 0.25, 0.25]
    adv = segment_advantages(torch.tensor([-1, 2]), torch.tensor([0.5, 0.25]), 0.0, 5)
    assert adv.tolist() == [-0.25, -0.25, -0.25, -0.25, -0.25]


def test_tokens_before_the_first_boundary_get_zero():
    adv = segment_advantages(torch.tensor([1, 3]), torch.tensor([0.2, 0.6]), 0.0, 6)
    assert adv.tolist() == pytest.approx([0, 0, 0.4, 0.4, -0.6, -0.6])


def test_fixed_and_newline_partitions():
    assert fixed_boundaries(10, 2).tolist() == [-1, 4]
    assert fixed_boundaries(3, 5).tolist() == [-1, 0, 1]
    newline = torch.zeros(10, dtype=torch.bool)
    newline[7] = True
    assert newline_boundaries(torch.tensor([1, 7, 2, 3, 7, 4, 7]), newline).tolist() == [-1, 1, 4]


def test_group_baselines():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert grpo_advantages(r, 3).tolist() == pytest.approx(
        [2 / 3 / math.sqrt(1 / 3), -1 / 3 / math.sqrt(1 / 3), -1 / 3 / math.sqrt(1 / 3), 0, 0, 0], abs=1e-6)
    assert dr_grpo_advantages(r, 3).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3, 0, 0, 0])
    assert rloo_advantages(r, 3).tolist() == pytest.approx([1.0, -0.5, -0.5, 0, 0, 0])
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(r, 4)


def test_whitening_uses_only_masked_tokens():
    adv = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    out = whiten(adv, mask)
    # mean 2, unbiased var 2 over the two masked tokens; the unmasked 100 moves nothing
    assert out[0, :2].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-5)


def test_probability_mask():
    mask = probability_mask(torch.tensor([[1, 1, 1, 0]]), torch.tensor([[0.5, 0.95, 0.1, 0.1]]), 0.9)
    assert mask.tolist() == [[True, False, True, False]]


def test_clipping_on_both_sides():
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.9, 1.1]]))  # ratios
    out = policy_loss(logp, old, adv, torch.ones(1, 4), normaliser=4, epsilon_low=0.2, epsilon_high=0.3)
    # per token: max(-A r, -A clip(r)): [-1.3, 0.8, -0.9, 1.1]
    assert out.loss.item() == pytest.approx((-1.3 + 0.8 - 0.9 + 1.1) / 4, rel=1e-5)
    assert out.clipped_high.item() == 1 and out.clipped_low.item() == 1 and out.tokens.item() == 4


def test_gradient_only_through_unclipped_and_masked_tokens():
    logp = torch.log(torch.tensor([[1.5, 1.0, 1.0]])).requires_grad_()
    out = policy_loss(logp, torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 5.0]]), torch.tensor([[1, 1, 0]]),
                      normaliser=2)
    out.loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0  # clipped; masked out
    assert logp.grad[0, 1].item() == pytest.approx(-0.5)  # -A * r / normaliser
    assert out.loss.item() == pytest.approx((-1.2 - 1.0) / 2)


def test_kl_is_added_per_token_before_normalising():
    logp, ref = torch.log(torch.tensor([[0.5, 0.25]])), torch.log(torch.tensor([[0.25, 0.25]]))
    expected = [0.5 - math.log(0.5) - 1, 0.0]
    assert k3_kl(logp, ref)[0].tolist() == pytest.approx(expected, abs=1e-6)
    out = policy_loss(logp, logp.detach(), torch.zeros(1, 2), torch.ones(1, 2), normaliser=2, ref_logp=ref, beta=0.1)
    assert out.kl_sum.item() == pytest.approx(sum(expected), abs=1e-6)
    assert out.loss.item() == pytest.approx(0.1 * sum(expected) / 2, abs=1e-6)  # divided like the policy term
    masked = policy_loss(logp, logp.detach(), torch.zeros(1, 2), torch.tensor([[0, 1]]), normaliser=1,
                         ref_logp=ref, beta=0.1)
    assert masked.kl_sum.item() == pytest.approx(0.0, abs=1e-6) and masked.loss.item() == pytest.approx(0.0)


def test_loss_types_and_importance_weights():
    logp = torch.zeros(2, 3)
    adv = torch.ones(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert policy_loss(logp, logp, adv, mask, normaliser=4).loss.item() == pytest.approx(-1.0)
    # grpo: the sum of the sequences' token means, over the sequence count
    assert policy_loss(logp, logp, adv, mask, normaliser=2, loss_type="grpo").loss.item() == pytest.approx(-1.0)
    half = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])
    assert policy_loss(logp, logp, half, mask, normaliser=2, loss_type="grpo").loss.item() == pytest.approx(-0.75)
    weights = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    out = policy_loss(logp, logp, adv, mask, normaliser=4, importance_weights=weights)
    assert out.loss.item() == pytest.approx(-2.5 / 4)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        policy_loss(logp, logp, adv, mask, normaliser=1, loss_type="ppo")


def test_buffer_keeps_nonzero_and_evicts_by_age():
    buffer = SelectiveSampleBuffer(capacity=10, max_age=2)
    assert buffer.add(["a", "b", "c"], [0.0, 0.5, -1.0], step=0) == 2
    buffer.add(["d"], [0.3], step=2)
    assert buffer.evict_old(step=3) == 2 and [e.sample for e in buffer.entries] == ["d"]
    buffer.add(list("efghijklmnop"), [1.0] * 12, step=3)
    assert len(buffer) == 10 and buffer.entries[-1].sample == "p"
    assert buffer.needed(effective=2, total=10) == 4


def test_buffer_draws_in_proportion_to_abs_advantage():
    counts = {"small": 0, "big": 0}
    trials = 4000
    buffer = SelectiveSampleBuffer(capacity=4, alpha=1.0, seed=0)
    for _ in range(trials):
        buffer.entries.clear()
        buffer.add(["small", "big"], [0.25, -0.75], step=0)
        counts[buffer.draw(1, step=0)[0].sample] += 1
    # P(big) = 0.75; 5 standard deviations of a binomial(4000, 0.75) is about 137
    assert abs(counts["big"] - 0.75 * trials) < 5 * math.sqrt(trials * 0.75 * 0.25)
    buffer.entries.clear()
    buffer.add(["x", "y"], [1.0, 1.0], step=0)
    state = buffer.state_dict()
    first = [e.sample for e in buffer.draw(2, step=0)]
    buffer.load_state_dict(state)
    assert [e.sample for e in buffer.draw(2, step=0)] == first  # resumable exactly


def test_sequence_ratios_and_the_rejection_band():
    from spo.loss import sequence_ratios, within_band

    behaviour = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    learner = torch.log(torch.tensor([[0.5, 0.5, 0.9], [0.1, 0.1, 0.1], [1.0, 1.0, 1.0]]))
    tokens = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    ratios = sequence_ratios(learner, behaviour, tokens)
    assert ratios.tolist() == pytest.approx([1.0, 0.2, 2.0])  # geometric means over each sequence's own tokens
    assert within_band(ratios, 0.5, 2.0).tolist() == [True, False, True]


def test_threshold_flips_count_tokens_the_learner_puts_on_the_other_side_of_the_mask_threshold():
    from spo.loss import threshold_flips

    sampler = torch.log(torch.tensor([[0.85, 0.95, 0.5, 0.99], [0.95, 0.2, 0.95, 0.3]]))
    learner = torch.log(torch.tensor([[0.92, 0.95, 0.6, 0.80], [0.95, 0.2, 0.80, 0.3]]))
    tokens = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()  # the last token of row 0 is padding
    assert threshold_flips(learner, sampler, tokens, 0.9) == pytest.approx(2 / 7)
    assert threshold_flips(learner, sampler, torch.zeros_like(tokens), 0.9) == 0.0
