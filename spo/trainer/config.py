"""Trainer configurations. Field names follow TRL's ``GRPOConfig`` where the meaning is the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..errors import ConfigError
from ..models import model_context


def _f(default=None, help: str = "", factory=None):
    """A field with one line of help for ``spo train --help`` (TRL's ``field(metadata={"help": ...})``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class GRPOConfig:
    # a group baseline (grpo, dr_grpo, rloo) needs at least two completions per prompt; SPO's values do not
    needs_groups: ClassVar[bool] = True
    # where and how long
    output_dir: str = _f("outputs/run", "folder for checkpoints, metrics, completions and the final adapter or model")
    run_name: str | None = _f(None, "run name in the trackers (wandb); null: the output folder's name")
    seed: int = _f(0, "random seed (rollouts, data order, adapter initialisation)")
    max_steps: int = _f(100, "RL iterations: generate -> score -> update")
    max_generated_tokens: int | None = _f(None, "stop earlier once this many tokens were sampled (all processes)")
    max_train_seconds: float | None = _f(None, "stop earlier once the training steps (rollouts and updates) took "
                                               "this many seconds")
    # generation
    prompts_per_step: int = _f(8, "prompts per step over all processes; each process takes an equal share")
    num_generations: int = _f(8, "completions sampled per prompt (the group)")
    max_prompt_length: int | None = _f(512, "longest prompt in tokens; null: the model's context minus "
                                            "max_completion_length")
    prompt_errors: Literal["raise", "skip"] = _f("raise", "a row whose prompt is empty, malformed or too long: raise "
                                                          "an error naming it, or skip it")
    max_completion_length: int = _f(256, "longest completion in tokens")
    temperature: float = _f(0.6, "sampling temperature (the loss uses logits / temperature)")
    top_p: float = _f(0.9, "nucleus sampling: the smallest set of tokens with this probability")
    top_k: int = _f(0, "sample among the k most likely tokens; 0: no limit")
    stop: list[str] = _f(help="strings that end a completion", factory=list)
    generation_batch_size: int | None = _f(None, "rows decoded at once, a multiple of num_generations; null: 64 "
                                                 "rounded down to one")
    kv_policy: str = _f("full", "rollout KV cache policy: full, streaming, h2o, snapkv, windowkv or lazy")
    kv_budget: float | None = _f(None, "KV budget: tokens (>= 1) or a fraction (of the prompt: snapkv, windowkv; "
                                       "else prompt + that of the completion)")
    kv_kwargs: dict = _f(help="further options of the KV cache policy", factory=dict)
    rollout_dtype: str | None = _f(None, "sample from a merged policy copy in this dtype (auto: bfloat16 where native, "
                                         "else float32); null: the policy")
    # advantages and loss
    advantage_estimator: Literal["grpo", "rloo", "dr_grpo"] = _f(
        "grpo", "group baseline: grpo (group mean, / std), rloo (leave one out) or dr_grpo (group mean)")
    scale_rewards: bool = _f(True, "grpo: divide advantages by the group's reward std")
    whiten_advantages: bool = _f(False, "normalise the batch's advantages to mean 0 and std 1 over trained tokens")
    probability_mask: bool = _f(False, "train only tokens sampled with a probability below probability_threshold")
    probability_threshold: float = _f(0.9, "token probability at and above which the probability mask drops a token")
    beta: float = _f(0.0, "KL penalty against the reference (the model without adapters); 0: none")
    epsilon: float = _f(0.2, "PPO clip range below 1 (and above, unless epsilon_high is set)")
    epsilon_high: float | None = _f(None, "clip range above 1 (clip-higher); null: epsilon")
    loss_type: Literal["dapo", "bnpo", "grpo", "dr_grpo"] = _f(
        "dapo", "loss normaliser: dapo (the step's tokens), bnpo (this process's), grpo (per sequence), dr_grpo")
    mask_truncated_completions: bool = _f(False, "leave completions cut at max_completion_length out of the loss")
    importance_sampling_sequence_band: list[float] | None = _f(
        help="[low, high]: mask out completions whose geometric-mean learner/sampler ratio leaves it; null: none",
        factory=lambda: [0.5, 2.0])
    importance_sampling_cap: float | None = _f(2.0, "cap of the importance weights against the sampler's log-probs; "
                                                    "null: no weights (uncorrected)")
    # optimisation
    learning_rate: float = _f(1e-5, "AdamW learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    warmup_ratio: float = _f(0.03, "fraction of the run over which the learning rate warms up from 0")
    lr_scheduler_type: Literal["linear", "constant", "cosine"] = _f(
        "linear", "schedule after warmup, over max_steps or the token or time budget that ends the run sooner")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this; 0: no clipping")
    num_iterations: int = _f(1, "optimisation passes over each generated batch")
    per_device_train_batch_size: int = _f(8, "completions per micro-batch")
    learner_packing: Literal["prefix_tree", "padding_free", "padded"] = _f(
        "prefix_tree", "micro-batch layout: one packed row, shared prefixes once / packed, no sharing / padded rows")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass to save memory")
    bf16: bool | Literal["auto"] | None = _f(
        None, "bfloat16 autocast for the learner (weights stay float32); auto: where native; null: as the launcher says")
    # selective sample buffer
    use_sample_buffer: bool = _f(False, "re-inject cached samples with non-zero advantage (selective sample buffer)")
    buffer_capacity: int = _f(512, "samples the buffer holds")
    buffer_alpha: float = _f(1.0, "buffer draws samples with probability proportional to |advantage| ** alpha")
    buffer_max_age: int = _f(8, "steps a sample stays in the buffer")
    buffer_target_fraction: float = _f(0.6, "share of a step's samples with non-zero advantage the buffer tops up to")
    # rewards
    reward_weights: list[float] | None = _f(None, "weight of each reward function; null: 1 each")
    reward_errors: Literal["raise", "skip"] = _f("raise", "a reward function that fails: raise an error naming it, "
                                                          "or skip those samples")
    reward_timeout: float | None = _f(60.0, "seconds each reward function may take per batch; null: no limit")
    # logging, evaluation, checkpoints
    logging_steps: int = _f(1, "log metrics every this many steps")
    report_to: list[str] = _f(help="trackers (accelerate's: wandb, tensorboard, ...); [none]: no tracker",
                              factory=lambda: ["wandb"])
    log_completions: bool = _f(True, "write each logged step's completions to completions.jsonl and the trackers")
    num_completions_to_print: int = _f(0, "completions of each logged step printed to the log (prompt end, completion, "
                                          "reward); 0: none")
    eval_steps: int | None = _f(None, "held-out evaluation every this many steps; null: none during training")
    eval_limit: int | None = _f(200, "held-out problems per evaluation; null: all of them")
    eval_merge_adapter: bool = _f(True, "evaluate a float32 copy with the adapters merged (faster; one more copy "
                                        "of the weights)")
    eval_max_new_tokens: int | None = _f(None, "longest completion at evaluation; null: max_completion_length")
    save_steps: int | None = _f(50, "checkpoint every this many steps; null: only at the end")
    save_total_limit: int | None = _f(2, "checkpoints kept; null: all")
    resume_from_checkpoint: str | None = _f(None, "continue from a checkpoint folder, or latest (what --resume sets)")
    overwrite_output_dir: bool = _f(False, "start over in an output_dir that holds an earlier run, removing its "
                                           "checkpoints, metrics and model")

    def __post_init__(self):
        if self.generation_batch_size is None and self.num_generations >= 1:
            self.generation_batch_size = max(1, 64 // self.num_generations) * self.num_generations
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.max_generated_tokens is None or self.max_generated_tokens >= 1, "max_generated_tokens must be >= 1"),
            (self.max_train_seconds is None or self.max_train_seconds > 0, "max_train_seconds must be > 0"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.num_generations >= 1, "num_generations must be >= 1"),
            (self.max_completion_length >= 1, "max_completion_length must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (the loss uses logits / temperature)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.per_device_train_batch_size >= 1, "per_device_train_batch_size must be >= 1"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1"),
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.epsilon > 0, "epsilon must be > 0"),
            (self.beta >= 0, "beta must be >= 0"),
            (0 < self.probability_threshold <= 1, "probability_threshold must be in (0, 1]"),
            (self.kv_budget is None or self.kv_budget > 0, "kv_budget must be > 0"),
            (self.importance_sampling_cap is None or self.importance_sampling_cap >= 1,
             "importance_sampling_cap must be >= 1"),
            (self.importance_sampling_sequence_band is None or (len(self.importance_sampling_sequence_band) == 2
             and 0 <= self.importance_sampling_sequence_band[0] <= 1 <= self.importance_sampling_sequence_band[1]),
             f"importance_sampling_sequence_band must be [low, high] with low <= 1 <= high, got "
             f"{self.importance_sampling_sequence_band}"),
            (self.advantage_estimator != "rloo" or self.num_generations >= 2, "RLOO needs num_generations >= 2"),
            (not self.needs_groups or self.num_generations >= 2,
             f"num_generations must be >= 2 for the group baseline ({self.advantage_estimator}), got "
             f"{self.num_generations}: with one completion per prompt every advantage is zero"),
            (self.epsilon_high is None or self.epsilon_high > 0, f"epsilon_high must be > 0, got {self.epsilon_high}"),
            (0 <= self.warmup_ratio <= 1, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}"),
            (self.logging_steps >= 1, f"logging_steps must be >= 1, got {self.logging_steps}"),
            (self.eval_steps is None or self.eval_steps >= 0, f"eval_steps must be >= 1, or 0 or null for none; got {self.eval_steps}"),
            (self.save_steps is None or self.save_steps >= 0, f"save_steps must be >= 1, or 0 or null for none; got {self.save_steps}"),
            (self.eval_limit is None or self.eval_limit >= 1, f"eval_limit must be >= 1 or null, got {self.eval_limit}"),
            (self.reward_timeout is None or self.reward_timeout > 0,
             f"reward_timeout must be > 0 seconds or null, got {self.reward_timeout}"),
            (self.rollout_dtype in (None, "auto", "float32", "bfloat16", "float16"),
             f"rollout_dtype must be null, 'auto', 'float32', 'bfloat16' or 'float16', got {self.rollout_dtype!r}"),
            (self.bf16 in (None, True, False, "auto"), f"bf16 must be true, false, 'auto' or null, got {self.bf16!r}"),
            (self.generation_batch_size is not None and self.generation_batch_size >= 1,
             "generation_batch_size must be >= 1"),
            (self.num_generations < 1 or (self.generation_batch_size or 1) % self.num_generations == 0,
             f"generation_batch_size={self.generation_batch_size} must be a multiple of num_generations="
             f"{self.num_generations}: the completions of a prompt are decoded in the same batch"),
        ]
        if not self.needs_groups:  # SPO values segments itself: the group-baseline settings would do nothing
            for name, default in (("advantage_estimator", "grpo"), ("scale_rewards", True)):
                checks.append((getattr(self, name) == default,
                               f"{name}={getattr(self, name)!r} is a GRPO setting that {type(self).__name__} does not "
                               f"use (its advantages come from segment values): leave it out"))
        checks.append((self.num_completions_to_print >= 0,
                       f"num_completions_to_print must be >= 0, got {self.num_completions_to_print}"))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError("max_prompt_length must be >= 1")

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def prompt_limit(args: GRPOConfig, model_config) -> tuple[int | None, str]:
    """The longest prompt in tokens, and how to name that limit in messages: ``max_prompt_length``, else what the
    model's context leaves after ``max_completion_length``."""
    if args.max_prompt_length is not None:
        return args.max_prompt_length, f"max_prompt_length={args.max_prompt_length}"
    context = model_context(model_config)
    if context is None:
        return None, "no limit"
    return (context - args.max_completion_length,
            f"the {context - args.max_completion_length} tokens the model's context (max_position_embeddings="
            f"{context}) leaves after max_completion_length={args.max_completion_length}")


