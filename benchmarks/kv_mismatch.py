"""How far a compressed-cache sampler is from the learner, per completion, on the embedded model.

Samples the built-in arithmetic task's training prompts (chat-formatted, T=0.7, 64 new tokens, 4 rollouts per
prompt) with each KV policy / budget / LazyEviction window, scores every completion with full attention (the
learner's view, float32) and prints, per setting, the quantiles of the per-completion geometric-mean ratio
learner/sampler ``exp(mean_t(log pi - log mu))``, the share outside the trainer's default sequence band
(``importance_sampling_sequence_band``), the mean gap in nats per token, and the reward of the rollouts (the
task's ``arithmetic_accuracy``, cut-off completions scored by the answer they state).

    python benchmarks/kv_mismatch.py                                    # full, lazy 50% (auto and 32-token window), lazy 75%
    python benchmarks/kv_mismatch.py --settings lazy:0.5:8 lazy:0.5:16  # policy:budget[:window]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import numeric_accuracy  # noqa: E402
from spo.data import make_arithmetic_task, tokenize_prompts  # noqa: E402
from spo.models import EMBEDDED_MODEL, load_model, load_tokenizer, setup_cpu_math  # noqa: E402
from spo.rollout import Generator, SamplingParams  # noqa: E402
from spo.trainer.config import GRPOConfig  # noqa: E402

DEFAULT_SETTINGS = ["full", "lazy:0.5", "lazy:0.5:32", "lazy:0.75"]
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def parse_setting(text: str) -> tuple[str, float | None, dict]:
    """``policy[:budget[:window]]`` -> (policy, budget, kv_kwargs)."""
    parts = text.split(":")
    budget = float(parts[1]) if len(parts) > 1 else None
    kwargs = {"window": int(parts[2])} if len(parts) > 2 else {}
    return parts[0], budget, kwargs


@torch.no_grad()
def learner_logprobs(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """Log-probs of ``completion`` under the model with full attention, at the sampling temperature."""
    logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def measure(model, tokenizer, prompt_ids, answers, setting: str, params: SamplingParams, samples: int) -> dict:
    policy, budget, kwargs = parse_setting(setting)
    generator = Generator(model, tokenizer, kv_policy=policy, kv_budget=budget, kv_kwargs=kwargs)
    rollouts = sorted(generator.generate(prompt_ids, params, num_return_sequences=samples).rollouts,
                      key=lambda r: r.input_index)
    gaps = [float((learner_logprobs(model, r.prompt_ids, r.completion_ids, params.temperature)
                   - r.logprobs).mean()) for r in rollouts if r.completion_ids]
    ratios = torch.tensor(gaps).exp()
    low, high = GRPOConfig().importance_sampling_sequence_band
    rewards = numeric_accuracy(completions=[r.text for r in rollouts], answer=[answers[r.input_index] for r in rollouts],
                               truncated=[r.cut_off for r in rollouts])
    return {"setting": setting, "quantiles": torch.quantile(ratios, torch.tensor(QUANTILES)).tolist(),
            "outside_band": float(((ratios < low) | (ratios > high)).float().mean()),
            "gap": -statistics.fmean(gaps), "reward": statistics.fmean(rewards),
            "cut_off": statistics.fmean(r.cut_off for r in rollouts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="policy[:budget[:window]]")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--samples", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    setup_cpu_math()
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = load_model(EMBEDDED_MODEL).eval()
    task = make_arithmetic_task("train", options.prompts)
    prompt_ids = tokenize_prompts(tokenizer, task["prompt"])
    params = SamplingParams(max_new_tokens=options.new_tokens, temperature=0.7, seed=options.seed)
    band = GRPOConfig().importance_sampling_sequence_band
    print(f"{options.prompts} prompts x {options.samples} rollouts, {options.new_tokens} new tokens, T=0.7; "
          f"ratio = learner/sampler per-token geometric mean; default band {band}")
    print("| setting | ratio " + " / ".join(f"q{int(q * 100)}" for q in QUANTILES)
          + " | outside band | gap (nats/token) | reward | cut off |")
    print("| --- | --- | --- | --- | --- | --- |")
    for setting in options.settings:
        row = measure(model, tokenizer, prompt_ids, list(task["answer"]), setting, params, options.samples)
        print(f"| {setting} | {' / '.join(f'{q:.2f}' for q in row['quantiles'])} | {row['outside_band']:.0%} | "
              f"{row['gap']:.3f} | {row['reward']:.3f} | {row['cut_off']:.0%} |")


if __name__ == "__main__":
    main()
