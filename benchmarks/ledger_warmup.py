"""A supervised warm-up on the ledger task's worked solutions, for RL on long answers (issue #14 item 4).

The untrained embedded SmolLM2-135M-Instruct scores 0-2% greedy on ``builtin:ledger``, far below the 5-30% window
in which RL on a long answer has something to work with (``benchmarks/RESULTS.md``). This script fine-tunes all of
its weights (transformers' ``Trainer``) on the worked ``solution`` of train problems drawn with their own seed (the
split is a hash of a problem's text, so no test problem is among them), saves the model after each of ``--save-at``
steps (a safetensors folder that ``from_pretrained``, a recipe's ``model:`` and ``learning.py --model`` load), and
measures each saved model on the test split: greedy accuracy on ``--eval-limit`` problems, and mean accuracy and
pass@8 at T = 0.7 on the first ``--pass-limit`` of them. Step 0 is the untrained model. Choose the step whose model
lands in the window: with the defaults that was step 16 (23% greedy, 69% pass@8; ``benchmarks/RESULTS.md``).

    python benchmarks/ledger_warmup.py --save-at 8 16 32 --out outputs/ledger_warmup

Measured models are kept in OUT/results.json and not measured again; the fine-tuning reruns (a few minutes) when a
saved model is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning import TASKS, write_json  # noqa: E402  (benchmarks/ is not a package)

# measured as the ledger rows of learning.py run: their longest sampled completion and held-out evaluation limit
SAMPLED_TOKENS = TASKS["ledger"]["train"]["max_completion_length"]
GREEDY_TOKENS = TASKS["ledger"]["train"]["eval_max_new_tokens"]
SAMPLES = 8  # pass@8, as the calibration window asks


def warmup_examples(tokenizer, n: int, difficulty: int, seed: int) -> list[dict]:
    """``n`` train problems as supervised examples: the chat prompt (no loss on it), then the worked solution and
    the end-of-turn token."""
    from spo.data import make_ledger_task, tokenize_prompt

    examples = []
    for row in make_ledger_task("train", n, difficulty, seed):
        prompt = tokenize_prompt(tokenizer, row["prompt"])
        answer = tokenizer(row["solution"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        examples.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                         "labels": [-100] * len(prompt) + answer})
    return examples


def save_model(model, tokenizer, folder: Path) -> None:
    """Save a model folder atomically: a kill leaves a complete folder (the new one, or the one it replaces) or
    none."""
    staging = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(folder, ignore_errors=True)  # a rename cannot replace a folder that has files
    staging.replace(folder)


def fine_tune(out: Path, save_at: list[int], *, problems: int, difficulty: int, seed: int, learning_rate: float,
              batch_size: int, base: str | None = None) -> None:
    """Fine-tune ``base`` (default: the embedded model) on worked solutions and save it as OUT/step<N> after each
    step N of ``save_at``."""
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from spo.models import EMBEDDED_MODEL, load_model, load_tokenizer

    tokenizer = load_tokenizer(base or EMBEDDED_MODEL, padding_side="right")
    model = load_model(base or EMBEDDED_MODEL, dtype="float32")
    wanted = set(save_at)

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in wanted:
                save_model(model, tokenizer, out / f"step{state.global_step}")

    arguments = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=max(save_at), per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="constant", logging_steps=4, save_strategy="no",
        report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0)
    trainer = Trainer(model=model, args=arguments, train_dataset=warmup_examples(tokenizer, problems, difficulty, seed),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      processing_class=tokenizer, callbacks=[SaveAt()])
    trainer.train()


def measure(model_path: str, *, eval_limit: int, pass_limit: int, difficulty: int) -> dict:
    """Greedy accuracy and pass@8 at T = 0.7 of one model on the ledger's test split (bf16, as the
    trainer's rollouts)."""
    from spo.data import load_problems
    from spo.evaluation import evaluate
    from spo.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, dtype="bfloat16").eval()
    problems = load_problems("builtin:ledger", "test", limit=eval_limit, difficulty=difficulty)
    greedy = evaluate(model, tokenizer, problems, ["numeric_accuracy"], max_new_tokens=GREEDY_TOKENS, progress=None)
    sampled = evaluate(model, tokenizer, problems.select(range(min(pass_limit, len(problems)))),
                       ["numeric_accuracy"], num_samples=SAMPLES, temperature=0.7, max_new_tokens=SAMPLED_TOKENS,
                       progress=None)
    return {"greedy": greedy.mean_accuracy, "greedy_problems": greedy.num_problems,
            "greedy_tokens_per_completion": greedy.tokens_generated / max(1, greedy.num_problems),
            "sampled_mean": sampled.mean_accuracy, "pass": sampled.pass_at_k,
            "sampled_problems": sampled.num_problems}