def check_fits_model(args: GRPOConfig, model_config) -> None:
    """Fail before training when the lengths or the KV budget asked for cannot fit the model's context window."""
    context = model_context(model_config)
    if context is None:
        return
    prompt = args.max_prompt_length if args.max_prompt_length is not None else 1
    if prompt + args.max_completion_length > context:
        what = ("max_prompt_length + max_completion_length = "
                f"{args.max_prompt_length} + {args.max_completion_length}" if args.max_prompt_length is not None
                else f"max_completion_length = {args.max_completion_length} (plus at least one prompt token)")
        raise ConfigError(f"{what} tokens do not fit the model's context (max_position_embeddings={context}); "
                          "lower them")
    budget = args.kv_budget
    if budget is not None and budget > 1 and budget > context:
        raise ConfigError(f"kv_budget={budget:g} tokens is larger than the model's context "
                          f"(max_position_embeddings={context}); give at most {context} tokens or a fraction in (0, 1]")


@dataclass
class SPOChainConfig(GRPOConfig):
    """SPO-chain: cutpoint segments valued by Monte Carlo continuations (docs/ALGORITHMS.md section 2)."""

    needs_groups: ClassVar[bool] = False  # segments are valued by Monte Carlo, not by the group

    mc_samples: int = _f(9, "Monte Carlo continuations per state (K)")
    cutpoint_interval: int = _f(5, "keep every k-th cutpoint as a segment boundary")
    partition: Literal["cutpoint", "fixed", "newline"] = _f(
        "cutpoint", "segment boundaries: cutpoint (low-probability tokens), fixed (equal parts) or newline")
    num_fixed_segments: int = _f(4, "segments per completion with partition fixed")
    max_mc_states_per_step: int | None = _f(
        None, "cap on distinct states valued per step (per process); null: none; 0 (group_prompt_value): none valued")
    mc_share_prefixes: bool = _f(True, "encode each state once and fork its cache K ways (false: re-encode K times)")
    # the bare prompt is every rollout's first boundary, valued by the mean reward of its group's rollouts (a
    # Monte Carlo value with K = num_generations that costs no extra sampling); False: docs/ALGORITHMS.md 2.3 as
    # published, where tokens before the first cutpoint get advantage 0
    group_prompt_value: bool = _f(False, "the bare prompt is every rollout's first boundary, valued by its group's "
                                         "mean reward")
    probability_mask: bool = _f(True, "train only tokens sampled with a probability below probability_threshold")
    whiten_advantages: bool = _f(True, "normalise the batch's advantages to mean 0 and std 1 over trained tokens")

    def __post_init__(self):
        super().__post_init__()
        if self.mc_samples < 1:
            raise ValueError("mc_samples must be >= 1")
        if self.cutpoint_interval < 1:
            raise ValueError("cutpoint_interval must be >= 1")
        if self.max_mc_states_per_step is not None and self.max_mc_states_per_step < 0:
            raise ValueError("max_mc_states_per_step must be >= 0 (or null for no cap)")
        if self.max_mc_states_per_step == 0 and not self.group_prompt_value:
            raise ValueError("max_mc_states_per_step: 0 values no state, which leaves every rollout without a base "
                             "value; it needs group_prompt_value: true (each rollout then gets R - mean(group))")


