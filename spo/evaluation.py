"""Evaluation: sample k completions per problem, score them, report mean accuracy, pass@k and majority@k."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rewards import compute_rewards, get_reward
from rewards.text import completion_text, extract_final_number, last_boxed

from .data import guess_preset, load_problems, tokenize_prompts
from .models import EMBEDDED_MODEL, load_model, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_REWARD = {"gsm8k": "gsm8k_accuracy", "math": "math_accuracy", "arithmetic": "arithmetic_accuracy"}


@dataclass
class EvalConfig:
    model: str = EMBEDDED_MODEL
    adapter: str | None = None
    dataset: str = "builtin:arithmetic"
    split: str = "test"
    limit: int | None = 64
    difficulty: int | None = None  # built-in task only
    question_field: str | None = None
    answer_field: str | None = None
    reward: str | None = None  # default: the data set's accuracy reward
    num_samples: int = 1
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    batch_size: int = 64
    seed: int = 0
    dtype: str = "auto"
    device: str | None = None
    output: str | None = None  # JSONL of every completion; default: eval_<dataset>.jsonl in the working dir

    def __post_init__(self):
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("num_samples > 1 needs a temperature > 0 (greedy samples are all the same)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be positive")


@dataclass
class EvalResult:
    num_problems: int
    num_samples: int
    mean_accuracy: float
    pass_at_k: float
    majority_at_k: float
    seconds: float
    tokens_generated: int
    per_problem: list[list[float]] = field(repr=False, default_factory=list)

    def summary(self) -> dict:
        k = self.num_samples
        return {"problems": self.num_problems, "samples_per_problem": k, "mean_accuracy": self.mean_accuracy,
                f"pass@{k}": self.pass_at_k, f"majority@{k}": self.majority_at_k,
                "tokens_generated": self.tokens_generated, "seconds": round(self.seconds, 1)}


def answer_key(text: str) -> str | None:
    """What a completion answers, for majority voting: its final number, else its last ``\\boxed{}``."""
    number = extract_final_number(text)
    if number is not None:
        return str(number.normalize())
    boxed = last_boxed(text)
    return boxed.strip() if boxed else None


def majority_correct(texts: list[str], scores: list[float]) -> float:
    """Score of the most frequent answer among ``texts`` (ties: the earliest); 0 when none has an answer."""
    keys = [answer_key(t) for t in texts]
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    best = max(votes.values())
    winner = next(k for k in keys if k is not None and votes[k] == best)
    return scores[keys.index(winner)]


def evaluate(model, tokenizer, dataset, reward_funcs, *, num_samples: int = 1, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256, batch_size: int = 64, seed: int = 0,
             output_path: str | os.PathLike | None = None, progress: bool = True, generator=None) -> EvalResult:
    """Generate ``num_samples`` completions per problem of ``dataset`` (columns ``prompt`` + reward columns) and
    score them with ``reward_funcs`` (the first one is the accuracy). ``generator``: an existing
    ``spo.rollout.Generator`` to reuse."""
    from .rollout import Generator, SamplingParams

    generator = generator or Generator(model, tokenizer)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature if temperature > 0 else 1.0,
                            top_p=top_p, top_k=top_k, greedy=temperature == 0, seed=seed)
    funcs = [get_reward(f) for f in reward_funcs]
    columns = [c for c in dataset.column_names if c != "prompt"]
    prompts_per_batch = max(1, batch_size // num_samples)
    per_problem: list[list[float]] = []
    majority: list[float] = []
    tokens = 0
    start = time.perf_counter()
    sink = open(output_path, "w") if output_path else None
    try:
        bar = tqdm(total=len(dataset), desc="evaluating", unit="problem", disable=not progress)
        for begin in range(0, len(dataset), prompts_per_batch):
            rows = dataset.select(range(begin, min(begin + prompts_per_batch, len(dataset))))
            prompt_ids = tokenize_prompts(tokenizer, rows["prompt"], first_row=begin, where="eval data set")
            batch = generator.generate(prompt_ids, params, num_return_sequences=num_samples)
            order = sorted(range(len(batch.rollouts)), key=lambda i: batch.rollouts[i].prompt_index)
            rollouts = [batch.rollouts[i] for i in order]
            texts = [r.text for r in rollouts]
            indices = [r.prompt_index for r in rollouts]
            scores = compute_rewards(
                funcs, prompts=[rows["prompt"][i] for i in indices], completions=texts,
                completion_ids=[r.completion_ids for r in rollouts],
                columns={c: [rows[c][i] for i in indices] for c in columns}, on_error="raise",
            )
            accuracy = torch.nan_to_num(scores.per_function[:, 0], nan=0.0).tolist()
            for p in range(len(rows)):
                mine = [j for j, i in enumerate(indices) if i == p]
                per_problem.append([accuracy[j] for j in mine])
                majority.append(majority_correct([texts[j] for j in mine], [accuracy[j] for j in mine]))
            tokens += sum(len(r.completion_ids) for r in rollouts)
            if sink:
                for j, r in enumerate(rollouts):
                    record = {"problem": begin + r.prompt_index, "prompt": rows["prompt"][r.prompt_index],
                              **{c: rows[c][r.prompt_index] for c in columns}, "completion": texts[j],
                              "finish_reason": r.finish_reason, "num_tokens": len(r.completion_ids),
                              "rewards": dict(zip(scores.names, scores.per_function[j].tolist())),
                              "accuracy": accuracy[j]}
                    sink.write(json.dumps(record) + "\n")
            bar.update(len(rows))
            bar.set_postfix(acc=f"{sum(map(sum, per_problem)) / max(1, sum(map(len, per_problem))):.3f}")
        bar.close()
    finally:
        if sink:
            sink.close()
    n = len(per_problem)
    flat = [x for xs in per_problem for x in xs]
    return EvalResult(
        num_problems=n, num_samples=num_samples,
        mean_accuracy=sum(flat) / max(1, len(flat)),
        pass_at_k=sum(float(max(xs) > 0.5) for xs in per_problem) / max(1, n),
        majority_at_k=sum(majority) / max(1, n),
        seconds=time.perf_counter() - start, tokens_generated=tokens, per_problem=per_problem,
    )


def run_eval(config: EvalConfig, progress: bool = True) -> EvalResult:
    """Everything ``spo eval`` does: load model (and adapter), data, reward; evaluate; write the JSONL."""
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    if config.adapter:
        import lora_shards  # noqa: F401  (registers the MoS adapter type with PEFT)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, config.adapter)
    model.eval()
    dataset = load_problems(config.dataset, config.split, limit=config.limit, seed=config.seed,
                            difficulty=config.difficulty, question_field=config.question_field,
                            answer_field=config.answer_field)
    preset = guess_preset(config.dataset)
    reward = config.reward or DEFAULT_REWARD.get(preset or "", "numeric_accuracy")
    output = config.output or f"eval_{Path(config.dataset.replace(':', '_')).stem}_{config.split}.jsonl"
    result = evaluate(model, tokenizer, dataset, [reward], num_samples=config.num_samples,
                      temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                      max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, seed=config.seed,
                      output_path=output, progress=progress)
    logger.info("completions written to %s", output)
    return result


def format_summary(result: EvalResult) -> str:
    k = result.num_samples
    lines = [f"problems          {result.num_problems}",
             f"samples/problem   {k}",
             f"mean accuracy     {result.mean_accuracy:.4f}",
             f"pass@{k:<13}{result.pass_at_k:.4f}",
             f"majority@{k:<9}{result.majority_at_k:.4f}",
             f"tokens generated  {result.tokens_generated}  ({result.tokens_generated / max(result.seconds, 1e-9):.1f}/s)",
             f"time              {result.seconds:.1f}s"]
    return "\n".join(lines)

