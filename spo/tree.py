"""Tree rollouts for SPO-tree and their hierarchical values (docs/ALGORITHMS.md section 3), independent of the trainer.

A tree per prompt: level i grows ``branching[i]`` children from every open node of level i-1 by continuing the
node's text; every level but the last stops after ``segment_length`` tokens, the last runs to the end. A child
that finishes early is a leaf. ``V(leaf) = reward``, ``V(node) = mean over its children of V(child)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch


@dataclass
class TreeNode:
    prompt_index: int
    depth: int  # 0 = root (the bare prompt)
    tokens: list[int] = field(default_factory=list)  # this node's segment
    logprobs: torch.Tensor | None = None  # the model's (see spo.rollout.Rollout)
    truncated_logprobs: torch.Tensor | None = None  # under the top-k / top-p truncated distribution sampled from
    text: str = ""
    finished: bool = False  # reached EOS / a stop string
    parent: "TreeNode | None" = None
    children: list["TreeNode"] = field(default_factory=list)
    value: float | None = None
    reward: float | None = None

    def path_tokens(self) -> list[int]:
        """Response tokens from the root to this node (inclusive)."""
        nodes, node = [], self
        while node is not None and node.depth > 0:
            nodes.append(node)
            node = node.parent
        return [t for n in reversed(nodes) for t in n.tokens]

    def path_text(self) -> str:
        nodes, node = [], self
        while node is not None and node.depth > 0:
            nodes.append(node)
            node = node.parent
        return "".join(n.text for n in reversed(nodes))

    @property
    def behaviour_logprobs(self) -> torch.Tensor | None:
        return self.logprobs if self.truncated_logprobs is None else self.truncated_logprobs

    @property
    def is_leaf(self) -> bool:
        return not self.children


def grow_tree(generator, prompt_ids: list[list[int]], branching: list[int], segment_length: int,
              max_completion_length: int, params) -> tuple[list[TreeNode], dict]:
    """Build one tree per prompt with ``generator`` (a ``spo.rollout.Generator``). Returns the roots and generation
    statistics (rollouts, tokens)."""
    roots = [TreeNode(prompt_index=i, depth=0) for i in range(len(prompt_ids))]
    frontier = roots
    stats = {"rollouts": 0, "tokens": 0}
    for level, width in enumerate(branching):
        if not frontier:
            break
        last = level == len(branching) - 1
        used = level * segment_length
        # each level its own seed (the same seed would repeat the random draws of the level above); the caller's
        # params are left as they were
        level_params = replace(params, max_new_tokens=(max_completion_length - used) if last else segment_length,
                               seed=None if params.seed is None else params.seed + 104_729 * level)
        states = [(prompt_ids[node.prompt_index], node.path_tokens()) for node in frontier]
        # the whole completion's limit: a compressed cache keeps as much as for a rollout grown in one call
        batch = generator.continue_from(states, level_params, k=width, max_total_new_tokens=max_completion_length)
        next_frontier = []
        for rollout in sorted(batch.rollouts, key=lambda r: r.input_index):
            parent = frontier[rollout.input_index]
            child = TreeNode(prompt_index=parent.prompt_index, depth=level + 1, tokens=list(rollout.completion_ids),
                             logprobs=rollout.logprobs, truncated_logprobs=rollout.truncated_logprobs, text=rollout.text, finished=rollout.finish_reason == "stop",
                             parent=parent)
            parent.children.append(child)
            stats["rollouts"] += 1
            stats["tokens"] += len(child.tokens)
            if not (child.finished or last):
                next_frontier.append(child)
        frontier = next_frontier
    return roots, stats


def leaves(root: TreeNode) -> list[TreeNode]:
    if root.is_leaf:
        return [root] if root.depth > 0 else []
    return [leaf for child in root.children for leaf in leaves(child)]


def hierarchical_values(root: TreeNode) -> float | None:
    """Fill ``value`` bottom-up: a leaf's reward, else the mean of its children's values. Returns the root's.
    A leaf whose reward is NaN was not scored (a reward function skipped it): it has no value, and a node whose
    children have none has none either, so unscored completions never enter a mean or an edge."""
    if root.is_leaf:
        if root.reward is None:
            raise ValueError("every leaf needs a reward before values are computed (NaN marks an unscored one)")
        root.value = None if math.isnan(root.reward) else float(root.reward)
    else:
        values = [v for v in (hierarchical_values(child) for child in root.children) if v is not None]
        root.value = sum(values) / len(values) if values else None
    return root.value


def edges(root: TreeNode, normalize_by_sibling_std: bool = False) -> list[tuple[TreeNode, float]]:
    """Every parent -> child edge with advantage ``V(child) - V(parent)`` (optionally divided by the siblings'
    std + 1e-8); edges with zero advantage, and edges into subtrees without a scored leaf, are dropped."""
    out = []
    stack = [root]
    while stack:
        node = stack.pop()
        scored = [c for c in node.children if c.value is not None]
        if scored and node.value is not None:
            values = torch.tensor([c.value for c in scored], dtype=torch.float64)
            scale = float(values.std(unbiased=False)) + 1e-8 if normalize_by_sibling_std else 1.0
            for child in scored:
                advantage = (child.value - node.value) / scale
                if abs(advantage) > 1e-12:
                    out.append((child, advantage))
                stack.append(child)
    return out
