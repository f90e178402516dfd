"""The learning-rate schedule: transformers' over max_steps, or over the token or time budget that ends a run."""

import math
from types import SimpleNamespace

import pytest
import torch

from spo.trainer.schedule import learning_rate_factor, make_scheduler, run_progress


def test_factors_warm_up_then_decay_to_zero_at_the_end_of_the_run():
    assert learning_rate_factor("linear", 0.05, warmup=0.1) == pytest.approx(0.5)
    assert learning_rate_factor("linear", 0.55, warmup=0.1) == pytest.approx(0.5)
    assert learning_rate_factor("linear", 1.0, warmup=0.1) == 0.0
    assert learning_rate_factor("cosine", 0.5, warmup=0.0) == pytest.approx(0.5)
    assert learning_rate_factor("cosine", 0.25, warmup=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert learning_rate_factor("cosine", 1.0, warmup=0.0) == pytest.approx(0.0)
    assert learning_rate_factor("constant", 0.9, warmup=0.2) == 1.0
    assert learning_rate_factor("constant", 0.1, warmup=0.2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        learning_rate_factor("step", 0.5, warmup=0.0)


def test_progress_is_the_largest_share_spent_of_any_budget():
    assert run_progress(3, 10, tokens=500, max_tokens=1000, seconds=9.0, max_seconds=None) == 0.5
    assert run_progress(3, 10, tokens=500, max_tokens=None, seconds=9.0, max_seconds=10.0) == 0.9
    assert run_progress(3, 10, tokens=50, max_tokens=1000, seconds=0.0, max_seconds=None) == 0.3
    assert run_progress(3, 10, tokens=5000, max_tokens=1000, seconds=0.0, max_seconds=None) == 1.0


def _learning_rates(args, progress, steps):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler, rates = make_scheduler(args, optimizer, lambda: progress[0]), []
    for step in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        progress[0] = (step + 1) / steps
        optimizer.step()
        scheduler.step()
    return rates


def test_without_a_budget_the_schedule_is_transformers_over_max_steps():
    """Runs without a token or time budget keep exactly the step-counted schedule they always had."""
    from transformers import get_scheduler

    args = SimpleNamespace(lr_scheduler_type="linear", warmup_ratio=0.1, max_steps=20, max_generated_tokens=None,
                           max_train_seconds=None)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=20)
    expected = []
    for _ in range(20):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        reference.step()
    assert _learning_rates(args, [0.0], 20) == expected  # exactly: the quickstart's seeds stay reproducible
    budgeted = SimpleNamespace(**{**vars(args), "max_generated_tokens": 1000, "max_steps": 10_000})
    rates = _learning_rates(budgeted, [0.0], 20)  # progress stands for the tokens spent
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.5) and rates[-1] == pytest.approx(1 / 18)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="max_generated_tokens or max_train_seconds needs its progress"):
        make_scheduler(budgeted, optimizer, None)  # a budget-ended schedule cannot guess how far the run is
