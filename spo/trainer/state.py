"""Checkpoints and resuming for the trainer (the file layout and atomic publishing are in ``checkpoint.py``).

Shared state (step, data position, token count, optimizer, scheduler) is written once by the main process;
per-process state (random-number generators, the sample buffer, an algorithm's replay) is written by each process
as ``rank_state_<rank>.pt`` and restored to the same rank, so nothing is duplicated or lost on resume. Under FSDP
and ZeRO the model and optimizer are gathered whole first (every process takes part).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from pathlib import Path

import torch

from ..errors import ConfigError
from . import checkpoint as ckpt
from .samples import Sample

logger = logging.getLogger(__name__)


class CheckpointingMixin:
    """Saving, resuming and the final model, for ``RLTrainer``."""

    def algorithm_state(self) -> dict:
        """This process's algorithm-specific state to checkpoint (plain tensors, lists and numbers)."""
        return {}

    def load_algorithm_state(self, state: dict) -> None:
        pass

    def _rank_state(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": _python_rng_to_tensor(random.getstate())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        return {"rng": rng, "buffer": self._buffer_state(), "algorithm": self.algorithm_state()}

    def _buffer_state(self):
        if self.buffer is None:
            return None
        state = self.buffer.state_dict()
        state["entries"] = [(sample.to_state(), score, step) for sample, score, step in state["entries"]]
        return state

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint-<step>`` atomically. A write that fails (a full disk) removes the partial folder,
        leaves the earlier checkpoints as they were and raises a ``CheckpointError`` naming the folder and cause."""
        acc, learner = self.accelerator, self.learner
        staging = ckpt.staging_dir(self.output_dir, self.step)
        what = f"checkpoint-{self.step}"
        trainable = learner.trainable_state()  # collectives first, on every process
        optimizer = learner.optimizer_state()
        if acc.is_main_process:
            ckpt.clean_partials(self.output_dir)
            with ckpt.removed_on_failure(staging, what):
                staging.mkdir(parents=True)
                ckpt.write_trainable(staging, trainable)
        acc.wait_for_everyone()
        with ckpt.removed_on_failure(staging, what):
            ckpt.write_rank_state(staging, acc.process_index, self._rank_state())
            learner.save_engine_state(staging)
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            state = {"step": self.step, "tokens_generated": self.tokens_generated, "train_seconds": self.train_seconds,
                     "data_epoch": self.data_epoch,
                     "data_position": self.data_position, "optimizer": optimizer,
                     "scheduler": learner.scheduler.state_dict(), "algorithm": self.algorithm,
                     "world_size": acc.num_processes}
            with ckpt.removed_on_failure(staging, what):
                final = ckpt.finalize(staging, self.output_dir, self.step, state, self.args.save_total_limit)
            logger.info("checkpoint written to %s", final)
        acc.wait_for_everyone()
        return final

    def resume(self, which: str) -> None:
        if self.accelerator.is_main_process:  # a run killed while rotating its last checkpoint saves no more
            ckpt.clean_partials(self.output_dir)
        path = ckpt.resolve(self.output_dir, which)
        if path is None:
            logger.info("no checkpoint in %s: starting from scratch", self.output_dir)
            return
        state = ckpt.load_state(path, "trainer_state.pt")
        if state.get("algorithm") != self.algorithm:
            raise ConfigError(f"--resume: checkpoint {path} was written by {state.get('algorithm')!r}, not "
                              f"{self.algorithm!r}")
        if state.get("world_size") != self.accelerator.num_processes:
            raise ConfigError(f"--resume: checkpoint {path} was written by {state.get('world_size')} processes; "
                              f"resume with the same number ({self.accelerator.num_processes} now)")
        self.learner.load_trainable_state(ckpt.read_trainable(path), path)
        self.learner.load_optimizer_state(state["optimizer"])
        self.learner.load_engine_state(path)
        self.learner.scheduler.load_state_dict(state["scheduler"])
        self.step, self.data_epoch, self.data_position = state["step"], state["data_epoch"], state["data_position"]
        self.tokens_generated = state["tokens_generated"]
        self.train_seconds = state.get("train_seconds", 0.0)  # checkpoints from before the time budget lack it
        rank = ckpt.load_state(path, ckpt.rank_state_name(self.accelerator.process_index))
        if self.buffer is not None and rank.get("buffer") is not None:
            buffer_state = dict(rank["buffer"])
            buffer_state["entries"] = [(Sample.from_state(s), score, step) for s, score, step in buffer_state["entries"]]
            self.buffer.load_state_dict(buffer_state)
        self.load_algorithm_state(rank.get("algorithm") or {})
        rng = rank["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(_python_rng_from_tensor(rng["python"]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        logger.info("resumed from %s at step %d", path, self.step)

    def save_model(self, output_dir: str | os.PathLike | None = None) -> None:
        """The trained adapter (PEFT format) or model, plus the tokenizer, as safetensors; written into a hidden
        folder and published by one rename, like checkpoints. Under FSDP and ZeRO-3 the weights are gathered."""
        target = Path(output_dir or self.output_dir)
        acc = self.accelerator
        acc.wait_for_everyone()
        sharded = self.learner.fsdp or self.learner.deepspeed
        state_dict = acc.get_state_dict(self.model, unwrap=True) if sharded else None
        if acc.is_main_process:
            folder = target / ("adapter" if self.uses_adapters else "model")
            staging = target / f".{folder.name}.partial"
            with ckpt.removed_on_failure(staging, folder.name):
                if staging.exists():
                    shutil.rmtree(staging)
                self.unwrapped.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
                self.tokenizer.save_pretrained(staging)
                ckpt.publish(staging, folder)
        acc.wait_for_everyone()


def _python_rng_to_tensor(state) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": float("nan") if gauss is None else gauss}


def _python_rng_from_tensor(state: dict):
    gauss = None if math.isnan(state["gauss"]) else state["gauss"]
    return state["version"], tuple(int(x) for x in state["internal"].tolist()), gauss
