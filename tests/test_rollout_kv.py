"""KV policies: the pure scoring functions on hand-checked cases, and each policy's eviction on a small cache."""

import math

import pytest
import torch

from spo.rollout.cache import RolloutCache
from spo.rollout.kv import make_policy
from spo.rollout.kv.base import group_attention, resolve_budget, select_slots
from spo.rollout.kv.h2o import h2o_scores
from spo.rollout.kv.lazy import lazy_importance, prefill_recurrence, update_recurrence
from spo.rollout.kv.snapkv import snapkv_scores
from spo.rollout.kv.streaming import streaming_scores
from spo.rollout.kv.windowkv import pyramid_budgets, segment_scores

INF = float("inf")


def test_resolve_budget():
    assert resolve_budget(None, 100) is None
    assert resolve_budget(0.5, 101) == 51 and resolve_budget(1.0, 80) == 80
    assert resolve_budget(0.5, 64, kept=75) == 107 and resolve_budget(64, 100, kept=75) == 64
    assert resolve_budget(64, 100) == 64 and resolve_budget(64.0, 100) == 64
    for bad in (0, -3, 1.5, 0.0):
        with pytest.raises(ValueError, match="kv_budget"):
            resolve_budget(bad, 10)


def test_group_attention_averages_the_query_heads_of_each_kv_head():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 3, 8)
    mask = torch.tensor([[True, True, False], [True, True, True]])[None, None]
    probs = group_attention(q, k, mask, 0.5)
    for h in range(2):
        expected = torch.stack([(0.5 * q[0, j] @ k[0, h].T).masked_fill(~mask[0, 0], -INF).softmax(-1)
                                for j in (2 * h, 2 * h + 1)]).mean(0)
        torch.testing.assert_close(probs[0, h], expected)


def test_select_slots_keeps_forced_then_best_valid_slots():
    scores = torch.tensor([[[0.1, INF, 0.5, 0.9, 0.3]], [[0.7, 0.2, 0.6, 0.1, 0.8]]])
    valid = torch.tensor([[True, True, True, False, True], [False, False, True, True, False]])
    index, kept = select_slots(scores, valid, torch.tensor([3, 3]))
    assert kept.tolist() == [3, 2]
    assert index[0, 0].tolist() == [1, 2, 4]
    assert index[1, 0, :2].tolist() == [2, 3]


def test_streaming_and_h2o_scores():
    pos = torch.arange(6)[None, None]
    assert streaming_scores(pos, 2).tolist() == [[[INF, INF, 2.0, 3.0, 4.0, 5.0]]]
    acc = torch.tensor([[[0.5, 0.1, 0.3, 0.2, 0.4, 0.0]]])
    torch.testing.assert_close(h2o_scores(acc, pos, torch.tensor([5]), 2),
                               torch.tensor([[[0.5, 0.1, 0.3, 0.2, INF, INF]]]))


def test_snapkv_scores_sum_the_window_then_pool():
    probs = torch.zeros(1, 1, 2, 5)
    probs[0, 0, 0, 2] = 0.6
    probs[0, 0, 1, 2] = 0.3
    pooled = snapkv_scores(probs, kernel=3)
    torch.testing.assert_close(pooled[0, 0], torch.tensor([0.0, 0.3, 0.3, 0.3, 0.0]))


def test_segment_scores_align_to_the_window_and_use_the_top_tokens():
    scores = torch.tensor([[[1.0, 2.0, 0.0, 4.0, 6.0, 1.0]]])
    maxed = segment_scores(scores, segment=4, top=2, strategy="max")
    # segments (right-aligned): [pad, pad, 1, 2] -> top2 mean 1.5; [0, 4, 6, 1] -> 5
    assert maxed.tolist() == [[[1.5, 1.5, 5.0, 5.0, 5.0, 5.0]]]
    averaged = segment_scores(scores, segment=4, strategy="average")
    assert averaged.tolist() == [[[0.75, 0.75, 2.75, 2.75, 2.75, 2.75]]]


def test_pyramid_budgets_fall_linearly_around_the_budget():
    assert pyramid_budgets(100, 4, 0.5) == [150, 117, 83, 50]
    assert pyramid_budgets(100, 1, 0.5) == [100]
    assert pyramid_budgets(100, 3, 0.0) == [100, 100, 100]


def test_lazy_importance_formula():
    ts = torch.tensor([[[5.0, 5.0, 9.0]]])
    mri = torch.tensor([[[2.0, 0.0, 1.0]]])
    value = lazy_importance(ts, mri, torch.tensor([9]))[0, 0]
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [2 * sig(-1 - 2) + 2 * sig(1 - 2), 0.0, 2 * sig(-1) + 2 * sig(0)]
    torch.testing.assert_close(value, torch.tensor(expected))


def test_recurrence_updates_only_activated_slots():
    ts, mri = torch.tensor([[[2.0, 3.0]]]), torch.tensor([[[4.0, 0.0]]])
    new_ts, new_mri = update_recurrence(ts, mri, torch.tensor([[[0.5, 1e-5]]]), torch.tensor([10]), alpha=1e-4)
    assert new_ts.tolist() == [[[10.0, 3.0]]] and new_mri.tolist() == [[[8.0, 0.0]]]