@dataclass
class SPOTreeConfig(GRPOConfig):
    """SPO-tree: a tree of segments per prompt, values as the mean over children (docs/ALGORITHMS.md section 3)."""

    needs_groups: ClassVar[bool] = False  # values are means over the tree's own rollouts

    branching: list[int] = _f(help="children per node, level by level (its length is the tree's depth)",
                              factory=lambda: [6, 6, 6])
    segment_length: int = _f(30, "tokens per segment (M) at every level but the last")
    normalize_by_sibling_std: bool = _f(False, "divide each edge's advantage by the std of its siblings' values")
    edges_per_question: int = _f(32, "edges trained per prompt and step; the rest wait in the replay")
    replay_max_age: int = _f(8, "steps an unused edge waits in the replay")
    num_generations: int = _f(1, "unused by the tree (branching[0] plays its part)")
    probability_mask: bool = _f(True, "train only tokens sampled with a probability below probability_threshold")
    whiten_advantages: bool = _f(True, "normalise the batch's advantages to mean 0 and std 1 over trained tokens")

    def __post_init__(self):
        super().__post_init__()
        if not self.branching or any(b < 1 for b in self.branching):
            raise ValueError("branching must list at least one level, each with >= 1 children")
        if self.segment_length < 1:
            raise ValueError("segment_length must be >= 1")
        if (len(self.branching) - 1) * self.segment_length >= self.max_completion_length:
            raise ValueError(f"(depth - 1) * segment_length = {(len(self.branching) - 1) * self.segment_length} "
                             f"leaves no room for the last level in max_completion_length="
                             f"{self.max_completion_length}")
