"""The RL loop on accelerate, shared by every algorithm: prompts -> algorithm -> TrainBatch -> Learner.

Subclasses implement :meth:`RLTrainer.make_samples` (how a step's prompts become training samples with
token-level advantages). This class orchestrates: data order, rollouts and rewards, the sample buffer, the
hand-over to the :class:`~spo.trainer.learner.Learner` (which owns the update, precision and the distributed
strategy), metrics, evaluation and checkpoints (:mod:`spo.trainer.state`).

Each process takes an equal share of a step's prompts and generates whole groups for them, so the samples of a
group (and their advantages) never span processes; whitening statistics and metrics are reduced over processes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from rewards import compute_rewards, get_reward, reward_name

from ..data import tokenize_dataset
from ..models import ensure_pad_token, has_native_bfloat16, load_model, load_tokenizer, setup_cpu_math
from . import checkpoint as ckpt
from .config import GRPOConfig, check_fits_model, prompt_limit
from .distributed import make_accelerator, shards_weights, use_cpu
from .learner import LEARNER_METRICS, Learner
from .output_dir import check_previous_run, check_writable, lock
from .samples import Sample, TrainBatch, buffer_score, train_batch
from .schedule import run_progress
from .state import CheckpointingMixin
from .tracking import MetricsLog, TrackingMixin

logger = logging.getLogger(__name__)

# metrics every trainer may report (algorithms add their own in ``algorithm_metrics``)
TRAINER_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/max_length",
                   "completions/clipped_ratio", "kv/peak_kv_bytes", "kv/full_kv_bytes", "kv/peak_fraction",
                   "rewards/skipped", "tokens/step", "tokens/generated_total", "timing/rollout", "timing/update",
                   "timing/step", "timing/train_total", "learning_rate", "perf/peak_memory_gib",
                   "spo/mean_abs_advantage", "ssb/effective_fraction_before", "ssb/size", "ssb/reinjected", "ssb/mean_age",
                   "ssb/effective_fraction_after", "eval/accuracy", "eval/problems")



class RLTrainer(CheckpointingMixin, TrackingMixin):
    algorithm = "base"
    algorithm_metrics: tuple[str, ...] = ()

    @staticmethod
    def _resolve_precision(args: GRPOConfig) -> tuple[bool | None, str | None]:
        """``bf16`` and ``rollout_dtype`` with ``auto`` decided for this machine: bfloat16 only where the device
        computes it natively, since emulated bf16 is slower than float32."""
        if "auto" not in (args.bf16, args.rollout_dtype):
            return args.bf16, args.rollout_dtype
        native = has_native_bfloat16("cpu" if use_cpu() else "cuda")
        bf16 = native if args.bf16 == "auto" else args.bf16
        rollout_dtype = ("bfloat16" if native else "float32") if args.rollout_dtype == "auto" else args.rollout_dtype
        logger.info("precision auto: %s (%s)", "bfloat16" if native else "float32",
                    "native bf16 on this device" if native else "this device has no native bf16")
        return bf16, rollout_dtype

    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None):
        self.args = args = args or GRPOConfig()
        if train_dataset is None or "prompt" not in train_dataset.column_names:
            raise ValueError("train_dataset must be a datasets.Dataset with a 'prompt' column")
        self.output_dir = Path(args.output_dir)
        check_writable(self.output_dir)
        trackers = [t for t in args.report_to if t != "none"]
        bf16, rollout_dtype = self._resolve_precision(args)
        # bf16 None: the launcher's setting (accelerate launch --mixed_precision / its config file) decides
        mixed_precision = None if bf16 is None else ("bf16" if bf16 else "no")
        self.accelerator = make_accelerator(log_with=trackers or None, project_dir=str(self.output_dir),
                                            mixed_precision=mixed_precision)
        main = self.accelerator.is_main_process
        if main:
            lock(self.output_dir)
        check_previous_run(self.output_dir, resume=bool(args.resume_from_checkpoint),
                           overwrite=args.overwrite_output_dir, main=main)
        self.accelerator.wait_for_everyone()
        set_seed(args.seed, device_specific=True)
        if self.accelerator.device.type == "cpu":
            setup_cpu_math()

        if isinstance(model, (str, os.PathLike)):
            processing_class = processing_class or load_tokenizer(model)
            model = load_model(model, device=self.accelerator.device)
        if processing_class is None:
            processing_class = load_tokenizer(model.config._name_or_path)
        self.tokenizer = ensure_pad_token(processing_class)
        check_fits_model(args, model.config)
        if peft_config is not None:
            import lora_shards  # noqa: F401  (registers MoS with PEFT)
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the old name is deprecated in transformers 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        self.uses_adapters = peft_config is not None or hasattr(model, "disable_adapter")

        funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        self.reward_funcs = [get_reward(f) for f in funcs]
        if not self.reward_funcs:
            raise ValueError("reward_funcs must name at least one reward function")
        self.reward_names = [reward_name(f) if not isinstance(f, str) else f for f in funcs]
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} values for "
                             f"{len(self.reward_funcs)} reward functions")
        self.metric_keys = (TRAINER_METRICS + LEARNER_METRICS + self.algorithm_metrics
                            + tuple(f"rewards/{name}/mean" for name in self.reward_names))

        ckpt.check_free_space(self.output_dir, ckpt.estimate_checkpoint_bytes(model))
        from ..rollout.snapshot import PolicySnapshot

        if rollout_dtype is None and shards_weights(self.accelerator):
            # sharded weights are gathered by collectives inside every forward, and processes decode different
            # numbers of steps: they sample (and evaluate) from a gathered copy instead
            rollout_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        # copied before the learner shards or upcasts the model; refreshed from it before every step
        self.snapshot = PolicySnapshot(model, rollout_dtype) if rollout_dtype else None
        # the run's progress, which a budget-ended run's learning-rate schedule reads from the start
        self.step = 0
        self.tokens_generated = 0  # over all processes, rollouts and Monte Carlo continuations alike
        self.train_seconds = 0.0  # the training steps' time, averaged over processes (they wait for each other)
        self.learner = Learner(self.accelerator, model, args, self.tokenizer.pad_token_id, self.uses_adapters,
                               run_progress=self._run_progress)

        world = self.accelerator.num_processes
        if args.prompts_per_step % world:
            raise ValueError(f"prompts_per_step={args.prompts_per_step} must be divisible by the number of "
                             f"processes ({world})")
        self.prompts_per_process = args.prompts_per_step // world
        max_prompt_tokens, limit_name = prompt_limit(args, self.unwrapped.config)
        # rows with an unusable prompt are an error, or left out (prompt_errors="skip") and listed here
        train_dataset, self.prompt_ids, self.skipped_prompts = tokenize_dataset(
            self.tokenizer, train_dataset, max_prompt_tokens, args.prompt_errors, limit_name=limit_name)
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        # columns as Python lists once: reward functions read them for every rollout and continuation
        self.prompts = list(train_dataset["prompt"])
        self.column_values = {c: list(train_dataset[c]) for c in train_dataset.column_names if c != "prompt"}

        from ..rollout import Generator

        self.generator = Generator(self.sampling_model, self.tokenizer, kv_policy=args.kv_policy,
                                   kv_budget=args.kv_budget, kv_kwargs=dict(args.kv_kwargs),
                                   max_batch_rows=args.generation_batch_size)
        self._eval_generator = None
        self._eval_snapshot = None  # the merged copy evaluation decodes (see _evaluation_model)
        self.buffer = None
        if args.use_sample_buffer:
            from ..buffer import SelectiveSampleBuffer

            # seeded per process: each process draws from its own samples
            self.buffer = SelectiveSampleBuffer(capacity=args.buffer_capacity, alpha=args.buffer_alpha,
                                                max_age=args.buffer_max_age,
                                                target_fraction=args.buffer_target_fraction,
                                                seed=args.seed + 7919 * self.accelerator.process_index)
        self.interrupt_requested = False  # set by ``spo train``'s SIGINT handler
        self.data_epoch = 0
        self.data_position = 0
        self._metrics: dict[str, float] = {}
        self.metrics_log = MetricsLog(self.output_dir, enabled=self.accelerator.is_main_process)
        self._trackers_started = False

    # --- set-up helpers ------------------------------------------------------------------------------------------

    @property
    def model(self):
        """The prepared (possibly DDP/FSDP/DeepSpeed-wrapped) policy."""
        return self.learner.model

    @property
    def unwrapped(self):
        return self.learner.unwrapped

    @property
    def sampling_model(self):
        return self.snapshot.model if self.snapshot is not None else self.unwrapped

    def sampling_params(self, step: int):
        from ..rollout import SamplingParams

        args = self.args
        # a seed per (step, process) makes rollouts reproducible and identical after a resume
        seed = args.seed * 1_000_003 + step * 1009 + self.accelerator.process_index
        return SamplingParams(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, stop=list(args.stop), seed=seed)

    def score_completions(self, dataset_rows: list[int], texts: list[str], completion_ids: list[list[int]],
                          truncated: list[bool], record: bool = True) -> torch.Tensor:
        """Rewards [N] of completions answering the given dataset rows (``truncated``: cut at the length limit);
        NaN marks samples a misbehaving reward function made us skip. ``record`` logs the per-function means."""
        prompts = [self.prompts[i] for i in dataset_rows]
        columns = {c: [values[i] for i in dataset_rows] for c, values in self.column_values.items()}
        scores = compute_rewards(self.reward_funcs, prompts=prompts, completions=texts, completion_ids=completion_ids,
                                 columns=columns, weights=self.args.reward_weights,
                                 on_error=self.args.reward_errors, names=self.reward_names,
                                 timeout=self.args.reward_timeout, truncated=truncated)
        skipped = float(sum(scores.skipped.values()))
        self._metrics["rewards/skipped"] = self._metrics.get("rewards/skipped", 0.0) + skipped
        if record:
            for j, name in enumerate(self.reward_names):
                self._metric(f"rewards/{name}/mean", torch.nanmean(scores.per_function[:, j]).item())
        return scores.total

    def generate_groups(self, rows: list[int], step: int):
        """``num_generations`` rollouts per prompt, ordered group by group, with their rewards [N] (rollout
        metrics recorded)."""
        batch = self.generator.generate([self.prompt_ids[i] for i in rows], self.sampling_params(step),
                                        num_return_sequences=self.args.num_generations)
        rollouts = sorted(batch.rollouts, key=lambda r: r.input_index)
        self.count_generated(rollouts)
        rewards = self.score_completions([rows[r.input_index] for r in rollouts], [r.text for r in rollouts],
                                         [r.completion_ids for r in rollouts],
                                         [r.cut_off for r in rollouts])
        self.record_rollout_metrics(rewards, rollouts, [r.input_index for r in rollouts], batch.stats)
        return rollouts, rewards

    # --- the algorithm's part --------------------------------------------------------------------------------------

    def make_samples(self, rows: list[int], step: int) -> list[Sample]:
        raise NotImplementedError

    def train_batch(self, samples: list[Sample]) -> TrainBatch:
        """The learner's input: final advantages (whitened over all processes when asked) and loss masks."""
        return train_batch(samples, self.args, self.learner.sum_over_processes)

    # --- the loop --------------------------------------------------------------------------------------------------

    def train(self):
        """Train to ``max_steps`` (or the token or time budget); returns the logged metrics (main process). The
        process group stays up, so ``evaluate()`` still works afterwards under several processes; ``close()`` ends it."""
        args = self.args
        if args.resume_from_checkpoint:
            self.resume(args.resume_from_checkpoint)
            spent = self._budget_reached()
            if self.step >= args.max_steps or spent:
                if spent:
                    logger.warning("nothing to train: the checkpoint at step %d has spent the %s; raise it to "
                                   "continue", self.step, spent)
                else:
                    logger.warning("nothing to train: the checkpoint is at step %d and max_steps is %d; raise "
                                   "--train.max_steps to continue", self.step, args.max_steps)
                if not (self.output_dir / ("adapter" if self.uses_adapters else "model")).is_dir():
                    self.save_model(self.output_dir)  # a run killed after its last checkpoint
                return self.metrics_log.history() if self.accelerator.is_main_process else []
        self.metrics_log.truncate_after(self.step)  # rows a killed run logged past its last checkpoint are redone
        self._start_trackers()
        with self.progress(args.max_steps, initial=self.step) as bar:
            self._train_steps(bar)
        self.save_checkpoint()
        self.save_model(self.output_dir)
        if self.accelerator.is_main_process:
            self.metrics_log.plot()
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self._trackers_started = False
        return self.metrics_log.history() if self.accelerator.is_main_process else []

    def _train_steps(self, bar) -> None:
        """From ``self.step`` to ``max_steps`` (or the token or time budget); ``bar`` shows each step's reward and
        speed."""
        args = self.args
        for step in range(self.step, args.max_steps):
            if self.interrupt_requested:  # a Ctrl-C whose KeyboardInterrupt was swallowed (raised inside a __del__)
                raise KeyboardInterrupt
            self.step = step
            self._metrics = {}
            started = time.perf_counter()
            self.unwrapped.eval()
            if self.snapshot is not None:
                self.snapshot.refresh()
            rows = self.next_prompts()
            samples = self._apply_buffer(self.make_samples(rows, step), step)
            batch = self.train_batch(samples)
            self._metric("timing/rollout", time.perf_counter() - started)
            update_started = time.perf_counter()
            self._metrics.update(self.learner.update(batch, step))
            self._metric("timing/update", time.perf_counter() - update_started)
            self._metric("timing/step", time.perf_counter() - started)
            if self.accelerator.device.type == "cuda":
                self._metric("perf/peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30)
                torch.cuda.reset_peak_memory_stats()
            self.step = step + 1
            local = torch.tensor([float(self._metrics.get("tokens/step", 0.0)), self._metrics["timing/step"]],
                                 dtype=torch.float64)
            tokens, seconds = self.learner.sum_over_processes(local).tolist()  # every process gets the same sums
            self.tokens_generated += int(tokens)
            self.train_seconds += seconds / self.accelerator.num_processes
            self._metric("tokens/generated_total", float(self.tokens_generated))
            self._metric("timing/train_total", self.train_seconds)
            self.learner.scheduler.step()
            self._metric("learning_rate", self.learner.scheduler.get_last_lr()[0])  # the next step's
            if args.eval_steps and self.eval_dataset is not None and self.step % args.eval_steps == 0:
                self._metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            budget_reached = self._budget_reached()
            if self.step % args.logging_steps == 0 or self.step == args.max_steps or budget_reached:
                logged = self._log()
                bar.set_postfix(reward=f"{logged.get('reward', float('nan')):.3f}",
                                tokens_per_s=f"{logged.get('perf/tokens_per_second', float('nan')):.0f}", refresh=False)
            bar.update(1)
            if budget_reached:
                logger.info("%s reached at step %d", budget_reached, self.step)
                break
            if args.save_steps and self.step % args.save_steps == 0 and self.step < args.max_steps:
                self.save_checkpoint()

    def _run_progress(self) -> float:
        args = self.args
        return run_progress(self.step, args.max_steps, self.tokens_generated, args.max_generated_tokens,
                            self.train_seconds, args.max_train_seconds)

    def _budget_reached(self) -> str | None:
        """Which of the run's budgets, other than ``max_steps``, is spent (None: neither)."""
        args = self.args
        if args.max_generated_tokens is not None and self.tokens_generated >= args.max_generated_tokens:
            return f"token budget of {args.max_generated_tokens}"
        if args.max_train_seconds is not None and self.train_seconds >= args.max_train_seconds:
            return f"time budget of {args.max_train_seconds:g} s"
        return None

    def close(self) -> None:
        """End the run: trackers and the process group (after the last ``train`` or ``evaluate``). The model stays
        usable in this process, unwrapped."""
        self.accelerator.wait_for_everyone()
        # DDP's reducer holds the process group: freed after a peer has exited, gloo's destructor waits forever
        self.learner.release_wrapper()
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()

    def next_prompts(self) -> list[int]:
        """Dataset rows for this step and process; a seeded permutation per epoch, the position saved in checkpoints."""
        rows = []
        rank = self.accelerator.process_index
        needed = self.args.prompts_per_step
        while len(rows) < needed:
            order = torch.randperm(len(self.train_dataset),
                                   generator=torch.Generator().manual_seed(self.args.seed + self.data_epoch)).tolist()
            take = order[self.data_position:self.data_position + needed - len(rows)]
            rows.extend(take)
            self.data_position += len(take)
            if self.data_position >= len(order):
                self.data_epoch, self.data_position = self.data_epoch + 1, 0
        return rows[rank * self.prompts_per_process:(rank + 1) * self.prompts_per_process]

    def _apply_buffer(self, samples: list[Sample], step: int) -> list[Sample]:
        if self.buffer is None:
            return samples
        scores = [buffer_score(s, self.args) for s in samples]
        effective = [score > self.buffer.eps for score in scores]
        n_effective = sum(effective)
        self._metric("ssb/effective_fraction_before", n_effective / max(1, len(samples)))
        need = self.buffer.needed(n_effective, len(samples))
        drawn = self.buffer.draw(need, step)
        self.buffer.add([s for s, e in zip(samples, effective) if e], [a for a, e in zip(scores, effective) if e],
                        step)
        if drawn:
            # replace zero-advantage samples by replayed ones; their stored behaviour log-probs are the old policy
            zero = set([i for i, e in enumerate(effective) if not e][:len(drawn)])
            samples = [s for i, s in enumerate(samples) if i not in zero]
            for entry in drawn:
                replay = entry.sample
                replay.old_logprobs = replay.behaviour_logprobs
                samples.append(replay)
        self._metric("ssb/size", float(len(self.buffer)))
        self._metric("ssb/reinjected", float(len(drawn)))
        self._metric("ssb/mean_age", float(sum(step - e.step for e in drawn) / len(drawn)) if drawn else 0.0)
        self._metric("ssb/effective_fraction_after", (n_effective + len(drawn)) / max(1, len(samples)))
        return samples

    # --- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, limit: int | None = None) -> dict:
        """Greedy accuracy on the held-out set with the first reward function (main process's share)."""
        from ..evaluation import evaluate

        dataset = eval_dataset or self.eval_dataset
        if dataset is None:
            raise ValueError("no eval_dataset given")
        limit = limit or self.args.eval_limit
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        shard = dataset.shard(world, rank, contiguous=True) if world > 1 else dataset
        was_training = self.unwrapped.training
        self.unwrapped.eval()
        model = self._evaluation_model()
        if self._eval_generator is None:  # held-out accuracy is measured with the full cache
            from ..rollout import Generator

            self._eval_generator = Generator(model, self.tokenizer, max_batch_rows=self.args.generation_batch_size)
        with self.accelerator.autocast():  # the learner's precision, whichever copy decodes
            result = evaluate(model, self.tokenizer, shard, [self.reward_funcs[0]], num_samples=1,
                              temperature=0.0, max_new_tokens=self.args.eval_max_new_tokens or
                              self.args.max_completion_length, batch_size=self.args.generation_batch_size,
                              progress=None if self.accelerator.is_main_process else False,
                              generator=self._eval_generator)
        self.unwrapped.train(was_training)
        correct = torch.tensor([sum(x[0] for x in result.per_problem), len(result.per_problem)],
                               dtype=torch.float64, device=self.accelerator.device)
        correct = self.accelerator.reduce(correct, reduction="sum")
        return {"accuracy": float(correct[0] / correct[1].clamp(min=1)), "problems": float(correct[1])}

    def _evaluation_model(self):
        """The model evaluation decodes, with the policy's current weights. Sharded weights: the gathered rollout
        copy (see __init__). Adapters (unless ``eval_merge_adapter`` is off): a float32 merged copy, so greedy
        decoding pays no adapter matmuls yet gives the unmerged policy's tokens up to float rounding; it is the
        rollout copy when that is float32, else one more copy of the weights, made at the first evaluation (a
        bf16 rollout copy is not used: accuracy would move with bf16 rounding). Otherwise the policy itself."""
        if self.learner.shards_weights:
            return self.snapshot.refresh()
        if not (self.uses_adapters and self.args.eval_merge_adapter):
            return self.unwrapped
        if self.snapshot is not None and self.snapshot.dtype == torch.float32:
            return self.snapshot.refresh()
        if self._eval_snapshot is None:
            from ..rollout.snapshot import PolicySnapshot

            self._eval_snapshot = PolicySnapshot(self.unwrapped, torch.float32)
        return self._eval_snapshot.refresh()
