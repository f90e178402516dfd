"""Learning comparisons at an equal budget, over seeds, on a built-in task.

Every variant starts from the shipped quickstart recipe of its algorithm (``recipes/quickstart.yaml`` for SPO-chain,
``quickstart_spo_tree.yaml``, ``quickstart_grpo.yaml`` for GRPO, RLOO and Dr.GRPO: embedded model, MoS adapters,
LazyEviction 50% with the importance correction, ``auto`` precision: bf16 only where the device computes it
natively) and changes at most one thing. Each run trains until it has sampled ``--token-budget`` tokens (rollouts
and Monte Carlo continuations alike) or spent ``--seconds-budget`` seconds in training steps (rollouts and updates;
evaluations and checkpoints do not count), then is evaluated greedily on the same held-out problems as every other
run (the first run also evaluates the starting model, which is the same for every run). Writes a Markdown table
(held-out accuracy: mean and standard error over seeds, tokens, steps, training time) and a plot of training reward
(mean over seeds, the band one standard error wide) against tokens or seconds.

    python benchmarks/learning.py --seeds 0 1 2 --token-budget 60000
    python benchmarks/learning.py --task ledger --seconds-budget 600 --variants spo_chain spo_tree grpo \
        --model outputs/ledger_warmup/step16   # a warmed-up model (benchmarks/ledger_warmup.py)
    python benchmarks/learning.py --variants lora_r1 mos_r1 --learning-rates 5e-4 2e-3 5e-3   # a small lr sweep

It resumes by itself: a finished run (in OUT/results.json) is not run again, and an interrupted one continues
from its last checkpoint, so a long sweep can be stopped and restarted across sessions. A results file written
for another task or budget is refused rather than mixed in. Time budgets need an otherwise idle machine.

Every run is made in a fresh process of its own, so that no run inherits the state of the one before it.
``--jobs N`` runs N of them at once: on CPU the cores are split among them, on several GPUs each gets one (round
robin), on one GPU they share it (the embedded model is small). Each adds its results to the same OUT/results.json,
under a file lock. Training times are then only comparable between runs made with the same number of jobs.

    python benchmarks/learning.py --jobs 2 --token-budget 40000 --variants spo_chain spo_tree grpo rloo dr_grpo
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _mos(equivalent_rank: int) -> dict:
    """MoS with LoRA rank ``equivalent_rank``'s trainable parameters (the quickstart's shape at R = 2)."""
    return {"type": "mos", "r": 8, "equivalent_rank": equivalent_rank, "shards_per_vector": 2,
            "private_rank": 0 if equivalent_rank == 1 else 1, "lora_alpha": 16, "target_modules": PROJECTIONS}


def _lora(rank: int) -> dict:
    return {"type": "lora", "r": rank, "lora_alpha": 2 * rank, "target_modules": PROJECTIONS}


# the shipped quickstart recipe of each algorithm: the same task, model, adapter and step budget, its own settings
ALGORITHM_RECIPES = {"spo_chain": "quickstart.yaml", "spo_tree": "quickstart_spo_tree.yaml",
                     "grpo": "quickstart_grpo.yaml", "rloo": "quickstart_grpo.yaml", "dr_grpo": "quickstart_grpo.yaml"}

# variant -> (algorithm, overrides of its recipe's train section, its peft section or None for the recipe's)
VARIANTS: dict[str, tuple[str, dict, dict | None]] = {
    "spo_chain": ("spo_chain", {}, None),  # the quickstart recipe as shipped
    "spo_chain_no_mask": ("spo_chain", {"probability_mask": False}, None),
    "spo_chain_no_mc": ("spo_chain", {"max_mc_states_per_step": 0}, None),  # the group-valued prompt only
    "spo_tree": ("spo_tree", {}, None),
    "grpo": ("grpo", {}, None),
    "rloo": ("rloo", {}, None),
    "dr_grpo": ("dr_grpo", {}, None),
    "full_cache": ("spo_chain", {"kv_policy": "full", "kv_budget": None}, None),
    "lazy_50_uncorrected": ("spo_chain", {"importance_sampling_sequence_band": None,
                                          "importance_sampling_cap": None}, None),
    "no_buffer": ("spo_chain", {"use_sample_buffer": False}, None),
    "lora_r1": ("spo_chain", {}, _lora(1)),
    "lora_r2": ("spo_chain", {}, _lora(2)),
    "lora_r8": ("spo_chain", {}, _lora(8)),
    "mos_r1": ("spo_chain", {}, _mos(1)),  # LoRA r1's parameters: 1/8 of LoRA r8's
    "mos_r8": ("spo_chain", {}, _mos(8)),  # LoRA r8's parameters; mos_r2 is spo_chain itself
}

# task -> changes to the recipe: data sets, reward and lengths (the ledger's worked answers run 150-300 tokens)
TASKS: dict[str, dict] = {
    "arithmetic": {},
    "ledger": {"source": "builtin:ledger", "reward_funcs": ["numeric_accuracy"],
               "train": {"max_completion_length": 320, "eval_max_new_tokens": 384}},
}


def run_name(variant: str, learning_rate: float | None) -> str:
    return variant if learning_rate is None else f"{variant}@lr{learning_rate:g}"


def variant_recipe(name: str, seed: int, out: Path, eval_limit: int, *, task: str = "arithmetic",
                   token_budget: int | None = None, seconds_budget: float | None = None,
                   learning_rate: float | None = None, model: str | None = None):
    """The quickstart recipe of variant ``name``'s algorithm on ``task`` with its changes, ending at the token or
    time budget; ``model``: a model name or folder instead of the recipe's (the embedded model)."""
    from spo.config import load_config
    from spo.trainer.run import Recipe

    if (token_budget is None) == (seconds_budget is None):
        raise ValueError("give exactly one of token_budget and seconds_budget")
    algorithm, train_overrides, peft = VARIANTS[name]
    recipe = load_config(Recipe, ROOT / "recipes" / ALGORITHM_RECIPES[algorithm])
    recipe.algorithm = algorithm
    recipe.model = model or recipe.model
    changes = TASKS[task]
    if "source" in changes:
        recipe.dataset.source = recipe.eval_dataset.source = changes["source"]
    recipe.reward_funcs = changes.get("reward_funcs", recipe.reward_funcs)
    train = dict(recipe.train) | changes.get("train", {})
    # a budget ends the run (max_steps is out of reach): the recipe's schedule decays over that budget
    train.update(train_overrides, seed=seed, max_steps=10_000, max_generated_tokens=token_budget,
                 max_train_seconds=seconds_budget, save_steps=4, save_total_limit=1, report_to=["none"],
                 log_completions=False,
                 output_dir=str(out / f"{run_name(name, learning_rate)}-seed{seed}"))
    if learning_rate is not None:
        train["learning_rate"] = learning_rate
    recipe.train = train
    recipe.dataset.seed = seed
    recipe.eval_dataset.limit = eval_limit
    if peft is not None:
        recipe.peft = peft
    return recipe