def table(results: dict) -> str:
    lines = [f"| warm-up steps | greedy accuracy | tokens per greedy answer | mean accuracy @ T=0.7 | pass@{SAMPLES} |",
             "| --- | --- | --- | --- | --- |"]
    for step, r in sorted(results.items(), key=lambda item: int(item[0])):
        lines.append(f"| {step} | {r['greedy']:.3f} ({round(r['greedy'] * r['greedy_problems'])}/"
                     f"{r['greedy_problems']}) | {r['greedy_tokens_per_completion']:.0f} | {r['sampled_mean']:.3f} | "
                     f"{r['pass']:.3f} ({r['sampled_problems']} problems) |")
    return "\n".join(lines)


def main() -> None:
    from spo.data import LEDGER_DEFAULT_DIFFICULTY

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--save-at", nargs="+", type=int, default=[8, 16, 32],
                        help="optimizer steps after which the model is saved and measured (0: the untrained model)")
    parser.add_argument("--out", default="outputs/ledger_warmup")
    parser.add_argument("--difficulty", type=int, default=LEDGER_DEFAULT_DIFFICULTY,
                        help=f"the ledger's difficulty (default {LEDGER_DEFAULT_DIFFICULTY})")
    parser.add_argument("--problems", type=int, default=2000, help="train problems to fine-tune on")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the warm-up's problems and data order")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-limit", type=int, default=64, help="test problems for greedy accuracy")
    parser.add_argument("--pass-limit", type=int, default=32, help=f"of those, the problems sampled {SAMPLES} times")
    options = parser.parse_args()
    if min(options.save_at) < 0:
        parser.error(f"--save-at takes step counts of 0 or more, got {options.save_at}")
    from spo.models import EMBEDDED_MODEL

    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    setting = {key: getattr(options, key) for key in ("difficulty", "problems", "seed", "learning_rate",
                                                       "batch_size", "eval_limit", "pass_limit")}
    data = json.loads(saved.read_text()) if saved.is_file() else {"setting": setting, "steps": {}}
    if data["setting"] != setting:
        raise SystemExit(f"{saved} holds measurements for {data['setting']}, not {setting}: choose another --out")
    trained = [step for step in options.save_at if step > 0]
    if any(not (out / f"step{step}").is_dir() for step in trained):
        fine_tune(out, trained, problems=options.problems, difficulty=options.difficulty, seed=options.seed,
                  learning_rate=options.learning_rate, batch_size=options.batch_size)
    for step in sorted(set(options.save_at)):
        if str(step) in data["steps"]:
            continue
        model_path = str(out / f"step{step}") if step else EMBEDDED_MODEL
        data["steps"][str(step)] = measure(model_path, eval_limit=options.eval_limit, pass_limit=options.pass_limit,
                                           difficulty=options.difficulty)
        write_json(saved, data)
        print(f"step {step}: {json.dumps(data['steps'][str(step)])}", flush=True)
    print(table(data["steps"]))


if __name__ == "__main__":
    main()