def test_prefill_recurrence_equals_stepwise_updates():
    torch.manual_seed(1)
    probs = torch.rand(2, 3, 6, 6) * (torch.rand(2, 3, 6, 6) > 0.5) * torch.ones(6, 6).tril()  # causal
    ts0 = torch.arange(6.0).expand(2, 3, 6).clone()
    query_pos = torch.arange(6).expand(2, 6)
    ts, mri = ts0.clone(), torch.zeros(2, 3, 6)
    for i in range(6):
        ts, mri = update_recurrence(ts, mri, probs[:, :, i], query_pos[:, i], alpha=0.3)
    got_ts, got_mri = prefill_recurrence(ts0, probs, query_pos, alpha=0.3)
    torch.testing.assert_close(got_ts, ts)
    torch.testing.assert_close(got_mri, mri)


def _cache(policy, positions: int, capacity: int = 12, heads: int = 2):
    """A one-row, one-layer cache holding ``positions`` prompt tokens whose keys encode their position."""
    cache = RolloutCache(policy, budget=policy.budget_tokens(positions, capacity - positions), layers=1, rows=1,
                         kv_heads=heads, head_dim=4, capacity=capacity, dtype=torch.float32, device=torch.device("cpu"))
    valid = torch.ones(1, positions, dtype=torch.bool)
    cache.begin_prefill(valid, torch.arange(positions)[None])
    cache.update(torch.arange(positions).float().view(1, 1, -1, 1).expand(1, heads, positions, 4).clone(),
                 torch.zeros(1, heads, positions, 4), 0)
    return cache


def _kept_positions(cache, head=0):
    return sorted(cache.pos[0, 0, head][cache.valid[0, 0]].tolist())


def test_streaming_keeps_sinks_and_the_recent_window():
    cache = _cache(make_policy("streaming", 6, n_sink=2), positions=10)
    cache.end_prefill()
    assert _kept_positions(cache) == [0, 1, 6, 7, 8, 9]
    assert cache.k[0][0, 0, :6, 0].tolist() == [float(p) for p in cache.pos[0, 0, 0, :6].tolist()]
    cache.newest += 1
    cache.prepare_step()
    cache.update(torch.full((1, 2, 1, 4), 10.0), torch.zeros(1, 2, 1, 4), 0)
    assert _kept_positions(cache) == [0, 1, 7, 8, 9, 10]


def test_h2o_evicts_the_least_attended_old_token():
    cache = _cache(make_policy("h2o", 5, recent_ratio=0.4), positions=5, capacity=5, heads=1)
    acc = torch.tensor([0.9, 0.1, 0.5, 0.0, 0.0])
    cache.policy.observe(cache, 0, acc.view(1, 1, 1, 5), torch.tensor([[4]]))
    cache.end_prefill()
    cache.newest += 1
    cache.prepare_step()
    cache.update(torch.full((1, 1, 1, 4), 5.0), torch.zeros(1, 1, 1, 4), 0)
    assert _kept_positions(cache) == [0, 2, 3, 4, 5]  # position 1 had the least attention outside the window


def test_snapkv_keeps_the_window_and_the_most_voted_prompt_tokens():
    policy = make_policy("snapkv", 4, window=2, kernel=1)
    cache = _cache(policy, positions=8, heads=1)
    votes = torch.zeros(1, 1, 2, 8)
    votes[0, 0, :, 1] = 0.5
    votes[0, 0, :, 4] = 0.3
    policy.observe(cache, 0, votes, torch.tensor([[6, 7]]))
    cache.end_prefill()
    assert _kept_positions(cache) == [1, 4, 6, 7]


def test_windowkv_drops_whole_segments():
    policy = make_policy("windowkv", 6, window=2, segment=2, top=1, pyramid=0.0)
    cache = _cache(policy, positions=10, heads=1)
    votes = torch.zeros(1, 1, 2, 10)
    votes[0, 0, :, 2] = 0.4  # segment (2, 3)
    votes[0, 0, :, 5] = 0.2  # segment (4, 5)
    policy.observe(cache, 0, votes, torch.tensor([[8, 9]]))
    cache.end_prefill()
    assert _kept_positions(cache) == [2, 3, 4, 5, 8, 9]


def test_lazy_evicts_every_window_steps_and_never_exceeds_the_budget():
    policy = make_policy("lazy", 8, window=2, alpha=0.1)
    cache = _cache(policy, positions=8, capacity=20, heads=1)
    cache.end_prefill()
    sizes = []
    for step in range(6):
        cache.newest += 1
        cache.prepare_step()
        cache.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 0)
        sizes.append(int(cache.valid[0, 0].sum()))
        assert 8 - 1 in _kept_positions(cache) or step > 0  # the newest tokens survive an eviction
    assert sizes == [7, 8, 7, 8, 7, 8] and cache.peak_tokens <= 8


def test_lazy_window_shrinks_with_small_budgets_unless_given():
    """The default window leaves most of a small budget to importance (W <= B / 8); a given one is capped at B / 2."""
    auto = make_policy("lazy", 70)
    assert auto.window_tokens(70) == 8 and auto.window_tokens(4096) == 32 and auto.window_tokens(4) == 1
    assert make_policy("lazy", 70, window=32).window_tokens(70) == 32
    assert make_policy("lazy", 70, window=32).window_tokens(40) == 20
