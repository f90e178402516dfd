"""Our GRPO trainer against TRL's GRPOTrainer on the same work, in one run, on the CPU.

Work: the embedded SmolLM2-135M-Instruct, LoRA rank 16 on all linear projections, 4 prompts x 8 generations per
step, at most 64 new tokens, temperature 1.0, beta 0, 4 optimizer steps. Prints seconds per step and completion
tokens per second for both, and the ratio: both in float32, then both with their bf16 options (TRL: ``bf16=True``;
ours: ``bf16`` plus ``rollout_dtype="bfloat16"``). Then SPO-chain's cost per step broken into generate / Monte
Carlo / update.

Each side samples its own way: TRL with ``generate`` on the LoRA model (its default without vLLM), ours from a
merged copy of the policy (``rollout_dtype``: ``float32`` in the float32 runs, ``bfloat16`` in the bf16 ones).

TRL's GRPOConfig turns gradient checkpointing on by default (a second forward pass in its backward); ours has it off.
Both sides run with it off unless ``--trl-gradient-checkpointing`` (TRL only). ``--threads`` sets the torch threads
each side runs with (state it with every ratio: the ratio depends on it).

    pip install -e ".[bench]"      # TRL, only for this benchmark
    python benchmarks/vs_trl.py [--steps 4] [--threads 2] [--skip-trl] [--skip-spo] [--trl-gradient-checkpointing]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402

from spo.data import make_arithmetic_task  # noqa: E402
from spo.models import EMBEDDED_MODEL, load_model, load_tokenizer, setup_cpu_math  # noqa: E402

PROMPTS, GENERATIONS, NEW_TOKENS = 4, 8, 64


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")


def dataset(steps: int):
    return make_arithmetic_task("train", PROMPTS * steps, seed=11)


def run_trl(steps: int, bf16: bool = False, gradient_checkpointing: bool = False) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from rewards import numeric_accuracy

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = load_model(EMBEDDED_MODEL)
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(output_dir=out, per_device_train_batch_size=PROMPTS * GENERATIONS,
                          num_generations=GENERATIONS, max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.0,
                          max_steps=steps, learning_rate=1e-4, logging_steps=1, use_cpu=True, report_to="none",
                          save_strategy="no", seed=0, bf16=bf16, gradient_checkpointing=gradient_checkpointing)
        trainer = GRPOTrainer(model=model, reward_funcs=numeric_accuracy, args=args, train_dataset=dataset(steps),
                              processing_class=tokenizer, peft_config=lora())
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    tokens = sum(h["completions/mean_length"] * PROMPTS * GENERATIONS for h in logs)
    return {"seconds_per_step": seconds / steps, "tokens_per_second": tokens / seconds, "tokens": tokens}


def run_ours(steps: int, algorithm: str = "grpo", fast: bool = False) -> dict:
    from spo.trainer import GRPOConfig, GRPOTrainer
    from spo.trainer.config import SPOChainConfig
    from spo.trainer.spo_chain import SPOChainTrainer

    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = load_model(EMBEDDED_MODEL)
    common = dict(prompts_per_step=PROMPTS, num_generations=GENERATIONS, max_completion_length=NEW_TOKENS,
                  temperature=1.0, top_p=1.0, beta=0.0, max_steps=steps, learning_rate=1e-4, report_to=["none"],
                  save_steps=None, per_device_train_batch_size=8, gradient_accumulation_steps=4, seed=0,
                  log_completions=False)
    # rollouts from a merged copy of the policy (no adapter matmuls per decoded token), in the run's precision
    common.update(rollout_dtype="float32")
    if fast:  # bf16 rollouts, bf16 autocast for the learner
        common.update(rollout_dtype="bfloat16", bf16=True)
    with tempfile.TemporaryDirectory() as out:
        if algorithm == "grpo":
            trainer = GRPOTrainer(model=model, reward_funcs=["arithmetic_accuracy"],
                                  args=GRPOConfig(output_dir=out, **common), train_dataset=dataset(steps),
                                  processing_class=tokenizer, peft_config=lora())
        else:
            trainer = SPOChainTrainer(model=model, reward_funcs=["arithmetic_accuracy"],
                                      args=SPOChainConfig(output_dir=out, mc_samples=4, **common),
                                      train_dataset=dataset(steps), processing_class=tokenizer, peft_config=lora())
        start = time.perf_counter()
        history = trainer.train()
        seconds = time.perf_counter() - start
    rollout_tokens = sum(h["completions/mean_length"] * PROMPTS * GENERATIONS for h in history)
    result = {"seconds_per_step": seconds / steps, "tokens_per_second": rollout_tokens / seconds,
              "tokens": rollout_tokens}
    for key in ("timing/rollout", "timing/monte_carlo", "timing/update", "spo/mc_rollouts", "spo/mc_tokens"):
        values = [h[key] for h in history if key in h]
        if values:
            result[key] = sum(values) / len(values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-spo", action="store_true")
    parser.add_argument("--skip-bf16", action="store_true", help="only the float32 runs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="TRL with gradient checkpointing (its default); ours never uses it here")
    parser.add_argument("--json", help="also write the figures to this file")
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)
    setup_cpu_math()
    checkpointing = options.trl_gradient_checkpointing
    torch.manual_seed(0)
    figures = {"ours_grpo": run_ours(options.steps)}
    if not options.skip_trl:
        figures["trl_grpo"] = run_trl(options.steps, gradient_checkpointing=checkpointing)
    if not options.skip_bf16:
        reset_accelerate()  # accelerate's process-wide state keeps its first mixed-precision setting
        figures["ours_grpo_bf16"] = run_ours(options.steps, fast=True)
        if not options.skip_trl:
            reset_accelerate()
            figures["trl_grpo_bf16"] = run_trl(options.steps, bf16=True, gradient_checkpointing=checkpointing)
    if not options.skip_spo:
        reset_accelerate()
        figures["ours_spo_chain"] = run_ours(options.steps, "spo_chain", fast=not options.skip_bf16)

    print(f"\nGRPO, {PROMPTS} prompts x {GENERATIONS} generations, <= {NEW_TOKENS} new tokens, LoRA r16, "
          f"{options.steps} steps, {torch.get_num_threads()} CPU threads, TRL gradient checkpointing "
          f"{'on' if checkpointing else 'off'}")
    print(f"{'trainer':<16}{'s/step':>10}{'tokens/s':>12}{'our update s':>14}")
    for name in ("trl_grpo", "ours_grpo", "trl_grpo_bf16", "ours_grpo_bf16"):
        if name in figures:
            update = figures[name].get("timing/update")
            print(f"{name:<16}{figures[name]['seconds_per_step']:>10.1f}{figures[name]['tokens_per_second']:>12.1f}"
                  f"{'' if update is None else f'{update:.1f}':>14}")
    for ours, trl in (("ours_grpo", "trl_grpo"), ("ours_grpo_bf16", "trl_grpo_bf16"), ("ours_grpo_bf16", "trl_grpo")):
        if ours in figures and trl in figures:
            ratio = figures[ours]["tokens_per_second"] / figures[trl]["tokens_per_second"]
            figures[f"ratio {ours} / {trl}"] = ratio
            print(f"{ours} / {trl}: {ratio:.2f}x tokens/s")
    if "ours_spo_chain" in figures:
        spo = figures["ours_spo_chain"]
        print(f"\nSPO-chain (K = 4), seconds per step: total {spo['seconds_per_step']:.1f} = rollouts "
              f"{spo.get('timing/rollout', 0) - spo.get('timing/monte_carlo', 0):.1f} + Monte Carlo "
              f"{spo.get('timing/monte_carlo', 0):.1f} + update {spo.get('timing/update', 0):.1f} "
              f"({spo.get('spo/mc_rollouts', 0):.0f} continuations, {spo.get('spo/mc_tokens', 0):.0f} tokens)")
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
