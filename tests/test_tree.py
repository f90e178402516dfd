import pytest
import torch

from spo.trainer.spo_chain import thin_boundaries
from spo.tree import TreeNode, edges, hierarchical_values, leaves


def _node(parent, reward=None, tokens=(1,)):
    child = TreeNode(prompt_index=0, depth=parent.depth + 1, tokens=list(tokens), parent=parent, reward=reward)
    parent.children.append(child)
    return child


def test_hierarchical_mean_not_flat_mean():
    # root -> a (leaves 1, 1, 1), b (leaves 1, 0, 1), c (leaves 0, 0, 0)
    root = TreeNode(prompt_index=0, depth=0)
    for rewards in ([1, 1, 1], [1, 0, 1], [0, 0, 0]):
        middle = _node(root)
        for r in rewards:
            _node(middle, reward=r)
    assert hierarchical_values(root) == pytest.approx(5 / 9)
    assert [c.value for c in root.children] == pytest.approx([1, 2 / 3, 0])
    advantages = {id(child): a for child, a in edges(root)}
    assert advantages[id(root.children[0])] == pytest.approx(4 / 9)
    assert advantages[id(root.children[1])] == pytest.approx(2 / 3 - 5 / 9)
    assert advantages[id(root.children[2])] == pytest.approx(-5 / 9)
    # zero-advantage edges are dropped: all leaves under a (value 1) and c (value 0) equal their parent
    assert len(edges(root)) == 3 + 3  # three root edges + the three leaves under b
    assert len(leaves(root)) == 9


def test_unbalanced_tree_with_an_early_leaf():
    root = TreeNode(prompt_index=0, depth=0)
    _node(root, reward=1.0)  # finished before its budget: a leaf at depth 1
    deep = _node(root)
    _node(deep, reward=0.0)
    _node(deep, reward=0.0)
    assert hierarchical_values(root) == pytest.approx(0.5)
    advantages = sorted(a for _, a in edges(root))
    assert advantages == pytest.approx([-0.5, 0.5])


def test_sibling_std_normalisation():
    root = TreeNode(prompt_index=0, depth=0)
    _node(root, reward=1.0)
    _node(root, reward=0.0)
    hierarchical_values(root)
    normalised = sorted(a for _, a in edges(root, normalize_by_sibling_std=True))
    assert normalised == pytest.approx([-1.0, 1.0], rel=1e-6)  # (±0.5) / std 0.5


def test_leaf_without_reward_is_an_error():
    root = TreeNode(prompt_index=0, depth=0)
    _node(root)
    with pytest.raises(ValueError, match="every leaf needs a reward"):
        hierarchical_values(root)


def test_path_tokens_concatenate_segments():
    root = TreeNode(prompt_index=0, depth=0)
    a = _node(root, tokens=(1, 2))
    b = _node(a, tokens=(3,))
    assert b.path_tokens() == [1, 2, 3] and root.path_tokens() == []


def test_mc_cost_cap_thins_the_longest_partition_first():
    lists = [torch.arange(8), torch.arange(2), torch.tensor([], dtype=torch.long)]
    thinned = thin_boundaries(lists, cap=6)
    assert sum(t.numel() for t in thinned) <= 6
    assert thinned[0].tolist() == [0, 2, 4, 6] and thinned[1].tolist() == [0, 1]


def test_mc_cost_cap_counts_distinct_states():
    from types import SimpleNamespace

    from spo.trainer.spo_chain import state_key

    # two rollouts of one prompt share the bare-prompt state (-1): it is valued once
    rollouts = [SimpleNamespace(input_index=0, prompt_ids=[1], completion_ids=[5, 6, 7, 8]),
                SimpleNamespace(input_index=0, prompt_ids=[1], completion_ids=[5, 9, 9, 9])]
    lists = [torch.tensor([-1, 0, 2]), torch.tensor([-1, 0, 1])]

    def count(ls):
        return len({state_key(r, c) for r, b in zip(rollouts, ls) for c in b.tolist()})

    assert count(lists) == 4  # -1 and 0 are the same states in both rollouts (same prompt, same first token)
    thinned = thin_boundaries(lists, cap=3, count=count)
    assert count(thinned) <= 3 and thinned[0][0].item() == -1


def test_mc_cost_cap_drops_single_boundaries_only_when_allowed():
    lists = [torch.tensor([3]), torch.tensor([1, 4]), torch.tensor([2]), torch.tensor([5])]
    kept = thin_boundaries(lists, cap=2)  # every rollout keeps one boundary: the cap cannot be met
    assert [t.numel() for t in kept] == [1, 1, 1, 1]
    dropped = thin_boundaries(lists, cap=2, drop_order=[2, 0, 3, 1])
    assert [t.tolist() for t in dropped] == [[], [1], [], [5]]  # dropped in the given order, the rest intact


def test_unscored_leaves_stay_out_of_values_and_edges():
    """A leaf a reward function skipped (NaN) is not a 0.0 reward: it enters no mean and trains no edge."""
    root = TreeNode(prompt_index=0, depth=0)
    scored = _node(root)
    win, loss, skipped = _node(scored, reward=1.0), _node(scored, reward=0.0), _node(scored, reward=float("nan"))
    unscored = _node(root)
    _node(unscored, reward=float("nan"))
    assert hierarchical_values(root) == pytest.approx(0.5)  # 0.0 for the skipped leaf would give 1/3
    assert unscored.value is None and skipped.value is None
    advantages = {id(child): a for child, a in edges(root)}
    assert advantages == pytest.approx({id(win): 0.5, id(loss): -0.5})


def test_grow_tree_seeds_each_level_and_leaves_params_alone():
    from spo.rollout import SamplingParams
    from spo.tree import grow_tree

    class Recorder:
        def __init__(self):
            self.calls, self.totals = [], []

        def continue_from(self, states, params, k, max_total_new_tokens=None):
            from spo.rollout.generator import Rollout, RolloutBatch

            self.calls.append((params.seed, params.max_new_tokens))
            self.totals.append(max_total_new_tokens)
            return RolloutBatch([Rollout(list(p), [7, 8], "x", "length", torch.zeros(2), i)
                                 for i, (p, _) in enumerate(states) for _ in range(k)])

    params = SamplingParams(max_new_tokens=99, seed=11)
    recorder = Recorder()
    grow_tree(recorder, [[1, 2]], [2, 2, 2], segment_length=2, max_completion_length=10, params=params)
    seeds = [seed for seed, _ in recorder.calls]
    assert len(set(seeds)) == 3  # random draws differ from level to level
    assert [n for _, n in recorder.calls] == [2, 2, 6]
    assert recorder.totals == [10, 10, 10]  # every level keeps the whole completion's KV budget
    assert params.seed == 11 and params.max_new_tokens == 99  # the caller's params are untouched
