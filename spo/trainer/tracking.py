"""Metrics: accelerate's trackers (wandb, offline when there is no account or network), a local JSONL, completions,
and a PNG of the learning curve for people who do not use wandb."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger(__name__)

CURVE_KEYS = ("reward", "eval/accuracy")


def wandb_mode() -> str:
    """wandb runs offline unless the user configured it to sync (an explicit WANDB_MODE, or an API key)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def reduce_metrics(metrics: dict[str, float], keys: tuple[str, ...], sum_over_processes) -> dict[str, float]:
    """Mean of each metric over the processes that report it. Every process reduces the same declared ``keys``
    in the same order (a metric one process lacks, or reports as NaN, is left out of that key's mean), so the
    all-reduce lines up whatever each process measured; a key no process reports is dropped."""
    undeclared = sorted(set(metrics) - set(keys))
    if undeclared:
        raise KeyError(f"metrics {undeclared} are not declared: add them to the trainer's metric keys")
    values = torch.tensor([metrics.get(key, math.nan) for key in keys], dtype=torch.float64)
    present = ~torch.isnan(values)
    sums, counts = sum_over_processes(torch.stack([values.nan_to_num(0.0), present.double()])).tolist()
    return {key: total / count for key, total, count in zip(keys, sums, counts) if count > 0}


class MetricsLog:
    """``metrics.jsonl`` and ``completions.jsonl`` in the output folder, plus ``learning_curve.png``."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.output_dir = output_dir
        self.enabled = enabled
        self.metrics_path = output_dir / "metrics.jsonl"
        self.completions_path = output_dir / "completions.jsonl"

    def truncate_after(self, step: int) -> None:
        """When training starts at ``step`` (0, or a checkpoint's): forget what was logged after it (a killed run's
        rows are logged again), and a line a kill cut short. The files are replaced in one rename."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.completions_path):
            if path.is_file():
                kept = [line for line, row in _read_lines(path) if row.get("step", step + 1) <= step]
                staging = path.with_name(f".{path.name}.partial")
                staging.write_text("".join(line + "\n" for line in kept))
                os.replace(staging, path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    def write_completions(self, step: int, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        with open(self.completions_path, "a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")

    def history(self) -> list[dict]:
        return [row for _, row in _read_lines(self.metrics_path)] if self.metrics_path.is_file() else []

    def plot(self) -> Path | None:
        """Learning curve: training reward (and held-out accuracy when evaluated) per step."""
        if not self.enabled:
            return None
        history = self.history()
        series = {key: [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))
                        and not math.isnan(r[key])] for key in CURVE_KEYS}
        if not any(series.values()):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        for key, points in series.items():
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, marker="o" if len(points) < 30 else None, label=key)
        axis.set_xlabel("step")
        axis.set_ylabel("reward / accuracy")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = self.output_dir / "learning_curve.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        return path


class TrackingMixin:
    """Step metrics (declared keys, reduced over processes), the local logs and accelerate's trackers, for
    ``RLTrainer``."""

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

    def _log(self) -> dict[str, float]:
        """Reduce this step's metrics over processes, write them everywhere and announce the step; returns them."""
        metrics = reduce_metrics(self._metrics, self.metric_keys, self.learner.sum_over_processes)
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
            loss = metrics.get("loss", math.nan)
            loss = "no update (nothing to train on)" if math.isnan(loss) else "loss %.4f" % loss
            announce("step %d/%d reward %.3f %s %.1f s/step %.0f tokens/s" % (
                self.step, self.args.max_steps, metrics.get("reward", float("nan")), loss,
                metrics.get("timing/step", float("nan")), metrics.get("perf/tokens_per_second", float("nan"))))
            for row in getattr(self, "_completions", [])[:self.args.num_completions_to_print]:
                announce(f"  reward {row['reward']:.3f}  ...{row['prompt'][-60:]!r} -> {row['completion']!r}")
        return metrics

    @contextlib.contextmanager
    def progress(self, total: int, initial: int = 0):
        """A bar of training steps on the main process's terminal (none when stderr is not a terminal); log lines
        written meanwhile go above it."""
        bar = tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True,
                   disable=None if self.accelerator.is_main_process else True)
        try:
            # (unconfigured logging needs no redirect: announce() then writes through tqdm)
            with logging_redirect_tqdm() if not bar.disable and logger.hasHandlers() else contextlib.nullcontext():
                yield bar
        except BaseException:
            bar.leave = False  # an error or Ctrl-C: clear the bar, so the message that follows stands alone
            raise
        finally:
            bar.close()

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


def announce(message: str) -> None:
    """An INFO line of this module's logger, or, when logging was never configured (the Python API, where INFO would
    be dropped), the same line on stderr."""
    if logger.hasHandlers():
        logger.info(message)
    else:
        tqdm.write(message, file=sys.stderr)


def _read_lines(path: Path) -> list[tuple[str, dict]]:
    """The lines of a JSONL file with their rows, without a line a kill cut short."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append((line, row))
        else:
            logger.warning("%s line %d is incomplete (a killed run?): dropped", path, number + 1)
    return rows
