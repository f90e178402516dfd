"""Learning comparisons at an equal budget of generated tokens, same seeds, on the built-in task.

Every variant starts from the quickstart recipe (embedded model, MoS adapters, SPO-chain, LazyEviction, sample
buffer, bf16 rollouts) and changes one thing; each trains until it has sampled ``--token-budget`` tokens (rollouts and Monte Carlo
continuations alike), then is evaluated greedily on the held-out split. Writes a Markdown table (held-out accuracy
mean and spread over seeds, tokens generated, wall time) and a plot of reward against tokens.

    python benchmarks/learning.py --seeds 0 1 2 --token-budget 60000
    python benchmarks/learning.py --variants spo_chain grpo --seeds 0 --token-budget 20000   # a quick look
    python benchmarks/learning.py ... --resume      # after an interruption: keeps the finished runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _mos(equivalent_rank: int, private_rank: int) -> dict:
    return {"type": "mos", "r": 8, "equivalent_rank": equivalent_rank, "shards_per_vector": 2,
            "private_rank": private_rank, "lora_alpha": 16, "target_modules": PROJECTIONS}


# variant -> (algorithm, overrides of the recipe's train section, overrides of its peft section)
VARIANTS: dict[str, tuple[str, dict, dict | None]] = {
    "spo_chain": ("spo_chain", {}, None),  # the quickstart recipe as shipped
    "spo_chain_no_mask": ("spo_chain", {"probability_mask": False}, None),
    "spo_tree": ("spo_tree", {"branching": [4, 2, 2], "segment_length": 24}, None),
    "grpo": ("grpo", {"probability_mask": False}, None),
    "grpo_prob_mask": ("grpo", {"probability_mask": True}, None),
    "lora_r8": ("spo_chain", {}, {"type": "lora", "r": 8, "lora_alpha": 16, "target_modules": PROJECTIONS}),
    "mos_equal_params": ("spo_chain", {}, _mos(equivalent_rank=8, private_rank=1)),  # LoRA r8's parameter count
    "mos_one_eighth": ("spo_chain", {}, _mos(equivalent_rank=1, private_rank=0)),  # LoRA r1's parameter count
    "full_cache": ("spo_chain", {"kv_policy": "full", "kv_budget": None}, None),
    "lazy_50": ("spo_chain", {"kv_policy": "lazy", "kv_budget": 0.5}, None),
    "no_buffer": ("spo_chain", {"use_sample_buffer": False}, None),
}
SPO_ONLY_KEYS = ("mc_samples", "cutpoint_interval", "max_mc_states_per_step", "group_prompt_value")


def variant_recipe(name: str, seed: int, budget: int, out: Path, eval_limit: int):
    """The quickstart recipe with variant ``name``'s changes, ending at ``budget`` generated tokens."""
    from spo.config import load_config
    from spo.trainer.run import Recipe

    algorithm, train_overrides, peft = VARIANTS[name]
    recipe = load_config(Recipe, ROOT / "recipes" / "quickstart.yaml")
    recipe.algorithm = algorithm
    train = dict(recipe.train)
    if algorithm != "spo_chain":
        for key in SPO_ONLY_KEYS:
            train.pop(key, None)
    # the token budget ends the run, so the step count is not known in advance: a constant learning rate (a
    # "linear" decay over a placeholder max_steps would be constant in all but name)
    train.update(train_overrides, seed=seed, max_steps=10_000, lr_scheduler_type="constant",
                 max_generated_tokens=budget, save_steps=None,
                 report_to=["none"], output_dir=str(out / f"{name}-seed{seed}"), log_completions=False)
    recipe.train = train
    recipe.dataset.seed = seed
    recipe.eval_dataset.limit = eval_limit
    if peft is not None:
        recipe.peft = peft
    return recipe


def run_variant(name: str, seed: int, budget: int, out: Path, eval_limit: int) -> dict:
    from spo.trainer.run import build_trainer

    started = time.perf_counter()
    trainer = build_trainer(variant_recipe(name, seed, budget, out, eval_limit))
    history = trainer.train()
    accuracy = trainer.evaluate()["accuracy"]
    return {"variant": name, "seed": seed, "accuracy": accuracy, "tokens": trainer.tokens_generated,
            "steps": trainer.step, "seconds": time.perf_counter() - started,
            "curve": [(h.get("tokens/generated_total", 0), h.get("reward")) for h in history]}


def table(results: list[dict]) -> str:
    lines = ["| variant | held-out accuracy (mean ± sd) | seeds | tokens generated | steps | wall time (s) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        accs = [r["accuracy"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(accs):.3f} ± {spread:.3f} | {len(runs)} | "
                     f"{statistics.mean(r['tokens'] for r in runs):.0f} | {statistics.mean(r['steps'] for r in runs):.0f} | "
                     f"{statistics.mean(r['seconds'] for r in runs):.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.5))
    for r in results:
        points = [(t, v) for t, v in r["curve"] if v is not None]
        if points:
            axis.plot(*zip(*points), label=f"{r['variant']} s{r['seed']}", alpha=0.8)
    axis.set_xlabel("tokens generated")
    axis.set_ylabel("training reward")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--token-budget", type=int, default=60_000)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--out", default="outputs/learning")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in OUT/results.json")
    options = parser.parse_args()
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    results = json.loads(saved.read_text()) if options.resume and saved.is_file() else []
    done = {(r["variant"], r["seed"]) for r in results}
    for name in options.variants:
        for seed in options.seeds:
            if (name, seed) in done:
                continue
            results.append(run_variant(name, seed, options.token_budget, out, options.eval_limit))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
            staging = saved.with_suffix(".tmp")
            staging.write_text(json.dumps(results, indent=2))
            staging.replace(saved)
    print(table(results))
    (out / "table.md").write_text(table(results) + "\n")
    plot(results, out / "curves.png")


if __name__ == "__main__":
    main()
