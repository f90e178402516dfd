"""SPO-tree: every parent -> child edge of a rollout tree is a training sample whose advantage is
``V(child) - V(parent)``, with values as hierarchical means over the tree's own rollouts (no extra Monte Carlo).
Unused edges wait in a replay for up to ``replay_max_age`` steps; at most ``edges_per_question`` edges per question
are trained per step."""

from __future__ import annotations

import random

import torch

from ..tree import edges, grow_tree, hierarchical_values, leaves
from .base import RLTrainer
from .config import SPOTreeConfig
from .samples import Sample, sampled_logprobs


class SPOTreeTrainer(RLTrainer):
    algorithm = "spo_tree"
    algorithm_metrics = ("tree/leaves", "tree/edges", "tree/edges_kept", "tree/edges_replayed", "tree/rollouts",
                         "tree/root_value")

    def __init__(self, model, reward_funcs, args: SPOTreeConfig | None = None, **kwargs):
        super().__init__(model, reward_funcs, args or SPOTreeConfig(), **kwargs)
        self.replay: list[Sample] = []

    def make_samples(self, rows: list[int], step: int) -> list[Sample]:
        args = self.args
        roots, stats = grow_tree(self.generator, [self.prompt_ids[i] for i in rows], list(args.branching),
                                 args.segment_length, args.max_completion_length, self.sampling_params(step))
        self._metrics["tokens/step"] = float(stats["tokens"])
        all_leaves = [leaf for root in roots for leaf in leaves(root)]
        rewards = self.score_completions([rows[leaf.prompt_index] for leaf in all_leaves],
                                         [leaf.path_text() for leaf in all_leaves],
                                         [leaf.path_tokens() for leaf in all_leaves],
                                         [not leaf.finished for leaf in all_leaves])
        for leaf, reward in zip(all_leaves, rewards.tolist()):
            leaf.reward = reward  # NaN: unscored, left out of every value (see spo.tree.hierarchical_values)
        rng = random.Random(args.seed * 7919 + step)
        fresh, kept_total, edge_total = [], 0, 0
        for root in roots:
            hierarchical_values(root)
            question_edges = edges(root, args.normalize_by_sibling_std)
            edge_total += len(question_edges)
            rng.shuffle(question_edges)
            samples = [self._edge_sample(rows, child, advantage, step) for child, advantage in question_edges]
            fresh.extend(samples[:args.edges_per_question])
            self.replay.extend(samples[args.edges_per_question:])
            kept_total += min(len(samples), args.edges_per_question)
        replayed = self._draw_replay(step, limit=len(fresh))
        views = [_LeafView(leaf, self.prompt_ids[rows[leaf.prompt_index]]) for leaf in all_leaves]
        self.record_rollout_metrics(rewards, views, [leaf.prompt_index for leaf in all_leaves], {})
        self._record_tree_metrics(roots, all_leaves, stats, edge_total, kept_total, len(replayed))
        return fresh + replayed

    def _edge_sample(self, rows, child, advantage: float, step: int) -> Sample:
        parent_tokens = child.parent.path_tokens()
        return Sample(prompt_ids=self.prompt_ids[rows[child.prompt_index]] + parent_tokens,
                      completion_ids=child.tokens, **sampled_logprobs(child),
                      advantages=torch.full((len(child.tokens),), float(advantage)), reward=float(child.value),
                      step=step, dataset_row=rows[child.prompt_index],
                      truncated=not child.finished and child.depth == len(self.args.branching))

    def _draw_replay(self, step: int, limit: int) -> list[Sample]:
        """Edges left over from earlier steps (no older than replay_max_age), at most edges_per_question per
        question, at most ``limit`` in all; they train against their stored behaviour log-probs."""
        self.replay = [s for s in self.replay if step - s.step <= self.args.replay_max_age]
        drawn, per_question, left = [], {}, []
        for sample in self.replay:
            if sample.step < step and len(drawn) < limit and \
                    per_question.get(sample.dataset_row, 0) < self.args.edges_per_question:
                per_question[sample.dataset_row] = per_question.get(sample.dataset_row, 0) + 1
                sample.old_logprobs = sample.behaviour_logprobs
                drawn.append(sample)
            else:
                left.append(sample)
        self.replay = left
        return drawn

    def _record_tree_metrics(self, roots, all_leaves, stats, edge_total, kept, replayed) -> None:
        self._metric("tree/leaves", float(len(all_leaves)))
        self._metric("tree/edges", float(edge_total))
        self._metric("tree/edges_kept", float(kept))
        self._metric("tree/edges_replayed", float(replayed))
        self._metric("tree/rollouts", float(stats["rollouts"]))
        values = [r.value for r in roots if r.value is not None]
        self._metric("tree/root_value", sum(values) / len(values) if values else float("nan"))

    def algorithm_state(self) -> dict:
        return {"tree_replay": [s.to_state() for s in self.replay]}

    def load_algorithm_state(self, state: dict) -> None:
        self.replay = [Sample.from_state(s) for s in state.get("tree_replay", [])]


class _LeafView:
    """A leaf seen as a whole rollout (for the shared completion metrics)."""

    def __init__(self, leaf, prompt_ids: list[int]):
        self.prompt_ids = prompt_ids
        self.completion_ids = leaf.path_tokens()
        self.text = leaf.path_text()
        self.finish_reason = "stop" if leaf.finished else "length"
