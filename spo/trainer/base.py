"""The RL loop on accelerate, shared by every algorithm: generate -> score -> advantages -> clipped updates.

Subclasses implement :meth:`RLTrainer.make_samples` (how rollouts become training samples with token-level
advantages); everything else — models, adapters, the reference policy, the loss, the sample buffer, logging,
checkpoints, resuming, evaluation — lives here once.

Each process takes an equal share of a step's prompts and generates whole groups for them, so the samples of a
group (and their advantages) never span processes; only metrics are gathered.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rewards import compute_rewards, get_reward, reward_name

from ..advantages import whiten
from ..data import tokenize_dataset
from ..loss import policy_loss, probability_mask
from ..models import ensure_pad_token, load_model, load_tokenizer, setup_cpu_math
from . import checkpoint as ckpt
from .config import GRPOConfig, check_fits_model, prompt_limit
from .logprobs import completion_logprobs
from .samples import Batch, Sample, collate, pad_rows
from .tracking import MetricsLog, wandb_mode

logger = logging.getLogger(__name__)


def use_cpu() -> bool:
    """Train on the CPU when there is no accelerator (also under ``accelerate launch --multi_gpu``, which is how
    accelerate starts several CPU processes without MPI)."""
    return not torch.cuda.is_available()


def allow_precision_change(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state whose mixed precision cannot change once set; in a single-process
    session (a notebook, a benchmark) a second trainer may ask for another, so the state is started afresh."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != mixed_precision and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)


def distributed_state():
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


class RLTrainer:
    algorithm = "base"

    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None):
        self.args = args = args or GRPOConfig()
        if train_dataset is None or "prompt" not in train_dataset.column_names:
            raise ValueError("train_dataset must be a datasets.Dataset with a 'prompt' column")
        self.output_dir = Path(args.output_dir)
        self._check_output_dir()
        trackers = [t for t in args.report_to if t != "none"]
        mixed_precision = "bf16" if args.bf16 else "no"
        allow_precision_change(mixed_precision)
        self.accelerator = Accelerator(cpu=use_cpu(), log_with=trackers or None, project_dir=str(self.output_dir),
                                       mixed_precision=mixed_precision)
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
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
        self.uses_adapters = peft_config is not None or hasattr(model, "disable_adapter")
        self.reference = None
        if args.beta > 0 and not self.uses_adapters:
            import copy

            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

        self.reward_funcs = [get_reward(f) for f in (reward_funcs if isinstance(reward_funcs, list) else [reward_funcs])]
        if not self.reward_funcs:
            raise ValueError("reward_funcs must name at least one reward function")
        self.reward_names = [reward_name(f) if not isinstance(f, str) else f
                             for f in (reward_funcs if isinstance(reward_funcs, list) else [reward_funcs])]
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(args.reward_weights)} values for "
                             f"{len(self.reward_funcs)} reward functions")

        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        ckpt.check_free_space(self.output_dir, ckpt.estimate_checkpoint_bytes(model))
        optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                      betas=(args.adam_beta1, args.adam_beta2))
        from transformers import get_scheduler

        scheduler = get_scheduler(args.lr_scheduler_type, optimizer,
                                  num_warmup_steps=math.ceil(args.warmup_ratio * args.max_steps),
                                  num_training_steps=args.max_steps)
        # the scheduler counts RL steps and is not prepared: accelerate's wrapper would step it once per process
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler

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
        from ..rollout.snapshot import PolicySnapshot

        self.snapshot = PolicySnapshot(self.unwrapped, args.rollout_dtype) if args.rollout_dtype else None
        sampler = self.snapshot.model if self.snapshot is not None else self.unwrapped
        self.generator = Generator(sampler, self.tokenizer, kv_policy=args.kv_policy,
                                   kv_budget=args.kv_budget, kv_kwargs=dict(args.kv_kwargs),
                                   max_batch_rows=args.generation_batch_size)
        self._eval_generator = None
        self.buffer = None
        if args.use_sample_buffer:
            from ..buffer import SelectiveSampleBuffer

            self.buffer = SelectiveSampleBuffer(capacity=args.buffer_capacity, alpha=args.buffer_alpha,
                                                max_age=args.buffer_max_age,
                                                target_fraction=args.buffer_target_fraction, seed=args.seed)
        self.step = 0
        self.tokens_generated = 0  # over all processes, rollouts and Monte Carlo continuations alike
        self.data_epoch = 0
        self.data_position = 0
        self.metrics_log = MetricsLog(self.output_dir, enabled=self.accelerator.is_main_process)
        self._trackers_started = False

    # --- set-up helpers ------------------------------------------------------------------------------------------

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def _check_output_dir(self) -> None:
        """Fail before training, not at the first checkpoint, when the output folder is unusable (whether it has
        room for a checkpoint is checked once the trainable parameters are known)."""
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.output_dir) as probe:  # unnamed: nothing is left if we are killed
                probe.write(b"0" * 4096)
                probe.flush()
        except OSError as error:
            raise OSError(f"output_dir {self.output_dir} is not writable: {error}") from error

    def sampling_params(self, step: int):
        from ..rollout import SamplingParams

        args = self.args
        # a seed per (step, process) makes rollouts reproducible and identical after a resume
        seed = args.seed * 1_000_003 + step * 1009 + self.accelerator.process_index
        return SamplingParams(max_new_tokens=args.max_completion_length, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, stop=list(args.stop), seed=seed)

    def next_prompts(self) -> list[int]:
        """Dataset rows for this step and process; a seeded permutation per epoch, the position saved in checkpoints."""
        rows = []
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
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

    def score_completions(self, dataset_rows: list[int], texts: list[str], completion_ids: list[list[int]],
                          record: bool = True) -> torch.Tensor:
        """Rewards [N] of completions answering the given dataset rows; NaN marks samples a misbehaving reward
        function made us skip. ``record`` logs the per-function means."""
        prompts = [self.prompts[i] for i in dataset_rows]
        columns = {c: [values[i] for i in dataset_rows] for c, values in self.column_values.items()}
        scores = compute_rewards(self.reward_funcs, prompts=prompts, completions=texts, completion_ids=completion_ids,
                                 columns=columns, weights=self.args.reward_weights,
                                 on_error=self.args.reward_errors, names=self.reward_names,
                                 timeout=self.args.reward_timeout)
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
        rollouts = sorted(batch.rollouts, key=lambda r: r.prompt_index)
        self.count_generated(rollouts)
        rewards = self.score_completions([rows[r.prompt_index] for r in rollouts], [r.text for r in rollouts],
                                         [r.completion_ids for r in rollouts])
        self.record_rollout_metrics(rewards, rollouts, [r.prompt_index for r in rollouts], batch.stats)
        return rollouts, rewards

    # --- the algorithm's part --------------------------------------------------------------------------------------

    def make_samples(self, rows: list[int], step: int) -> list[Sample]:
        raise NotImplementedError

    # --- the loop --------------------------------------------------------------------------------------------------

    def train(self):
        args = self.args
        if args.resume_from_checkpoint:
            self.resume(args.resume_from_checkpoint)
        self.metrics_log.truncate_after(self.step)  # rows a killed run logged past its last checkpoint are redone
        self._start_trackers()
        start_step = self.step
        for step in range(start_step, args.max_steps):
            self.step = step
            self._metrics: dict[str, float] = {}
            started = time.perf_counter()
            self.unwrapped.eval()
            if self.snapshot is not None:
                self.snapshot.refresh()
            rows = self.next_prompts()
            samples = self.make_samples(rows, step)
            samples = self._apply_buffer(samples, step)
            self._metric("timing/rollout", time.perf_counter() - started)
            update_started = time.perf_counter()
            self.update(samples)
            self.scheduler.step()
            self._metric("timing/update", time.perf_counter() - update_started)
            self._metric("timing/step", time.perf_counter() - started)
            self._metric("learning_rate", self.scheduler.get_last_lr()[0])
            self.step = step + 1
            local_tokens = torch.tensor(float(self._metrics.get("tokens/step", 0.0)), device=self.accelerator.device)
            self.tokens_generated += int(self.accelerator.reduce(local_tokens, reduction="sum").item())
            self._metric("tokens/generated_total", float(self.tokens_generated))
            if args.eval_steps and self.eval_dataset is not None and self.step % args.eval_steps == 0:
                self._metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
            budget_reached = args.max_generated_tokens is not None and self.tokens_generated >= args.max_generated_tokens
            if self.step % args.logging_steps == 0 or self.step == args.max_steps or budget_reached:
                self._log()
            if args.max_generated_tokens is not None and self.tokens_generated >= args.max_generated_tokens:
                logger.info("token budget of %d reached at step %d", args.max_generated_tokens, self.step)
                break
            if args.save_steps and self.step % args.save_steps == 0 and self.step < args.max_steps:
                self.save_checkpoint()
        self.save_checkpoint()
        self.save_model(self.output_dir)
        if self.accelerator.is_main_process:
            self.metrics_log.plot()
        self.accelerator.end_training()
        return self.metrics_log.history() if self.accelerator.is_main_process else []

    def _apply_buffer(self, samples: list[Sample], step: int) -> list[Sample]:
        if self.buffer is None:
            return samples
        effective = [abs(float(s.advantages.abs().max())) > self.buffer.eps for s in samples]
        n_effective = sum(effective)
        self._metric("ssb/effective_fraction_before", n_effective / max(1, len(samples)))
        need = self.buffer.needed(n_effective, len(samples))
        drawn = self.buffer.draw(need, step)
        self.buffer.add([s for s, e in zip(samples, effective) if e],
                        [float(s.advantages.abs().mean()) for s, e in zip(samples, effective) if e], step)
        if drawn:
            # replace zero-advantage samples by replayed ones; their stored behaviour log-probs are the old policy
            zero = [i for i, e in enumerate(effective) if not e][:len(drawn)]
            samples = [s for i, s in enumerate(samples) if i not in set(zero)]
            for entry in drawn:
                replay = entry.sample
                replay.old_logprobs = replay.behaviour_logprobs
                samples.append(replay)
        self._metric("ssb/size", float(len(self.buffer)))
        self._metric("ssb/reinjected", float(len(drawn)))
        self._metric("ssb/mean_age", float(sum(step - e.step for e in drawn) / len(drawn)) if drawn else 0.0)
        self._metric("ssb/effective_fraction_after", (n_effective + len(drawn)) / max(1, len(samples)))
        return samples

    # --- the update ------------------------------------------------------------------------------------------------

    def _micro_batches(self, samples: list[Sample]) -> list[list[Sample]]:
        size = self.args.per_device_train_batch_size
        return [samples[i:i + size] for i in range(0, len(samples), size)]

    def _tensors(self, samples: list[Sample]):
        batch = collate([s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                        self.tokenizer.pad_token_id)
        width = batch.completion_mask.shape[1]
        behaviour = pad_rows([s.behaviour_logprobs for s in samples], width)
        advantages = pad_rows([s.advantages for s in samples], width)
        mask = batch.completion_mask.bool()
        if self.args.probability_mask:
            mask = probability_mask(mask, behaviour.exp(), self.args.probability_threshold)
        if self.args.mask_truncated_completions:
            mask &= ~torch.tensor([s.truncated for s in samples]).unsqueeze(1)
        return batch, behaviour, advantages, mask

    @torch.no_grad()
    def _reference_logprobs(self, batch) -> torch.Tensor:
        with self.accelerator.autocast():
            if self.reference is not None:
                return completion_logprobs(self.reference, batch, self.args.temperature)
            with self.unwrapped.disable_adapter():
                return completion_logprobs(self.unwrapped, batch, self.args.temperature)

    def update(self, samples: list[Sample]) -> None:
        """``num_iterations`` passes of clipped policy-gradient steps over the step's samples."""
        args, device = self.args, self.accelerator.device
        if not samples:
            logger.warning("step %d produced no samples to train on", self.step)
            return
        prepared = []
        for group in self._micro_batches(samples):
            batch, behaviour, advantages, mask = self._tensors(group)
            batch = batch.to(device)
            old = None
            if args.num_iterations > 1 or any(s.old_logprobs is not None for s in group):
                with torch.no_grad(), self.accelerator.autocast():  # the same precision as the learner's pass
                    current = completion_logprobs(self.unwrapped, batch, args.temperature).cpu()
                stored = [s.old_logprobs for s in group]
                old = torch.stack([pad_rows([o], current.shape[1])[0] if o is not None else current[i]
                                   for i, o in enumerate(stored)])
            ref = self._reference_logprobs(batch).cpu() if args.beta > 0 else None
            prepared.append([batch, behaviour, advantages, mask, old, ref])
        if args.whiten_advantages:
            all_adv = torch.cat([p[2].flatten() for p in prepared])
            all_mask = torch.cat([p[3].flatten() for p in prepared])
            flat = whiten(all_adv, all_mask)
            offset = 0
            for p in prepared:
                n = p[2].numel()
                p[2] = flat[offset:offset + n].view_as(p[2])
                offset += n
        self._metric("spo/masked_token_fraction",
                     float(sum(p[3].sum() for p in prepared) / max(1, sum(p[0].completion_mask.sum() for p in prepared))))
        for p in prepared:  # the loss denominators count every sample, including those pruned next
            p.append((int(p[3].sum()), p[3].shape[0]))
        if args.beta == 0:
            rows_before = sum(p[3].shape[0] for p in prepared)
            prepared = [self._without_idle_rows(p) for p in prepared]
            self._metric("train/idle_rows_skipped", float(rows_before - sum(p[3].shape[0] for p in prepared)))

        self.unwrapped.train()
        accumulate = args.gradient_accumulation_steps
        stats = {"loss": [], "kl": [], "entropy": [], "clip_ratio/low_mean": [], "clip_ratio/high_mean": [],
                 "is/logprob_gap": [], "is/weight_mean": []}
        generator = torch.Generator().manual_seed(args.seed + self.step)
        for _ in range(args.num_iterations):
            order = torch.randperm(len(prepared), generator=generator).tolist()
            for start in range(0, len(order), accumulate):
                chunk = [prepared[i] for i in order[start:start + accumulate]]
                normaliser = self._normaliser(chunk)
                for k, (batch, behaviour, advantages, mask, old, ref, _) in enumerate(chunk):
                    sync = k == len(chunk) - 1
                    context = self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()
                    with context:
                        logp, entropy = completion_logprobs(self.model, batch, args.temperature, with_entropy=True)
                        old_t = (old.to(device) if old is not None else logp.detach())
                        weights = None
                        if args.importance_sampling_cap is not None:
                            weights = torch.exp(old_t - behaviour.to(device)).clamp(max=args.importance_sampling_cap)
                        out = policy_loss(logp, old_t, advantages.to(device), mask.to(device),
                                          epsilon_low=args.epsilon, epsilon_high=args.epsilon_upper,
                                          ref_logp=ref.to(device) if ref is not None else None, beta=args.beta,
                                          importance_weights=weights, loss_type=args.loss_type,
                                          max_completion_length=args.max_completion_length, normaliser=normaliser)
                        self.accelerator.backward(out.loss)
                    real = batch.completion_mask.bool()
                    stats["loss"].append(out.loss.item())
                    stats["kl"].append(out.kl.item())
                    stats["entropy"].append(entropy[real].mean().item())
                    stats["clip_ratio/low_mean"].append(out.clip_low_fraction.item())
                    stats["clip_ratio/high_mean"].append(out.clip_high_fraction.item())
                    gap = (old_t - behaviour.to(device))[real].abs()
                    stats["is/logprob_gap"].append(gap.mean().item() if gap.numel() else 0.0)
                    if weights is not None:
                        stats["is/weight_mean"].append(weights[real].mean().item())
                if args.max_grad_norm:
                    norm = self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                    stats.setdefault("grad_norm", []).append(float(norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.unwrapped.eval()
        for key, values in stats.items():
            if values:
                self._metric(key, sum(values) / len(values))

    @staticmethod
    def _without_idle_rows(prepared: list) -> list:
        """Drop the rows of a micro-batch whose loss has no gradient: without a KL term, a completion whose
        advantages are zero on every trained token contributes exactly nothing (uniform-reward groups under GRPO,
        equal Monte Carlo values under SPO). One row always stays, so every process runs the same backward passes
        (DDP synchronises gradients inside them)."""
        batch, behaviour, advantages, mask, old, ref, counts = prepared
        active = ((advantages != 0) & mask).any(dim=1)
        if bool(active.all()):
            return prepared
        if not bool(active.any()):
            active[0] = True
        keep = active.nonzero().squeeze(1)
        pick = lambda t: t.index_select(0, keep.to(t.device)) if t is not None else None  # noqa: E731
        batch = Batch(pick(batch.input_ids), pick(batch.attention_mask), pick(batch.position_ids),
                      pick(batch.completion_mask), batch.prompt_width)
        return [batch, pick(behaviour), pick(advantages), pick(mask), pick(old), pick(ref), counts]

    def _normaliser(self, chunk) -> float:
        """The loss denominator for one optimizer step over several micro-batches, so accumulation gives the
        same gradient as one big batch (counted before idle rows were dropped)."""
        loss_type = self.args.loss_type
        if loss_type == "dapo":
            return float(max(1, sum(p[6][0] for p in chunk)))
        rows = sum(p[6][1] for p in chunk)
        return float(rows * self.args.max_completion_length) if loss_type == "dr_grpo" else float(rows)

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
        if self._eval_generator is None:  # held-out accuracy is measured with the full cache
            from ..rollout import Generator

            self._eval_generator = Generator(self.unwrapped, self.tokenizer,
                                             max_batch_rows=self.args.generation_batch_size)
        result = evaluate(self.unwrapped, self.tokenizer, shard, [self.reward_funcs[0]], num_samples=1,
                          temperature=0.0, max_new_tokens=self.args.eval_max_new_tokens or
                          self.args.max_completion_length, batch_size=self.args.generation_batch_size,
                          progress=False, generator=self._eval_generator)
        self.unwrapped.train(was_training)
        correct = torch.tensor([sum(x[0] for x in result.per_problem), len(result.per_problem)],
                               dtype=torch.float64, device=self.accelerator.device)
        correct = self.accelerator.reduce(correct, reduction="sum")
        return {"accuracy": float(correct[0] / correct[1].clamp(min=1)), "problems": float(correct[1])}

    # --- metrics and logging ---------------------------------------------------------------------------------------

    def _metric(self, key: str, value: float) -> None:
        self._metrics[key] = float(value)

    def count_generated(self, rollouts) -> None:
        """Add sampled tokens to this step's count (the budget of ``max_generated_tokens``)."""
        self._metrics["tokens/step"] = self._metrics.get("tokens/step", 0.0) + sum(len(r.completion_ids) for r in rollouts)

    def record_rollout_metrics(self, rewards: torch.Tensor, rollouts, group_ids: list[int], stats: dict) -> None:
        valid = rewards[~torch.isnan(rewards)]
        self._metric("reward", valid.mean().item() if valid.numel() else float("nan"))
        self._metric("reward_std", valid.std().item() if valid.numel() > 1 else 0.0)
        groups: dict[int, list[float]] = {}
        for g, r in zip(group_ids, rewards.tolist()):
            if not math.isnan(r):
                groups.setdefault(g, []).append(r)
        zero_std = [max(v) - min(v) < 1e-9 for v in groups.values()]
        self._metric("frac_reward_zero_std", sum(zero_std) / max(1, len(zero_std)))
        lengths = [len(r.completion_ids) for r in rollouts]
        self._metric("completions/mean_length", sum(lengths) / max(1, len(lengths)))
        self._metric("completions/max_length", float(max(lengths, default=0)))
        self._metric("completions/clipped_ratio",
                     sum(r.finish_reason == "length" for r in rollouts) / max(1, len(rollouts)))
        for key in ("peak_kv_bytes", "full_kv_bytes"):
            if key in stats:
                self._metric(f"kv/{key}", float(stats[key]))
        if stats.get("full_kv_bytes"):
            self._metric("kv/peak_fraction", stats.get("peak_kv_bytes", 0) / stats["full_kv_bytes"])
        self._completions = [{"prompt": self.tokenizer.decode(r.prompt_ids, skip_special_tokens=False)[-300:],
                              "completion": r.text, "reward": float(x)} for r, x in zip(rollouts, rewards.tolist())]

    def _log(self) -> None:
        keys = sorted(self._metrics)
        values = torch.tensor([self._metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        metrics = dict(zip(keys, values.tolist()))
        if metrics.get("timing/step"):  # sampled tokens of all processes per second of the step
            metrics["perf/tokens_per_second"] = (metrics.get("tokens/step", 0.0) * self.accelerator.num_processes
                                                 / metrics["timing/step"])
        metrics["epoch"] = self.data_epoch + self.data_position / max(1, len(self.train_dataset))
        self.accelerator.log(metrics, step=self.step)
        if self.accelerator.is_main_process:
            self.metrics_log.write(self.step, metrics)
            if self.args.log_completions:
                completions = getattr(self, "_completions", [])
                self.metrics_log.write_completions(self.step, completions)
                self._log_completions_table(completions)
            self.metrics_log.plot()
            logger.info("step %d/%d reward %.3f loss %.4f", self.step, self.args.max_steps,
                        metrics.get("reward", float("nan")), metrics.get("loss", float("nan")))

    def _log_completions_table(self, completions: list[dict]) -> None:
        if not completions or "wandb" not in self.args.report_to:
            return
        try:
            import wandb

            tracker = self.accelerator.get_tracker("wandb", unwrap=True)
            table = wandb.Table(columns=["step", "prompt", "completion", "reward"],
                                data=[[self.step, c["prompt"], c["completion"], c["reward"]] for c in completions])
            tracker.log({"completions": table}, step=self.step)
        except (ImportError, ValueError, AttributeError) as error:  # a tracker problem must not stop training
            logger.warning("could not log the completions table: %s", error)

    def _start_trackers(self) -> None:
        if self._trackers_started or not self.accelerator.log_with:
            return
        if "wandb" in self.args.report_to:
            os.environ.setdefault("WANDB_MODE", wandb_mode())
            os.environ.setdefault("WANDB_DIR", str(self.output_dir))
        config = {k: v for k, v in asdict(self.args).items() if isinstance(v, (int, float, str, bool, type(None)))}
        config["algorithm"] = self.algorithm
        self.accelerator.init_trackers(
            "spo", config=config,
            init_kwargs={"wandb": {"name": self.args.run_name or self.output_dir.name, "dir": str(self.output_dir)}})
        self._trackers_started = True

    # --- saving and resuming ---------------------------------------------------------------------------------------

    def _rng_state(self) -> dict:
        state = {"torch": torch.get_rng_state(), "python": _python_rng_to_tensor(random.getstate())}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically. A write that fails (a full disk) removes the partial folder,
        leaves the earlier checkpoints as they were and raises a ``CheckpointError`` naming the folder and cause."""
        acc = self.accelerator
        staging = ckpt.staging_dir(self.output_dir, self.step)
        what = f"checkpoint-{self.step}"
        if acc.is_main_process:
            ckpt.clean_partials(self.output_dir)
            with ckpt.removed_on_failure(staging, what):
                staging.mkdir(parents=True)
                ckpt.write_model_part(staging, self.unwrapped)
        acc.wait_for_everyone()
        with ckpt.removed_on_failure(staging, what):
            ckpt.write_rng(staging, acc.process_index, self._rng_state())
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            state = {"step": self.step, "tokens_generated": self.tokens_generated, "data_epoch": self.data_epoch, "data_position": self.data_position,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "buffer": self._buffer_state(), "algorithm": self.algorithm,
                     "world_size": acc.num_processes}
            state.update(self.extra_state())
            with ckpt.removed_on_failure(staging, what):
                final = ckpt.finalize(staging, self.output_dir, self.step, state, self.args.save_total_limit)
            logger.info("checkpoint written to %s", final)
        acc.wait_for_everyone()
        return final

    def extra_state(self) -> dict:
        """Algorithm-specific state to checkpoint (plain tensors, lists and numbers)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def _buffer_state(self):
        if self.buffer is None:
            return None
        state = self.buffer.state_dict()
        state["entries"] = [(sample.to_state(), score, step) for sample, score, step in state["entries"]]
        return state

    def resume(self, which: str) -> None:
        path = ckpt.resolve(self.output_dir, which)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.output_dir)
            return
        state = ckpt.load_state(path, "trainer_state.pt")
        if state.get("algorithm") != self.algorithm:
            raise ValueError(f"checkpoint {path} was written by {state.get('algorithm')!r}, not {self.algorithm!r}")
        if state.get("world_size") != self.accelerator.num_processes:
            raise ValueError(f"checkpoint {path} was written by {state.get('world_size')} processes; "
                             f"resume with the same number ({self.accelerator.num_processes} now)")
        ckpt.load_model_part(path, self.unwrapped)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.data_epoch, self.data_position = state["step"], state["data_epoch"], state["data_position"]
        self.tokens_generated = state["tokens_generated"]
        if self.buffer is not None and state.get("buffer") is not None:
            buffer_state = dict(state["buffer"])
            buffer_state["entries"] = [(Sample.from_state(s), score, step) for s, score, step in buffer_state["entries"]]
            self.buffer.load_state_dict(buffer_state)
        self.load_extra_state(state)
        rng = ckpt.load_state(path, f"rng_state_{self.accelerator.process_index}.pt")
        torch.set_rng_state(rng["torch"])
        random.setstate(_python_rng_from_tensor(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        logger.info("resumed from %s at step %d", path, self.step)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """The trained adapter (PEFT format) or model, plus the tokenizer, as safetensors; written into a hidden
        folder and published by one rename, like checkpoints."""
        target = Path(output_dir or self.output_dir)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            folder = target / ("adapter" if self.uses_adapters else "model")
            staging = target / f".{folder.name}.partial"
            with ckpt.removed_on_failure(staging, folder.name):
                if staging.exists():
                    shutil.rmtree(staging)
                self.unwrapped.save_pretrained(staging, safe_serialization=True)
                self.tokenizer.save_pretrained(staging)
                ckpt.publish(staging, folder)
        self.accelerator.wait_for_everyone()


def _python_rng_to_tensor(state) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": float("nan") if gauss is None else gauss}


def _python_rng_from_tensor(state: dict):
    gauss = None if math.isnan(state["gauss"]) else state["gauss"]
    return state["version"], tuple(int(x) for x in state["internal"].tolist()), gauss
