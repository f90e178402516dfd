"""SPO-chain: segment advantages from Monte Carlo values at cutpoints (docs/ALGORITHMS.md section 2).

For each rollout: cut it into segments before low-probability tokens (every k-th), value each boundary state by
the mean reward of K continuations sampled from it (identical states are valued once, and each state's prefix is
encoded once and forked K times by the generator), and give every token of a segment that segment's advantage
``V(end) - V(start)`` (the last segment ends at the rollout's own reward). With ``group_prompt_value`` the bare
prompt is the first boundary of every rollout, valued by its group's mean reward, so the segment advantages of a
rollout add up to its GRPO-style advantage ``R - mean(group)`` and refine it. The probability mask then drops the
first segment (all its tokens are above the threshold), so the group value trains only a rollout whose first token
is a cutpoint or whose cutpoints the state cap removed (``max_mc_states_per_step: 0`` removes them all).
"""

from __future__ import annotations

import math
import time

import torch

from ..segments import cutpoint_boundaries, fixed_boundaries, newline_boundaries, segment_advantages
from .base import RLTrainer
from .config import SPOChainConfig
from .samples import Sample, sampled_logprobs


def thin_boundaries(boundaries: list[torch.Tensor], cap: int, count=None,
                    drop_order: list[int] | None = None) -> list[torch.Tensor]:
    """Keep at most ``cap`` states to value: repeatedly halve (keeping the first) the longest boundary list.
    ``count(boundaries)`` says how many distinct states a set of lists costs (default: their total length).
    Every list keeps at least one boundary, unless ``drop_order`` is given (rollouts that need no boundary of
    their own, e.g. with a group-valued prompt): then single boundaries are dropped in that order of rollouts."""
    count = count or (lambda lists: sum(b.numel() for b in lists))
    boundaries = list(boundaries)
    while count(boundaries) > cap:
        longest = max(range(len(boundaries)), key=lambda i: boundaries[i].numel())
        if boundaries[longest].numel() <= 1:
            break
        boundaries[longest] = boundaries[longest][::2]
    for i in drop_order or []:
        if count(boundaries) <= cap:
            break
        boundaries[i] = boundaries[i][:0]
    return boundaries