def run_variant(recipe, name: str, seed: int, learning_rate: float | None, *, evaluate_before: bool = False) -> dict:
    """Train ``recipe`` to its budget and evaluate it; ``evaluate_before``: also evaluate the starting model first
    (greedy, so the same for every run of a results file: measured once), unless the run resumes."""
    from spo.trainer import checkpoint as ckpt
    from spo.trainer.run import build_trainer

    output_dir = Path(recipe.train["output_dir"])
    resuming = ckpt.resolve(output_dir, "latest") is not None
    if resuming:
        recipe.train["resume_from_checkpoint"] = "latest"  # an interrupted run continues
    else:
        recipe.train["overwrite_output_dir"] = True  # a run killed before its first checkpoint starts over
    started = time.perf_counter()
    trainer = build_trainer(recipe)
    before = trainer.evaluate()["accuracy"] if evaluate_before and not resuming else None
    history = trainer.train()
    accuracy = trainer.evaluate()["accuracy"]
    trainer.close()
    return {"variant": run_name(name, learning_rate), "seed": seed, "accuracy": accuracy, "before": before,
            "tokens": trainer.tokens_generated, "steps": trainer.step, "train_seconds": trainer.train_seconds,
            "seconds": time.perf_counter() - started,
            "curve": [(h.get("tokens/generated_total", 0), h.get("timing/train_total", 0), h.get("reward"))
                      for h in history if "reward" in h]}


