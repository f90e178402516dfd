"""The Learner: everything after the algorithm has produced a ``TrainBatch``.

It owns the optimizer and scheduler, micro-batching, log-probs, the loss and its normalisers, gradient
accumulation, precision, the distributed strategy (one process, DDP, FSDP2 or DeepSpeed ZeRO through accelerate)
and the model's and optimizer's checkpoint state.

Every process runs the same number of forward and backward passes per update, whatever its share of samples:
micro-batches are padded with zero-weight ones, since DDP, FSDP and ZeRO synchronise inside those passes and a
process that ran one pass fewer would leave the others waiting forever.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Callable
import logging
import math
from dataclasses import dataclass

import torch
from accelerate.utils import DistributedType

from ..errors import ConfigError
from ..loss import policy_loss, sequence_ratios, threshold_flips, within_band
from .distributed import shards_weights
from .logprobs import batch_logprobs, packing_unsupported, unwrapped_model
from .packing import PackedBatch, pack
from .samples import Batch, TrainBatch, collate, pad_rows
from .schedule import make_scheduler
from .tree_attention import packed_tree_attention_on

logger = logging.getLogger(__name__)

LEARNER_METRICS = ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "grad_norm",
                   "is/logprob_gap", "is/weight_mean", "is/ratio_mean", "is/rejected_fraction", "is/mismatch_kl",
                   "is/threshold_flip_fraction",
                   "spo/masked_token_fraction", "train/idle_rows_skipped",
                   "train/padding_micro_batches", "train/shared_token_fraction", "train/forward_tokens")


@dataclass
class MicroBatch:
    batch: Batch | PackedBatch
    behaviour: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B, T]
    mask: torch.Tensor  # bool [B, T]: trained tokens
    old: torch.Tensor | None  # [B, T] log-probs of the policy the update moves from (None or NaN rows: the
    # learner's current ones, detached)
    ref: torch.Tensor | None  # [B, T] reference log-probs (KL)
    tokens: int  # trained tokens, counted before idle rows were dropped (loss denominators)
    rows: int  # real rows, likewise (0 for a padding micro-batch)


class Learner:
    def __init__(self, accelerator, model, args, pad_token_id: int, uses_adapters: bool,
                 run_progress: Callable[[], float] | None = None):
        self.accelerator, self.args, self.pad_token_id = accelerator, args, pad_token_id
        self.uses_adapters = uses_adapters
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.shards_weights = shards_weights(accelerator)
        if self.fsdp and not accelerator.is_fsdp2:
            raise ValueError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config")
        self.reference = None
        if args.beta > 0 and not uses_adapters:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters")
        self._keep_float32_master_weights(trainable)
        optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay,
                                      betas=(args.adam_beta1, args.adam_beta2))
        self.scheduler = make_scheduler(args, optimizer, run_progress)  # a budget-ended run's follows its progress
        self.trainable_shapes = {n: p.shape for n, p in model.named_parameters() if p.requires_grad}  # unsharded
        if self.deepspeed:
            self._fill_deepspeed_config()
        # the scheduler counts RL steps and is not prepared: accelerate's wrapper would step it once per process
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.trainable_names = [n for n, p in self.unwrapped.named_parameters() if p.requires_grad]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]  # FSDP's, once sharded
        self.packing = args.learner_packing
        reason = packing_unsupported(self.unwrapped) if self.packing != "padded" else None
        if reason:
            logger.warning("learner_packing=%s is not possible (%s): the learner pads instead", self.packing, reason)
            self.packing = "padded"

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    def release_wrapper(self) -> None:
        """Replace the distributed wrapper by the plain model, on every process at once (see ``RLTrainer.close``)."""
        import gc

        self.model = self.unwrapped
        self.accelerator.free_memory()  # drops accelerate's references to the wrapper (and collects)
        gc.collect()

    # --- set-up ----------------------------------------------------------------------------------------------------

    def _keep_float32_master_weights(self, trainable) -> None:
        """AdamW on bf16/fp16 weights rounds most small updates away: trained weights stay float32 and the
        compute runs under autocast (``bf16``). DeepSpeed keeps its own float32 master copy."""
        half = [p for p in trainable if p.dtype in (torch.bfloat16, torch.float16)]
        if not half or self.deepspeed:
            return
        logger.info("training %d %s parameters as float32 master weights (compute precision: %s)", len(half),
                    half[0].dtype, self.accelerator.mixed_precision)
        for p in half:
            p.data = p.data.float()

    def _fill_deepspeed_config(self) -> None:
        """``prepare(model, optimizer)`` has no data loader to fill DeepSpeed's "auto" values from."""
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        args = self.args
        values = {"train_micro_batch_size_per_gpu": args.per_device_train_batch_size,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps,
                  "gradient_clipping": args.max_grad_norm or 0.0}
        for key, value in values.items():
            if config.get(key, "auto") == "auto":
                config[key] = value
        config["train_batch_size"] = (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
                                      * self.accelerator.num_processes)

    # --- collectives -----------------------------------------------------------------------------------------------

    def sum_over_processes(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over every process (an all-reduce; every process must call it), on the CPU."""
        if self.accelerator.num_processes == 1:
            return values
        return self.accelerator.reduce(values.to(self.accelerator.device), reduction="sum").cpu()

    def _max(self, value: int) -> int:
        if self.accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], device=self.accelerator.device)
        return int(self.accelerator.gather(tensor).max())

    def _reshard(self) -> None:
        """FSDP2 keeps the root's parameters gathered after a forward pass; gathered under ``no_grad`` they are
        detached from the sharded ones, and the next pass with gradient would train nothing through them."""
        if self.fsdp:
            from torch.distributed.fsdp import FSDPModule

            for module in self.model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    # --- log-probs -------------------------------------------------------------------------------------------------

    def logprobs(self, batch: Batch | PackedBatch, with_entropy: bool = False):
        """Completion log-probs under the trained model (the prepared one, so DDP/FSDP hooks run)."""
        return batch_logprobs(self.model, batch, self.args.temperature, with_entropy=with_entropy)

    @torch.no_grad()
    def reference_logprobs(self, batch: Batch | PackedBatch) -> torch.Tensor:
        with self.accelerator.autocast():
            if self.reference is not None:
                return batch_logprobs(self.reference, batch, self.args.temperature)
            # PEFT toggles the adapters' requires_grad on entering and leaving: under FSDP2 that must happen to the
            # sharded parameters, not to gathered copies that would keep requires_grad=False
            self._reshard()
            with self.unwrapped.disable_adapter():
                logprobs = self.logprobs(batch)
                self._reshard()
            return logprobs

    # --- the update ------------------------------------------------------------------------------------------------

    def _collate(self, prompts: list[list[int]], completions: list[list[int]]) -> Batch | PackedBatch:
        if self.packing == "padded":
            return collate(prompts, completions, self.pad_token_id)
        return pack(prompts, completions, share=self.packing == "prefix_tree")

    def _micro_batch(self, train: TrainBatch, rows: list[int], need_old: bool) -> MicroBatch:
        device = self.accelerator.device
        if rows:
            samples = [train.samples[i] for i in rows]
            batch = self._collate([s.prompt_ids for s in samples], [s.completion_ids for s in samples])
            width = batch.completion_mask.shape[1]
            behaviour = pad_rows([s.behaviour_logprobs for s in samples], width)
            advantages = pad_rows([train.advantages[i] for i in rows], width)
            mask = pad_rows([train.loss_masks[i] for i in rows], width, dtype=torch.bool)
        else:  # padding: one pad-token row that trains nothing
            samples = []
            batch = self._collate([[self.pad_token_id]], [[self.pad_token_id]])
            behaviour, advantages = torch.zeros(1, 1), torch.zeros(1, 1)
            mask = torch.zeros(1, 1, dtype=torch.bool)
        batch = batch.to(device)
        if need_old:
            with torch.no_grad(), self.accelerator.autocast():  # the same precision as the learner's pass
                current = self.logprobs(batch).cpu()
            old = torch.stack([pad_rows([s.old_logprobs], current.shape[1])[0] if s.old_logprobs is not None
                               else current[i] for i, s in enumerate(samples)]) if samples else current
        else:  # NaN rows: the learner's own log-probs in the training pass (detached)
            old = pad_rows([s.old_logprobs if s.old_logprobs is not None else torch.full((1,), math.nan)
                            for s in samples], behaviour.shape[1], value=math.nan) if samples else None
            if old is not None and bool(old.isnan().all()):
                old = None
        ref = self.reference_logprobs(batch).cpu() if self.args.beta > 0 else None
        self._reshard()
        return MicroBatch(batch, behaviour, advantages, mask, old, ref, tokens=int(mask.sum()), rows=len(samples))

    def _micro_batches(self, train: TrainBatch) -> list[MicroBatch]:
        """The local micro-batches, padded to the same count on every process (and, under DeepSpeed, to whole
        accumulation steps, since its engine steps the optimizer every ``gradient_accumulation_steps`` passes)."""
        size = self.args.per_device_train_batch_size
        order = list(range(len(train)))
        if self.packing == "prefix_tree":  # samples answering the same prompt share a micro-batch where they can
            order.sort(key=lambda i: train.samples[i].dataset_row)
        groups = [order[i:i + size] for i in range(0, len(order), size)]
        count = self._max(len(groups))
        if self.deepspeed:
            count = math.ceil(count / self.args.gradient_accumulation_steps) * self.args.gradient_accumulation_steps
        self._padding = count - len(groups)
        groups += [[] for _ in range(self._padding)]
        # Before an update of several passes over the samples, the policy they came from is the model as it is
        # now: its log-probs are computed first. In one pass, each micro-batch's own detached log-probs stand for
        # them (ratio 1, no extra forward pass), also in later optimizer steps of the update; a replayed sample
        # brings its own (its behaviour policy's).
        need_old = self.args.num_iterations > 1
        return [self._micro_batch(train, rows, need_old) for rows in groups]

    def _normalisers(self, chunks: list[list[MicroBatch]]) -> list[float]:
        """Each optimizer step's loss denominator, fixed for all its micro-batches, so that accumulation and data
        parallelism give the gradient of one big batch. DDP, FSDP and ZeRO average gradients over processes, so a
        global count is divided by the number of processes."""
        args = self.args
        if args.loss_type == "dapo":
            counts = torch.tensor([float(sum(m.tokens for m in c)) for c in chunks], dtype=torch.float64)
            tokens = self.sum_over_processes(counts)
            return [max(1.0, t) / self.accelerator.num_processes for t in tokens.tolist()]
        if args.loss_type == "bnpo":
            return [float(max(1, sum(m.tokens for m in c))) for c in chunks]
        rows = [max(1, sum(m.rows for m in c)) for c in chunks]
        return [float(r * args.max_completion_length) if args.loss_type == "dr_grpo" else float(r) for r in rows]

    def update(self, train: TrainBatch, step: int) -> dict[str, float]:
        """``num_iterations`` passes of clipped policy-gradient steps over ``train``; returns this process's
        metrics (means over micro-batches, and ``kl`` over trained tokens)."""
        if self.packing == "padded":
            return self._update(train, step)
        # the packed attention stays selected through the backward passes (recomputed under gradient checkpointing)
        models = [unwrapped_model(self.unwrapped)] + ([self.reference] if self.reference is not None else [])
        with contextlib.ExitStack() as stack:
            for model in models:
                stack.enter_context(packed_tree_attention_on(model))
            return self._update(train, step)

    def _update(self, train: TrainBatch, step: int) -> dict[str, float]:
        args = self.args
        prepared = self._micro_batches(train)
        real_tokens = sum(int(m.batch.completion_mask.sum()) for m in prepared if m.rows)
        metrics = {"spo/masked_token_fraction": sum(m.tokens for m in prepared) / max(1, real_tokens),
                   "train/padding_micro_batches": float(self._padding)}
        if args.beta == 0:
            before = sum(m.batch.rows for m in prepared if m.rows)
            prepared = [_without_idle_rows(m) for m in prepared]
            metrics["train/idle_rows_skipped"] = float(before - sum(m.batch.rows for m in prepared if m.rows))
        metrics["train/forward_tokens"] = float(sum(m.batch.input_ids.numel() for m in prepared if m.rows))
        packed = [m.batch for m in prepared if m.rows and isinstance(m.batch, PackedBatch)]
        if packed:
            metrics["train/shared_token_fraction"] = 1.0 - (sum(b.input_ids.shape[1] for b in packed)
                                                            / sum(b.unshared_tokens for b in packed))
        self.unwrapped.train()
        accumulate = args.gradient_accumulation_steps
        # accelerate divides each backward's loss by its own accumulation count (DeepSpeed's engine does the same);
        # our normalisers already cover the whole optimizer step
        rescale = float(self.accelerator.gradient_accumulation_steps)
        stats = defaultdict(list)
        kl_sum = kl_tokens = 0.0
        generator = torch.Generator().manual_seed(args.seed + step)
        for _ in range(args.num_iterations):
            order = torch.randperm(len(prepared), generator=generator).tolist()
            chunks = [[prepared[i] for i in order[s:s + accumulate]] for s in range(0, len(order), accumulate)]
            for chunk, normaliser in zip(chunks, self._normalisers(chunks)):
                step_loss = 0.0
                for k, micro in enumerate(chunk):
                    sync = k == len(chunk) - 1
                    context = self.accelerator.no_sync(self.model) if not sync else contextlib.nullcontext()
                    with context:
                        out, logged = self._loss(micro, normaliser)
                        self.accelerator.backward(out.loss * rescale)
                    step_loss += out.loss.item()
                    kl_sum, kl_tokens = kl_sum + out.kl_sum.item(), kl_tokens + out.tokens.item()
                    if micro.rows:  # padding batches measure nothing
                        for key, value in logged.items():
                            stats[key].append(value)
                stats["loss"].append(step_loss)
                norm = self._clip_gradients()
                if norm is not None:
                    stats["grad_norm"].append(norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.unwrapped.eval()
        metrics.update({key: sum(v) / len(v) for key, v in stats.items() if v})
        if args.beta > 0:
            metrics["kl"] = kl_sum / max(1.0, kl_tokens)
        return metrics

    def _loss(self, micro: MicroBatch, normaliser: float):
        """This micro-batch's share of the step's loss, and its per-micro-batch metrics."""
        args, device = self.args, self.accelerator.device
        logp, entropy = self.logprobs(micro.batch, with_entropy=True)
        old = logp.detach() if micro.old is None else torch.where(micro.old.isnan().to(device), logp.detach(),
                                                                  micro.old.to(device))
        behaviour, mask = micro.behaviour.to(device), micro.mask.to(device)
        real = micro.batch.completion_mask.bool()
        weights = None
        if args.importance_sampling_cap is not None:
            weights = torch.exp(old - behaviour).clamp(max=args.importance_sampling_cap)
        ratios = sequence_ratios(old, behaviour, real)
        keep = torch.ones_like(ratios, dtype=torch.bool)
        if args.importance_sampling_sequence_band is not None:
            keep = within_band(ratios, *args.importance_sampling_sequence_band)
            mask = mask & keep[:, None]
        out = policy_loss(logp, old, micro.advantages.to(device), mask, normaliser=normaliser,
                          loss_type=args.loss_type, epsilon_low=args.epsilon, epsilon_high=args.epsilon_upper,
                          ref_logp=micro.ref.to(device) if micro.ref is not None else None, beta=args.beta,
                          importance_weights=weights)
        if not micro.rows:
            out.loss = out.loss * 0.0  # keeps the graph (and so every collective) without training anything
        count = max(1.0, out.tokens.item())
        gap = (behaviour - old)[real]
        logged = {"entropy": entropy[real].mean().item(), "clip_ratio/low_mean": out.clipped_low.item() / count,
                  "clip_ratio/high_mean": out.clipped_high.item() / count,
                  "is/logprob_gap": gap.abs().mean().item() if gap.numel() else 0.0,
                  # KL(sampler || learner) estimated on the sampled tokens
                  "is/mismatch_kl": gap.mean().item() if gap.numel() else 0.0,
                  "is/ratio_mean": ratios.mean().item(), "is/rejected_fraction": 1.0 - keep.float().mean().item(),
                  # cutpoints and the probability mask come from the sampler's probabilities: the share of tokens
                  # the learner would put on the other side of the threshold
                  "is/threshold_flip_fraction": threshold_flips(old, behaviour, real, args.probability_threshold)}
        if weights is not None:
            logged["is/weight_mean"] = weights[real].mean().item()
        return out, logged

    def _clip_gradients(self) -> float | None:
        """Clip to ``max_grad_norm`` and return the norm before clipping (DeepSpeed clips inside its engine, per
        its ``gradient_clipping``, and reports the norm after its step)."""
        if not self.args.max_grad_norm and not self.deepspeed:
            return None
        max_norm = self.args.max_grad_norm or float("inf")
        if self.fsdp:  # one device mesh: torch clips DTensor gradients itself (accelerate's FSDP path compares
            # parameter lists with ==, which DTensors cannot answer)
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        else:
            norm = self.accelerator.clip_grad_norm_(self.trainable, max_norm)
        if norm is None:
            return None
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    # --- checkpoint state ------------------------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable parameters by name on the main process (empty elsewhere under FSDP). Every
        process must call it: under FSDP and ZeRO-3 it gathers the shards."""
        if self.fsdp or self.deepspeed:
            full = self.accelerator.get_state_dict(self.model, unwrap=True) or {}
            return {n: full[n].detach().cpu().clone() for n in self.trainable_names if n in full}
        parameters = dict(self.unwrapped.named_parameters())
        return {n: parameters[n].detach().cpu().clone() for n in self.trainable_names}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source) -> None:
        expected = set(self.trainable_names)
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise ConfigError(f"--resume: checkpoint {source} does not match the model: missing {missing}, "
                              f"unexpected {unexpected}")
        shapes = {n: tuple(self.trainable_shapes[n]) for n in self.trainable_names}
        for name, value in state.items():
            if tuple(value.shape) != shapes[name]:
                raise ConfigError(f"--resume: checkpoint {source} holds {name} of shape {list(value.shape)}, the "
                                  f"model has {list(shapes[name])}: resume with the adapter settings (peft) it "
                                  "was trained with")
        if self.deepspeed:  # the engine's own checkpoint restores the weights with the optimizer (load_engine_state)
            return
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.unwrapped, state, options=StateDictOptions(full_state_dict=True, strict=False))
            return
        parameters = dict(self.unwrapped.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)

    def optimizer_state(self) -> dict | None:
        """The optimizer's state, whole (every process must call it; under FSDP it gathers the shards). None under
        DeepSpeed, whose engine writes its partitioned state itself (``save_engine_state``)."""
        if self.deepspeed:
            return None
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.unwrapped, self.optimizer.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save_engine_state(self, folder) -> None:
        """DeepSpeed only, on every process: the engine's own checkpoint (each process's optimizer partition)."""
        if self.deepspeed:
            self.model.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=True)

    def load_engine_state(self, folder) -> None:
        if self.deepspeed:
            self.model.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                       load_lr_scheduler_states=False)

    def load_optimizer_state(self, state: dict | None) -> None:
        if self.deepspeed:
            return
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.unwrapped, self.optimizer.optimizer, optim_state_dict=state,
                                     options=StateDictOptions(full_state_dict=True))
            return
        self.optimizer.load_state_dict(state)


def _without_idle_rows(micro: MicroBatch) -> MicroBatch:
    """Drop the rows of a micro-batch whose loss has no gradient: without a KL term, a completion whose advantages
    are zero on every trained token contributes exactly nothing (uniform-reward groups under GRPO, equal Monte
    Carlo values under Segment Policy Optimization). One row always stays, so every process runs the same passes.
    The loss denominators keep counting the dropped rows."""
    active = ((micro.advantages != 0) & micro.mask).any(dim=1)
    if bool(active.all()) or not micro.rows:
        return micro
    if not bool(active.any()):
        active[0] = True
    keep = active.nonzero().squeeze(1)
    pick = lambda t: t.index_select(0, keep.to(t.device)) if t is not None else None  # noqa: E731
    return MicroBatch(micro.batch.select(keep.tolist()), pick(micro.behaviour), pick(micro.advantages),
                      pick(micro.mask), pick(micro.old), pick(micro.ref), micro.tokens, micro.rows)