def group_mean_rewards(rewards: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """For every rollout, the mean reward of the rollouts of its group (its prompt), ignoring NaN rewards."""
    ids = torch.tensor(groups)
    known = ~torch.isnan(rewards)
    sums = torch.zeros(int(ids.max()) + 1).index_add_(0, ids[known], rewards[known].float())
    counts = torch.zeros(int(ids.max()) + 1).index_add_(0, ids[known], torch.ones(int(known.sum())))
    return (sums / counts.clamp(min=1))[ids]


def state_key(rollout, cut: int) -> tuple:
    """Identity of the state "prompt + response[0..cut]": equal keys are valued once."""
    return rollout.input_index, tuple(rollout.prompt_ids), tuple(rollout.completion_ids[:cut + 1])


class SPOChainTrainer(RLTrainer):
    algorithm = "spo_chain"
    algorithm_metrics = ("spo/mc_rollouts", "spo/mc_states", "spo/mc_tokens", "spo/mc_peak_kv_bytes",
                         "spo/mc_prefill_tokens", "timing/monte_carlo", "spo/num_segments")

    def __init__(self, model, reward_funcs, args: SPOChainConfig | None = None, **kwargs):
        super().__init__(model, reward_funcs, args or SPOChainConfig(), **kwargs)
        self._newline_mask = None

    def partition(self, rollout) -> torch.Tensor:
        args = self.args
        if args.partition == "cutpoint":
            return cutpoint_boundaries(rollout.logprobs.exp(), args.probability_threshold, args.cutpoint_interval)
        length = len(rollout.completion_ids)
        if args.partition == "fixed":
            return fixed_boundaries(length, args.num_fixed_segments)
        if self._newline_mask is None:
            vocab = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            self._newline_mask = torch.tensor(["\n" in self.tokenizer.convert_tokens_to_string([t]) for t in vocab])
        return newline_boundaries(torch.tensor(rollout.completion_ids), self._newline_mask)

    def state_values(self, rows: list[int], rollouts, boundaries: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """``V(s_c)`` for every boundary of every rollout: mean reward of K continuations of the state
        "prompt + response[0..c]", the reward computed on the full solution. Identical states are valued once."""
        states: dict[tuple, int] = {}
        keys = []
        for rollout, cuts in zip(rollouts, boundaries):
            row_keys = []
            for c in cuts.tolist():
                row_keys.append(states.setdefault(state_key(rollout, c), len(states)))
            keys.append(row_keys)
        if not states:
            return [torch.zeros(0) for _ in rollouts]
        ordered = sorted(states, key=states.get)
        k = self.args.mc_samples
        params = self.sampling_params(step + 7919 * (1 + self.args.max_steps))  # distinct from the rollouts' seed
        # a continuation may add at most what the partial leaves of max_completion_length
        batch = self.generator.continue_from([(list(p), list(c)) for _, p, c in ordered], params, k=k,
                                             max_total_new_tokens=self.args.max_completion_length,
                                             share_prefixes=self.args.mc_share_prefixes)
        self.count_generated(batch.rollouts)
        prefix_text = [self.tokenizer.decode(list(c), skip_special_tokens=True) for _, _, c in ordered]
        continuation_rows = [rows[ordered[r.input_index][0]] for r in batch.rollouts]
        texts = [prefix_text[r.input_index] + r.text for r in batch.rollouts]
        ids = [list(ordered[r.input_index][2]) + r.completion_ids for r in batch.rollouts]
        rewards = self.score_completions(continuation_rows, texts, ids,
                                         [r.cut_off for r in batch.rollouts], record=False)
        sums = torch.zeros(len(ordered))
        counts = torch.zeros(len(ordered))
        for r, reward in zip(batch.rollouts, rewards.tolist()):
            if not math.isnan(reward):
                sums[r.input_index] += reward
                counts[r.input_index] += 1
        values = sums / counts.clamp(min=1)
        self._metric("spo/mc_rollouts", float(len(batch.rollouts)))
        self._metric("spo/mc_states", float(len(ordered)))
        self._metric("spo/mc_tokens", float(sum(len(r.completion_ids) for r in batch.rollouts)))
        for key in ("peak_kv_bytes", "prefill_tokens"):
            if key in batch.stats:
                self._metric(f"spo/mc_{key}", float(batch.stats[key]))
        return [values[torch.tensor(row, dtype=torch.long)] if row else torch.zeros(0) for row in keys]

    def make_samples(self, rows: list[int], step: int) -> list[Sample]:
        rollouts, rewards = self.generate_groups(rows, step)
        boundaries = [self.partition(r) for r in rollouts]
        if self.args.group_prompt_value:  # the prompt state is valued by the group below, not by continuations
            boundaries = [b[b >= 0] for b in boundaries]
        if self.args.max_mc_states_per_step is not None:
            drop_order = None
            if self.args.group_prompt_value:  # a rollout without cutpoints still has its group-based advantage
                drop_order = torch.randperm(len(rollouts), generator=torch.Generator().manual_seed(
                    self.args.seed + step)).tolist()
            boundaries = thin_boundaries(
                boundaries, self.args.max_mc_states_per_step, drop_order=drop_order,
                count=lambda lists: len({state_key(r, c) for r, b in zip(rollouts, lists) for c in b.tolist()}))
        started = time.perf_counter()
        values = self.state_values(rows, rollouts, boundaries, step)
        self._metric("timing/monte_carlo", time.perf_counter() - started)
        if self.args.group_prompt_value:
            prompt_values = group_mean_rewards(rewards, [r.input_index for r in rollouts])
            boundaries = [torch.cat([torch.tensor([-1]), b]) for b in boundaries]
            values = [torch.cat([prompt_values[i:i + 1], v.float()]) for i, v in enumerate(values)]
        samples = []
        abs_advantages = []
        for rollout, reward, cuts, state_values in zip(rollouts, rewards.tolist(), boundaries, values):
            if math.isnan(reward) or not rollout.completion_ids:
                continue
            advantages = segment_advantages(cuts, state_values, reward, len(rollout.completion_ids))
            abs_advantages.append(advantages.abs().mean().item())
            samples.append(Sample(prompt_ids=rollout.prompt_ids, completion_ids=rollout.completion_ids,
                                  **sampled_logprobs(rollout), advantages=advantages, reward=reward,
                                  step=step, dataset_row=rows[rollout.input_index],
                                  truncated=rollout.cut_off))
        self._metric("spo/num_segments", sum(b.numel() for b in boundaries) / max(1, len(boundaries)))
        self._metric("spo/mean_abs_advantage", sum(abs_advantages) / max(1, len(abs_advantages)))
        return samples
