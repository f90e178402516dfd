"""Metrics: accelerate's trackers (wandb, offline when there is no account or network), a local JSONL, completions,
and a PNG of the learning curve for people who do not use wandb."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

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
