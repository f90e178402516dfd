"""Learning comparisons at an equal budget, over seeds, on a built-in task.

Every variant starts from the shipped quickstart recipe of its algorithm (``recipes/quickstart.yaml`` for SPO-chain,
``quickstart_spo_tree.yaml``, ``quickstart_grpo.yaml`` for GRPO, RLOO and Dr.GRPO: embedded model, MoS adapters,
LazyEviction 50% with the importance correction, bf16 rollouts) and changes at most one thing. Each run trains until
it has sampled ``--token-budget`` tokens (rollouts and Monte Carlo continuations alike) or spent
``--seconds-budget`` seconds in training steps (rollouts and updates; evaluations and checkpoints do not count),
then is evaluated greedily on the same held-out problems as every other run. Writes a Markdown table (held-out
accuracy: mean and standard error over seeds, tokens, steps, training time) and a plot of training reward (mean over
seeds, the band one standard error wide) against tokens or seconds.

    python benchmarks/learning.py --seeds 0 1 2 --token-budget 60000
    python benchmarks/learning.py --task ledger --seconds-budget 600 --variants spo_chain spo_tree grpo \
        --model outputs/ledger_warmup/step16   # a warmed-up model (benchmarks/ledger_warmup.py)
    python benchmarks/learning.py --variants lora_r1 mos_r1 --learning-rates 5e-4 2e-3 5e-3   # a small lr sweep

It resumes by itself: a finished run (in OUT/results.json) is not run again, and an interrupted one continues
from its last checkpoint, so a long sweep can be stopped and restarted across sessions. A results file written
for another task or budget is refused rather than mixed in. Time budgets need an otherwise idle machine.

``--jobs N`` runs N runs at once, each worker in its own process: on CPU the cores are split among them, on
several GPUs each worker gets one (round robin), on one GPU they share it (the embedded model is small). Each
worker claims the next run nobody has taken when it is free, and adds its results to the same OUT/results.json,
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


def run_variant(recipe, name: str, seed: int, learning_rate: float | None) -> dict:
    from spo.trainer import checkpoint as ckpt
    from spo.trainer.run import build_trainer

    output_dir = Path(recipe.train["output_dir"])
    if ckpt.resolve(output_dir, "latest") is not None:
        recipe.train["resume_from_checkpoint"] = "latest"  # an interrupted run continues
    else:
        recipe.train["overwrite_output_dir"] = True  # a run killed before its first checkpoint starts over
    started = time.perf_counter()
    trainer = build_trainer(recipe)
    history = trainer.train()
    accuracy = trainer.evaluate()["accuracy"]
    trainer.close()
    return {"variant": run_name(name, learning_rate), "seed": seed, "accuracy": accuracy,
            "tokens": trainer.tokens_generated, "steps": trainer.step, "train_seconds": trainer.train_seconds,
            "seconds": time.perf_counter() - started,
            "curve": [(h.get("tokens/generated_total", 0), h.get("timing/train_total", 0), h.get("reward"))
                      for h in history if "reward" in h]}


def mean_and_error(values: list[float]) -> tuple[float, float]:
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), error


def table(results: list[dict]) -> str:
    lines = ["| variant | held-out accuracy (mean ± SE) | seeds | tokens generated | steps | training time (s) |",
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
    """Hold the lock that serialises the workers' reads and writes of ``saved`` and of their claims."""
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


def new_invocation() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


def claim_run(saved: Path, setting: dict, plan: list[tuple], invocation: str) -> tuple | None:
    """The first run of ``plan`` that is neither recorded in ``saved`` nor claimed by a worker of this
    ``invocation``, now claimed (None: none is left). Workers that claim as they go stay busy until the plan is
    done however long each run takes, and a resumed sweep shares out only what remains. An earlier invocation's
    claims are dropped: its unfinished runs are taken again and continue from their checkpoints."""
    claims_path = saved.with_name("claims.json")
    with locked(saved):
        done = {(r["variant"], r["seed"]) for r in load_results(saved, setting)}
        claims = json.loads(claims_path.read_text()) if claims_path.is_file() else {}
        claimed = [tuple(key) for key in claims.get(invocation, [])]
        for name, learning_rate, seed in plan:
            key = (run_name(name, learning_rate), seed)
            if key not in done and key not in claimed:
                write_json(claims_path, {invocation: [*claimed, key]})
                return name, learning_rate, seed
    return None


def worker_environment(index: int, jobs: int, cpu_count: int, gpu_count: int) -> dict[str, str]:
    """Environment of worker ``index`` of ``jobs``: its share of the CPU threads, and its own GPU where there are
    several (an explicit OMP_NUM_THREADS or CUDA_VISIBLE_DEVICES is kept)."""
    environment = {"OMP_NUM_THREADS": str(max(1, cpu_count // jobs))}
    if gpu_count > 1:
        environment["CUDA_VISIBLE_DEVICES"] = str(index % gpu_count)
    return {key: value for key, value in environment.items() if key not in os.environ}


def run_workers(jobs: int) -> None:
    """Run this command as ``jobs`` worker processes and wait for all of them."""
    import torch

    gpu_count = torch.cuda.device_count()
    invocation = new_invocation()  # the workers claim runs as this invocation's
    workers = [subprocess.Popen([sys.executable, *sys.argv, "--worker", f"{index}/{jobs}",
                                 "--invocation", invocation],
                                env=os.environ | worker_environment(index, jobs, os.cpu_count() or 1, gpu_count))
               for index in range(jobs)]
    failed = [f"{index}/{jobs}" for index, worker in enumerate(workers) if worker.wait() != 0]
    if failed:
        raise SystemExit(f"worker(s) {', '.join(failed)} failed (their output is above); rerun to resume")


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
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own worker process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # "K/N", set by --jobs for its workers
    parser.add_argument("--invocation", help=argparse.SUPPRESS)  # the --jobs invocation whose runs they claim
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
    if options.jobs > 1 and options.worker is None:
        run_workers(options.jobs)
    else:
        plan = [(name, learning_rate, seed) for name in options.variants
                for learning_rate in options.learning_rates or [None] for seed in options.seeds]
        invocation = options.invocation or new_invocation()
        while (run := claim_run(saved, setting, plan, invocation)) is not None:
            name, learning_rate, seed = run
            recipe = variant_recipe(name, seed, out, options.eval_limit, task=options.task,
                                    token_budget=options.token_budget, seconds_budget=options.seconds_budget,
                                    learning_rate=learning_rate, model=options.model)
            result = run_variant(recipe, name, seed, learning_rate)
            print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
            record_run(saved, setting, result)
        if options.worker is not None:
            return  # the parent writes the table of every worker's runs
    results = load_results(saved, setting)
    print(table(results))
    (out / "table.md").write_text(table(results) + "\n")
    plot(results, out / "curves.png", "tokens" if options.token_budget is not None else "seconds")


if __name__ == "__main__":
    main()