def mean_and_error(values: list[float]) -> tuple[float, float]:
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), error


def accuracy_before(results: list[dict]) -> float | None:
    """The starting model's held-out accuracy, as the first run that measured it recorded it."""
    return next((r["before"] for r in results if r.get("before") is not None), None)


def table(results: list[dict]) -> str:
    before = accuracy_before(results)
    lines = [f"Held-out accuracy before training: {before:.3f}", ""] if before is not None else []
    lines += ["| variant | held-out accuracy (mean ± SE) | seeds | tokens generated | steps | training time (s) |",
              "| --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        mean, error = mean_and_error([r["accuracy"] for r in runs])
        error_text = "-" if math.isnan(error) else f"{error:.3f}"  # one seed has no standard error
        lines.append(f"| {name} | {mean:.3f} ± {error_text} | {len(runs)} | "
                     f"{statistics.mean(r['tokens'] for r in runs):,.0f} | "
                     f"{statistics.mean(r['steps'] for r in runs):.1f} | "
                     f"{statistics.mean(r['train_seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def spread(curves: list[list[tuple[float, float]]], points: int = 40) -> tuple[list[float], list[float], list[float]]:
    """Mean and standard error over ``curves`` of (x, y) points, each interpolated on a common grid of x up to the
    shortest curve's end (no seed is extrapolated)."""
    import numpy as np

    end = min(curve[-1][0] for curve in curves)
    grid = np.linspace(min(curve[0][0] for curve in curves), end, points)
    ys = np.array([np.interp(grid, [x for x, _ in curve], [y for _, y in curve]) for curve in curves])
    error = ys.std(axis=0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else np.zeros(points)
    return grid.tolist(), ys.mean(axis=0).tolist(), error.tolist()


def plot(results: list[dict], path: Path, against: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = 0 if against == "tokens" else 1
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name in dict.fromkeys(r["variant"] for r in results):
        curves = [[(point[column], point[2]) for point in r["curve"] if point[2] is not None]
                  for r in results if r["variant"] == name]
        curves = [c for c in curves if len(c) > 1]
        if not curves:
            continue
        x, mean, error = spread(curves)
        line, = axis.plot(x, mean, label=f"{name} ({len(curves)} seeds)")
        axis.fill_between(x, [m - e for m, e in zip(mean, error)], [m + e for m, e in zip(mean, error)],
                          color=line.get_color(), alpha=0.2)
    axis.set_xlabel("tokens generated" if against == "tokens" else "training time (s)")
    axis.set_ylabel("training reward (mean ± SE over seeds)")
    axis.grid(alpha=0.3)
    if axis.lines:  # runs of one step have no curve
        axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def load_results(saved: Path, setting: dict) -> list[dict]:
    """Finished runs of an earlier invocation with the same task, budget and evaluation (else an error)."""
    if not saved.is_file():
        return []
    data = json.loads(saved.read_text())
    if data.get("setting") != setting:
        raise SystemExit(f"{saved} holds runs for {data.get('setting')}, not {setting}: choose another --out")
    return data["runs"]


@contextlib.contextmanager
def locked(saved: Path):
    """Hold the lock that serialises the workers' reads and writes of ``saved``."""
    with open(saved.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_json(path: Path, data) -> None:
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(data, indent=2))
    staging.replace(path)  # atomic: a kill leaves the old file or the new one


def record_run(saved: Path, setting: dict, result: dict) -> list[dict]:
    """Add ``result`` to ``saved`` atomically, under the lock so that concurrent workers lose none of each other's
    runs; returns every run recorded so far."""
    with locked(saved):
        results = load_results(saved, setting) + [result]
        write_json(saved, {"setting": setting, "runs": results})
    return results


def pending_runs(saved: Path, setting: dict, plan: list[tuple]) -> list[tuple]:
    """The runs of ``plan`` not recorded in ``saved`` yet: a resumed sweep runs only these, and an interrupted run
    among them continues from its checkpoint."""
    with locked(saved):
        done = {(r["variant"], r["seed"]) for r in load_results(saved, setting)}
    return [(name, learning_rate, seed) for name, learning_rate, seed in plan
            if (run_name(name, learning_rate), seed) not in done]


def worker_environment(index: int, jobs: int, cpu_count: int, gpu_count: int) -> dict[str, str]:
    """Environment of worker ``index`` of ``jobs``: its share of the CPU threads, and its own GPU where there are
    several (an explicit OMP_NUM_THREADS or CUDA_VISIBLE_DEVICES is kept)."""
    environment = {"OMP_NUM_THREADS": str(max(1, cpu_count // jobs))}
    if gpu_count > 1:
        environment["CUDA_VISIBLE_DEVICES"] = str(index % gpu_count)
    return {key: value for key, value in environment.items() if key not in os.environ}


def run_in_processes(runs: list[tuple], jobs: int, command) -> None:
    """Run each of ``runs`` in a process of its own, ``command(run)``, at most ``jobs`` at once, and wait for all of
    them. A run inherits nothing from the one before it: runs made one after another in one process got slower
    (the same first update took 12-36% longer after another run than as the process's first), which a wall-clock
    budget charged to the later ones. A failed run stops new ones from starting; the others finish."""
    import torch

    gpu_count = torch.cuda.device_count()
    queue, running, failed = list(runs), {}, []
    while queue or running:
        for slot in range(jobs):
            if slot not in running and queue and not failed:
                run = queue.pop(0)
                environment = os.environ | worker_environment(slot, jobs, os.cpu_count() or 1, gpu_count)
                running[slot] = (run, subprocess.Popen(command(run), env=environment))
        time.sleep(0.2)
        for slot, (run, process) in list(running.items()):
            if process.poll() is not None:
                del running[slot]
                if process.returncode != 0:
                    failed.append(f"{run_name(run[0], run[1])} seed {run[2]}")
        if failed and not running:
            break
    if failed:
        raise SystemExit(f"run(s) {', '.join(failed)} failed (their output is above); rerun to resume")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--task", default="arithmetic", choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--token-budget", type=int, help="tokens sampled per run (default 60,000)")
    budget.add_argument("--seconds-budget", type=float, help="seconds of training steps per run")
    parser.add_argument("--learning-rates", nargs="+", type=float,
                        help="run every variant at each of these learning rates (a sweep); default: the recipe's")
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--model", help="a model name or folder to start from (default: the recipes' embedded model)")
    parser.add_argument("--out", default="outputs/learning")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in a process of its own")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # '[variant, learning rate, seed]': a worker's one run
    options = parser.parse_args()
    if options.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {options.jobs}")
    if options.token_budget is None and options.seconds_budget is None:
        options.token_budget = 60_000
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = {"task": options.task, "token_budget": options.token_budget,
               "seconds_budget": options.seconds_budget, "eval_limit": options.eval_limit}
    if options.model is not None:  # absent for the recipes' own model, so earlier results files still resume
        setting["model"] = options.model
    saved = out / "results.json"
    load_results(saved, setting)  # refuses another setting's file before any run starts
    if options.run is not None:  # a worker: one run, recorded, then exit
        name, learning_rate, seed = json.loads(options.run)
        recipe = variant_recipe(name, seed, out, options.eval_limit, task=options.task,
                                token_budget=options.token_budget, seconds_budget=options.seconds_budget,
                                learning_rate=learning_rate, model=options.model)
        with locked(saved):
            measured = accuracy_before(load_results(saved, setting)) is not None
        result = run_variant(recipe, name, seed, learning_rate, evaluate_before=not measured)
        print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
        record_run(saved, setting, result)
        return
    plan = [(name, learning_rate, seed) for name in options.variants
            for learning_rate in options.learning_rates or [None] for seed in options.seeds]
    run_in_processes(pending_runs(saved, setting, plan), options.jobs,
                     lambda run: [sys.executable, *sys.argv, "--run", json.dumps(list(run))])
    results = load_results(saved, setting)
    print(table(results))
    (out / "table.md").write_text(table(results) + "\n")
    plot(results, out / "curves.png", "tokens" if options.token_budget is not None else "seconds")


if __name__ == "__main__":
    main()
