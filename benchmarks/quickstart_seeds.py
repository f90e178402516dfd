"""The quickstart over several seeds, as a user runs it: ``spo train recipes/quickstart.yaml --train.seed S``, each
seed in its own process, one after the other.

Per seed: held-out greedy accuracy before and after (the run's ``summary.json``), wall time of the whole command
(model load, both evaluations, saving), and the update's share of the steps' time (``timing/update`` over
``timing/step`` in ``metrics.jsonl``). Then the mean and its standard error over seeds, and the range.

    python benchmarks/quickstart_seeds.py --seeds 0 1 2 [--recipe recipes/quickstart.yaml] [--out outputs/seeds]
    python benchmarks/quickstart_seeds.py --seeds 0 1 2 --out outputs/full --train.kv_policy full --train.kv_budget null

Other options are recipe keys, passed on to ``spo train`` as they are.

A seed whose folder already holds its result is not run again, so an interrupted sweep resumes where it stopped
(``--rerun`` runs every seed afresh). Time it on an idle machine: the wall times are the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "quickstart_seed.json"


def run_seed(recipe: Path, seed: int, folder: Path, rerun: bool, overrides: list[str]) -> dict:
    result_file = folder / RESULT
    if result_file.exists() and not rerun:
        saved = json.loads(result_file.read_text())
        if saved.get("overrides", []) == overrides:  # a result for other recipe keys is run again
            return saved
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "spo.cli", "train", str(recipe), "--train.seed", str(seed),
               "--train.output_dir", str(folder), *overrides]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - started
    summary = json.loads((folder / "summary.json").read_text())
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [s for s in steps if "timing/step" in s]
    result = {"seed": seed, "overrides": overrides, "before": summary["eval_before"], "after": summary["eval_after"], "seconds": seconds,
              "steps": len(steps), "update_share": sum(s["timing/update"] for s in steps)
              / sum(s["timing/step"] for s in steps)}
    result_file.write_text(json.dumps(result, indent=2))
    return result


def mean_and_error(values: list[float]) -> tuple[float, float]:
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return statistics.mean(values), error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "quickstart.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "quickstart-seeds")
    parser.add_argument("--rerun", action="store_true", help="run every seed again, even those already done")
    parser.add_argument("--json", help="also write the figures to this file")
    options, overrides = parser.parse_known_args()
    results = [run_seed(options.recipe.resolve(), seed, options.out.resolve() / f"seed{seed}", options.rerun,
                        overrides) for seed in options.seeds]
    print(f"\n{options.recipe.name} {' '.join(overrides)}, {len(results)} seeds")
    print("| seed | before | after | gain (points) | wall time | update share of step time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {100 * (r['after'] - r['before']):+.1f} | "
              f"{r['seconds'] / 60:.1f} min | {r['update_share']:.1%} |")
    gains = [100 * (r["after"] - r["before"]) for r in results]
    for label, values, unit in (("gain", gains, " points"), ("after", [r["after"] for r in results], ""),
                                ("wall time", [r["seconds"] / 60 for r in results], " min"),
                                ("update share", [100 * r["update_share"] for r in results], "%")):
        mean, error = mean_and_error(values)
        print(f"{label}: mean {mean:.2f}{unit} ± {error:.2f} (standard error), range {min(values):.2f} to "
              f"{max(values):.2f}")
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
