"""The learner's update per step: prefix-shared packing against padding-free packing and padded rows.

For each algorithm, on its quickstart recipe (``recipes/quickstart*.yaml``: the embedded SmolLM2-135M-Instruct, MoS
adapters, bf16 autocast, 8 prompts per step): one training step's samples are generated once, then
``Learner.update`` runs on those same samples in each layout (``learner_packing``), the trainable weights and the
optimizer state restored before every run. Prints the median seconds per update over ``--repeats`` runs (after one
warm-up run), the tokens each layout computes, the speed-up of prefix sharing, and the update's share of a step
(the step's rollout and Monte Carlo time measured in the same run).

    python benchmarks/update.py [--repeats 3] [--algorithms grpo spo_chain spo_tree] [--json out.json]
    python benchmarks/update.py --algorithms grpo --layouts prefix_tree --profile 25   # where the time goes
    python benchmarks/update.py --algorithms grpo --layouts prefix_tree --float32 --profile 25

``--profile N`` runs each layout once more under ``torch.profiler`` and prints its N most expensive operators
(self CPU time), the profiles quoted in ``benchmarks/RESULTS.md``.

Time it on an idle machine: the figures are seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spo.models import setup_cpu_math  # noqa: E402
from spo.trainer.run import build_trainer, load_recipe  # noqa: E402

RECIPES = {"grpo": "quickstart_grpo.yaml", "spo_chain": "quickstart.yaml", "spo_tree": "quickstart_spo_tree.yaml"}
LAYOUTS = ("prefix_tree", "padding_free", "padded")


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def one_step_of_samples(trainer):
    """The first training step's rollouts as the trainer makes them, and the seconds that took."""
    started = time.perf_counter()
    trainer.unwrapped.eval()
    if trainer.snapshot is not None:
        trainer.snapshot.refresh()
    samples = trainer._apply_buffer(trainer.make_samples(trainer.next_prompts(), 0), 0)
    batch = trainer.train_batch(samples)
    return batch, time.perf_counter() - started


def profile_update(learner, batch, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        learner.update(batch, step=0)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def time_updates(trainer, batch, layouts, repeats: int, profile_rows: int = 0) -> dict:
    learner = trainer.learner
    weights, optimizer = learner.trainable_state(), copy.deepcopy(learner.optimizer_state())
    results = {}
    for layout in layouts:
        learner.packing = layout
        seconds = []
        for run in range(repeats + 1):  # the first run warms the kernels up
            learner.load_trainable_state(weights, "benchmark")
            learner.load_optimizer_state(copy.deepcopy(optimizer))
            started = time.perf_counter()
            metrics = learner.update(batch, step=0)
            if run:
                seconds.append(time.perf_counter() - started)
        # positions of the forward passes (idle rows dropped)
        results[layout] = {"seconds": statistics.median(seconds), "runs": seconds,
                           "tokens": int(metrics["train/forward_tokens"])}
        if profile_rows:
            learner.load_trainable_state(weights, "benchmark")
            learner.load_optimizer_state(copy.deepcopy(optimizer))
            print(f"\n{layout}: operators by self CPU time\n{profile_update(learner, batch, profile_rows)}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--algorithms", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--float32", action="store_true",
                        help="the learner and the rollouts in float32 (the recipes use bf16 autocast and bf16 rollouts)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile each layout's update and print its N most expensive operators")
    options = parser.parse_args()
    setup_cpu_math()
    figures = {}
    for algorithm in options.algorithms:
        reset_accelerate()
        with tempfile.TemporaryDirectory() as out:
            train = {"output_dir": out, "report_to": ["none"], "save_steps": None}
            if options.float32:
                train.update(bf16=False, rollout_dtype="float32")
            recipe = load_recipe(ROOT / "recipes" / RECIPES[algorithm],
                                 {"train": train, "evaluate_before": False, "evaluate_after": False})
            trainer = build_trainer(recipe)
            batch, rollout_seconds = one_step_of_samples(trainer)
            figures[algorithm] = {"rollout_seconds": rollout_seconds, "samples": len(batch),
                                  **time_updates(trainer, batch, options.layouts, options.repeats,
                                                             options.profile)}
            trainer.close()
    print(f"\nLearner update per step, quickstart recipes{' in float32' if options.float32 else ''}, "
          f"{torch.get_num_threads()} CPU threads, median of {options.repeats}")
    print(f"{'algorithm':<11}{'samples':>8}{'layout':>14}{'tokens':>8}{'s/update':>10}{'vs padded':>11}"
          f"{'share of step':>15}")
    for algorithm, result in figures.items():
        padded = result.get("padded", {}).get("seconds")
        for layout in options.layouts:
            row = result[layout]
            ratio = f"{padded / row['seconds']:.2f}x" if padded else "-"
            share = row["seconds"] / (row["seconds"] + result["rollout_seconds"])
            print(f"{algorithm:<11}{result['samples']:>8}{layout:>14}{row['tokens']:>8}{row['seconds']:>10.2f}"
                  f"{ratio:>11}{share:>15.0%}")
        if "prefix_tree" in result and "padding_free" in result:
            gain = result["padding_free"]["seconds"] / result["prefix_tree"]["seconds"]
            print(f"{'':<11}prefix sharing: {gain:.2f}x faster than the same packing without sharing; "
                  f"rollouts took {result['rollout_seconds']:.1f} s")
    if options.json:
        Path(options.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
