"""`spo train` for the fault tests, optionally killed with SIGKILL at a chosen point of the writers.

    SPO_TEST_FAULT=<point>:<n> python tests/scripts/fault_train.py train RECIPE.yaml [--resume]

kills this process the n-th time it reaches <point> (counted in this process only):

    weights   half of a checkpoint's trainable.safetensors is on disk
    publish   a checkpoint is complete in its staging folder, just before it is renamed into place
    rotate    an old checkpoint is being deleted: one of its files is already gone
    metrics   half of a metrics.jsonl line is on disk
    adapter   half of the final adapter's weights are on disk

The library itself has no test hooks: the points are reached by wrapping the functions that do the writing.
Recipes name this file's dense reward as ``fault_train:vowel_share``.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path


def vowel_share(completions, **kwargs):
    """A dense reward a random model can move, so the adapters really change."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def half_write(path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[:len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    die()


def install(point: str, n: int) -> None:
    from safetensors.torch import save

    from spo.trainer import checkpoint as ckpt
    from spo.trainer import tracking

    calls = 0

    def reached() -> bool:
        nonlocal calls
        calls += 1
        return calls == n

    if point == "weights":
        original_save_file = ckpt.save_file

        def save_file(tensors, filename, metadata=None):
            if reached():
                half_write(filename, save(tensors, metadata))
            return original_save_file(tensors, filename, metadata)

        ckpt.save_file = save_file
    elif point == "publish":
        original_publish = ckpt.publish

        def publish(staging, final):
            if final.name.startswith("checkpoint-") and reached():
                die()
            return original_publish(staging, final)

        ckpt.publish = publish
    elif point == "rotate":
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            weights = Path(path) / "trainable.safetensors"
            name = Path(path).name  # a published checkpoint, or one being replaced or removed (not a staging one)
            if "checkpoint-" in name and not name.endswith(".partial") and weights.is_file() and reached():
                weights.unlink()
                die()
            return original_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif point == "metrics":
        original_write = tracking.MetricsLog.write

        def write(self, step, metrics):
            if self.enabled and reached():
                import json

                with open(self.metrics_path, "a") as handle:
                    line = json.dumps({"step": step, **metrics})
                    handle.write(line[:len(line) // 2])
                die()
            return original_write(self, step, metrics)

        tracking.MetricsLog.write = write
    elif point == "adapter":
        import peft.peft_model

        original_safe_save = peft.peft_model.safe_save_file

        def safe_save_file(tensors, filename, metadata=None):
            if reached():
                half_write(filename, save(tensors, metadata))
            return original_safe_save(tensors, filename, metadata=metadata)

        peft.peft_model.safe_save_file = safe_save_file
    else:
        raise SystemExit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    fault = os.environ.get("SPO_TEST_FAULT")
    if fault:
        where, _, count = fault.partition(":")
        install(where, int(count or 1))
    from spo.cli import main

    sys.exit(main(sys.argv[1:]))
