"""Mixture-of-Shards versus LoRA: supervised fine-tuning of the embedded SmolLM2-135M-Instruct on the built-in
arithmetic word problems, same seed, same data, same optimizer, all seven projections adapted.

Variants: LoRA rank 8; MoS at 1/8 of LoRA's trainable parameters (R=1); MoS at LoRA's parameter count (R=8).
Reported per variant: trainable parameters, final training loss (mean of the last 10 steps), held-out loss,
held-out accuracy (greedy answers scored by ``rewards.accuracy.numeric_accuracy``), step time, and the size of
the saved adapter file. The base model's held-out figures are the reference row.

    python benchmarks/mos.py                         # the default run, about 10 minutes on 2 CPU cores
    python benchmarks/mos.py --steps 20 --eval 16    # a quick look

The task comes from ``spo.data.arithmetic_problems`` (questions with numeric answers, train and test disjoint);
the prompt asks for the answer sentence directly and the training target is that sentence, ``The answer is <n>.``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from peft import LoraConfig, get_peft_model  # noqa: E402

from lora_shards import MoSConfig  # noqa: E402
from rewards.accuracy import numeric_accuracy  # noqa: E402
from spo.data import arithmetic_problems, to_messages  # noqa: E402
from spo.models import EMBEDDED_MODEL, load_model, load_tokenizer  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IGNORE = -100


SYSTEM_PROMPT = "Be brief."  # replaces the template's default system prompt: shorter sequences, faster steps
INSTRUCTION = "Reply with: The answer is <number>."


@dataclass
class Example:
    prompt_ids: list[int]
    target_ids: list[int]
    answer: str


def build_examples(tokenizer, problems: list[dict]) -> list[Example]:
    """Chat prompt asking for the answer sentence, and that sentence plus end of turn as the target."""
    examples = []
    for problem in problems:
        text = tokenizer.apply_chat_template(to_messages(problem["question"], INSTRUCTION, SYSTEM_PROMPT),
                                             add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(f"The answer is {problem['answer']}.", add_special_tokens=False)["input_ids"]
        examples.append(Example(prompt_ids, target_ids + [tokenizer.eos_token_id], problem["answer"]))
    return examples


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    return ids, mask


def target_loss(model, examples: list[Example], pad_id: int) -> torch.Tensor:
    """Mean cross-entropy of the target tokens. Sequences are left-padded so that all targets sit in the last
    ``k`` positions, and only those ``k`` positions go through the 49k-word output layer."""
    ids, mask = left_pad([e.prompt_ids + e.target_ids for e in examples], pad_id)
    keep = max(len(e.target_ids) for e in examples) + 1  # + the last prompt position, which predicts the first
    labels = torch.full((len(examples), keep), IGNORE)
    for row, e in enumerate(examples):
        labels[row, keep - len(e.target_ids):] = torch.tensor(e.target_ids)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int) -> tuple[float, float]:
    """Held-out (loss on the target tokens, accuracy of greedy answers)."""
    model.eval()
    losses, correct = [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        losses.append(target_loss(model, batch, tokenizer.pad_token_id).item())
        ids, mask = left_pad([e.prompt_ids for e in batch], tokenizer.pad_token_id)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        completions = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        correct += numeric_accuracy(completions=completions, answer=[e.answer for e in batch])
    return statistics.fmean(losses), statistics.fmean(correct)


def adapter_configs(args) -> dict[str, object]:
    common = dict(target_modules=PROJECTIONS, lora_alpha=args.alpha, lora_dropout=0.0)
    return {
        f"LoRA r={args.lora_rank}": LoraConfig(r=args.lora_rank, **common),
        f"MoS R={args.lora_rank // 8} r={args.mos_rank} (1/8 params)": MoSConfig(
            r=args.mos_rank, equivalent_rank=args.lora_rank // 8, shards_per_vector=args.shards, private_rank=0,
            seed=args.seed, **common),
        f"MoS R={args.lora_rank} r={args.mos_equal_rank} (equal params)": MoSConfig(
            r=args.mos_equal_rank, equivalent_rank=args.lora_rank, shards_per_vector=args.shards,
            private_rank=args.private_rank, seed=args.seed, **common),
    }


def train_variant(name, peft_config, tokenizer, train, held_out, args) -> dict:
    torch.manual_seed(args.seed)
    model = get_peft_model(load_model(EMBEDDED_MODEL), peft_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    order = random.Random(args.seed)
    losses, step_times = [], []
    model.train()
    for step in range(args.steps):
        batch = order.sample(train, args.batch_size)
        start = time.perf_counter()
        loss = target_loss(model, batch, tokenizer.pad_token_id)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0:
            print(f"  [{name}] step {step + 1}/{args.steps} loss {statistics.fmean(losses[-args.log_every:]):.4f}",
                  flush=True)
    held_out_loss, accuracy = evaluate(model, tokenizer, held_out, args.eval_batch_size, args.max_new_tokens)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        file_bytes = os.path.getsize(os.path.join(folder, "adapter_model.safetensors"))
    return {"variant": name, "trainable": trainable, "final_loss": statistics.fmean(losses[-10:]),
            "held_out_loss": held_out_loss, "accuracy": accuracy,
            "step_s": statistics.fmean(step_times[min(3, len(step_times) - 1):]), "file_bytes": file_bytes}


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | trainable params | final train loss | held-out loss | held-out accuracy | step time (s) "
             "| adapter file |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        def fmt(key, spec):
            return "-" if row.get(key) is None else format(row[key], spec)
        size = "-" if row.get("file_bytes") is None else f"{row['file_bytes'] / 1024:,.0f} KiB"
        lines.append(f"| {row['variant']} | {fmt('trainable', ',d')} | {fmt('final_loss', '.4f')} | "
                     f"{fmt('held_out_loss', '.4f')} | {fmt('accuracy', '.3f')} | {fmt('step_s', '.3f')} | {size} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per variant")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=16.0, help="lora_alpha of every variant")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank; MoS budgets are R=rank/8 and R=rank")
    parser.add_argument("--mos-rank", type=int, default=8, help="active rank r of MoS at 1/8 of the parameters")
    parser.add_argument("--mos-equal-rank", type=int, default=16, help="active rank r of MoS at equal parameters")
    parser.add_argument("--shards", type=int, default=2, help="shards per vector l")
    parser.add_argument("--private-rank", type=int, default=1, help="private rank p of MoS at equal parameters")
    parser.add_argument("--difficulty", type=int, default=1, help="difficulty of the arithmetic task (1-6)")
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--eval", type=int, default=96, help="held-out problems")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--skip-base", action="store_true", help="do not evaluate the base model")
    parser.add_argument("--only", help="train only the variants whose name contains this text (e.g. MoS)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.lora_rank % 8:
        parser.error("--lora-rank must be a multiple of 8 (MoS at 1/8 of its parameters has R = rank / 8)")

    torch.set_flush_denormal(True)
    tokenizer = load_tokenizer(EMBEDDED_MODEL, padding_side="left")
    train = build_examples(tokenizer, arithmetic_problems("train", args.train, args.difficulty, args.seed))
    held_out = build_examples(tokenizer, arithmetic_problems("test", args.eval, args.difficulty, args.seed))
    print(f"{len(train)} training / {len(held_out)} held-out problems, difficulty {args.difficulty}, "
          f"{args.steps} steps of {args.batch_size}, torch threads {torch.get_num_threads()}", flush=True)

    rows = []
    if not args.skip_base:
        base_loss, base_accuracy = evaluate(load_model(EMBEDDED_MODEL), tokenizer, held_out, args.eval_batch_size,
                                            args.max_new_tokens)
        rows.append({"variant": "base model (no training)", "held_out_loss": base_loss, "accuracy": base_accuracy})
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    for name, config in adapter_configs(args).items():
        if args.only and args.only not in name:
            continue
        print(f"training {name}", flush=True)
        rows.append(train_variant(name, config, tokenizer, train, held_out, args))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
