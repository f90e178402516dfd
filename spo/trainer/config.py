"""Trainer configurations. Field names follow TRL's ``GRPOConfig`` where the meaning is the same."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class GRPOConfig:
    # where and how long
    output_dir: str = "outputs/run"
    run_name: str | None = None
    seed: int = 0
    max_steps: int = 100  # RL iterations: generate -> score -> update
    max_generated_tokens: int | None = None  # stop earlier once this many tokens were sampled (all processes)
    # generation
    prompts_per_step: int = 8  # over all processes; each process takes an equal share
    num_generations: int = 8  # samples per prompt (the group)
    max_prompt_length: int | None = 512  # None: the model's context minus max_completion_length
    # a row of train_dataset whose prompt is empty, malformed or too long: "raise" stops with an error naming the row,
    # "skip" leaves it out (listed in trainer.skipped_prompts and logged)
    prompt_errors: Literal["raise", "skip"] = "raise"
    max_completion_length: int = 256
    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    # rows decoded at once, a multiple of num_generations (a prompt's group decodes together); None: 64 rounded down
    # to a multiple of num_generations
    generation_batch_size: int | None = None
    kv_policy: str = "full"
    kv_budget: float | None = None  # tokens (>= 1) or a fraction of the sequence (< 1)
    kv_kwargs: dict = field(default_factory=dict)
    # sample from a merged copy of the policy in this dtype ("bfloat16", "float16", "float32"), refreshed after
    # every optimizer step; None samples from the policy itself, adapters live (see spo.rollout.snapshot)
    rollout_dtype: str | None = None
    # advantages and loss
    advantage_estimator: Literal["grpo", "rloo", "dr_grpo"] = "grpo"
    scale_rewards: bool = True
    whiten_advantages: bool = False
    probability_mask: bool = False
    probability_threshold: float = 0.9
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None  # clip-higher; None = epsilon
    loss_type: Literal["dapo", "bnpo", "grpo", "dr_grpo"] = "dapo"  # see spo.loss.LOSS_TYPES
    mask_truncated_completions: bool = False
    importance_sampling_cap: float | None = 2.0  # truncated IS weights against the sampler's log-probs; None = off
    # optimisation
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_ratio: float = 0.03
    lr_scheduler_type: Literal["linear", "constant", "cosine"] = "linear"
    max_grad_norm: float = 1.0
    num_iterations: int = 1  # passes over each generated batch
    per_device_train_batch_size: int = 8  # completions per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    gradient_checkpointing: bool = False
    # bfloat16 autocast for the learner's forward and backward (accelerate mixed precision; trained weights stay
    # float32); None follows the launcher (accelerate launch --mixed_precision or its config file)
    bf16: bool | None = None
    # selective sample buffer
    use_sample_buffer: bool = False
    buffer_capacity: int = 512
    buffer_alpha: float = 1.0
    buffer_max_age: int = 8
    buffer_target_fraction: float = 0.6
    # rewards
    reward_weights: list[float] | None = None
    reward_errors: Literal["raise", "skip"] = "raise"  # skip: samples a reward function fails on are dropped
    reward_timeout: float | None = 60.0  # seconds each reward function may take per batch
    # logging, evaluation, checkpoints
    logging_steps: int = 1
    report_to: list[str] = field(default_factory=lambda: ["wandb"])
    log_completions: bool = True
    num_completions_to_print: int = 0
    eval_steps: int | None = None
    eval_limit: int | None = 200
    eval_max_new_tokens: int | None = None
    save_steps: int | None = 50
    save_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest"

    def __post_init__(self):
        if self.generation_batch_size is None and self.num_generations >= 1:
            self.generation_batch_size = max(1, 64 // self.num_generations) * self.num_generations
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
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
            (self.advantage_estimator != "rloo" or self.num_generations >= 2, "RLOO needs num_generations >= 2"),
            (self.rollout_dtype in (None, "float32", "bfloat16", "float16"),
             f"rollout_dtype must be null, 'float32', 'bfloat16' or 'float16', got {self.rollout_dtype!r}"),
            (self.generation_batch_size is not None and self.generation_batch_size >= 1,
             "generation_batch_size must be >= 1"),
            (self.num_generations < 1 or (self.generation_batch_size or 1) % self.num_generations == 0,
             f"generation_batch_size={self.generation_batch_size} must be a multiple of num_generations="
             f"{self.num_generations}: the completions of a prompt are decoded in the same batch"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError("max_prompt_length must be >= 1")

    @property
    def epsilon_upper(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def model_context(model_config) -> int | None:
    """The model's context window in tokens (``max_position_embeddings``), or None when its config does not say."""
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    context = getattr(text_config, "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else None


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
        raise ValueError(f"{what} tokens do not fit the model's context (max_position_embeddings={context}); "
                         "lower them")
    budget = args.kv_budget
    if budget is not None and budget > 1 and budget > context:
        raise ValueError(f"kv_budget={budget:g} tokens is larger than the model's context "
                         f"(max_position_embeddings={context}); give at most {context} tokens or a fraction in (0, 1]")


@dataclass
class SPOChainConfig(GRPOConfig):
    """SPO-chain: cutpoint segments valued by Monte Carlo continuations (docs/ALGORITHMS.md section 2)."""

    mc_samples: int = 9  # K continuations per state
    cutpoint_interval: int = 5  # keep every k-th cutpoint ("int5")
    partition: Literal["cutpoint", "fixed", "newline"] = "cutpoint"
    num_fixed_segments: int = 4  # partition="fixed" only
    max_mc_states_per_step: int | None = None  # cap on distinct states valued per step (per process)
    mc_share_prefixes: bool = True  # encode each state once and fork its cache K ways (False: re-encode K times)
    # the bare prompt is every rollout's first boundary, valued by the mean reward of its group's rollouts (a
    # Monte Carlo value with K = num_generations that costs no extra sampling); False: docs/ALGORITHMS.md 2.3 as
    # published, where tokens before the first cutpoint get advantage 0
    group_prompt_value: bool = False
    probability_mask: bool = True
    whiten_advantages: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.mc_samples < 1:
            raise ValueError("mc_samples must be >= 1")
        if self.cutpoint_interval < 1:
            raise ValueError("cutpoint_interval must be >= 1")
        if self.max_mc_states_per_step is not None and self.max_mc_states_per_step < 1:
            raise ValueError("max_mc_states_per_step must be >= 1")


@dataclass
class SPOTreeConfig(GRPOConfig):
    """SPO-tree: a tree of segments per prompt, values as the mean over children (docs/ALGORITHMS.md section 3)."""

    branching: list[int] = field(default_factory=lambda: [6, 6, 6])  # children per node, level by level
    segment_length: int = 30  # token budget M of every level but the last
    normalize_by_sibling_std: bool = False
    edges_per_question: int = 32
    replay_max_age: int = 8
    num_generations: int = 1  # unused by the tree (branching[0] plays its part)
    probability_mask: bool = True
    whiten_advantages: bool = True

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
