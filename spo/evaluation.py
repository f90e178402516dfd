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
from rewards.text import extract_final_number, last_boxed

from .config import ConfigError
from .data import check_limit, guess_preset, load_problems, tokenize_prompts
from .models import (EMBEDDED_MODEL, check_adapter_source, check_device, check_model_source, load_adapter, load_model,
                     load_tokenizer, model_context)

logger = logging.getLogger(__name__)

DEFAULT_REWARD = {"gsm8k": "gsm8k_accuracy", "math": "math_accuracy", "arithmetic": "arithmetic_accuracy"}


def _help(text: str) -> dict:
    return {"help": text}


DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class EvalConfig:
    model: str = field(default=EMBEDDED_MODEL, metadata=_help(
        "model: a hub name, a local folder, or the embedded smollm2-135m-instruct"))
    adapter: str | None = field(default=None, metadata=_help("PEFT adapter folder (LoRA or MoS) to load on the model"))
    merge_adapter: bool = field(default=True, metadata=_help(
        "merge the adapter into the model's weights before decoding (faster; false: run it unmerged)"))
    dataset: str = field(default="builtin:arithmetic", metadata=_help(
        "a .jsonl/.json/.parquet file, a folder of {split}.jsonl, a hub name, builtin:arithmetic or builtin:ledger"))
    split: str = field(default="test", metadata=_help("split to evaluate (train or test on the built-in task)"))
    limit: int | None = field(default=64, metadata=_help(
        "evaluate the first N problems; null: all of them (the built-in task: 1000)"))
    difficulty: int | None = field(default=None, metadata=_help(
        "built-in tasks only: difficulty 1..6; null: the task's default"))
    question_field: str | None = field(default=None, metadata=_help(
        "field holding the question; null: the preset's (question, or problem for MATH)"))
    answer_field: str | None = field(default=None, metadata=_help(
        "field holding the reference answer; null: the preset's (answer)"))
    reward: str | None = field(default=None, metadata=_help(
        "accuracy reward: a registered name or module:function; null: the data set's own"))
    num_samples: int = field(default=1, metadata=_help("completions per problem (the k of pass@k and majority@k)"))
    temperature: float = field(default=0.0, metadata=_help("sampling temperature; 0: greedy"))
    top_p: float = field(default=1.0, metadata=_help("nucleus sampling: the smallest set of tokens with this probability"))
    top_k: int = field(default=0, metadata=_help("sample among the k most likely tokens; 0: no limit"))
    max_new_tokens: int = field(default=256, metadata=_help("longest completion in tokens"))
    batch_size: int = field(default=64, metadata=_help("completions decoded at once"))
    seed: int = field(default=0, metadata=_help("random seed of sampling and of the built-in task"))
    dtype: str = field(default="auto", metadata=_help(
        "model dtype: auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16"))
    device: str | None = field(default=None, metadata=_help("cpu, cuda, cuda:N or mps; null: the CPU"))
    output: str | None = field(default=None, metadata=_help(
        "JSONL file of every completion; null: eval_<dataset>_<split>.jsonl in the working folder"))

    def __post_init__(self):
        check_limit(self.limit)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16, got {self.dtype!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ValueError("num_samples > 1 needs a temperature > 0 (greedy samples are all the same)")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size and max_new_tokens must be positive, got {self.batch_size} and "
                             f"{self.max_new_tokens}")


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
             output_path: str | os.PathLike | None = None, progress: bool | None = True, generator=None) -> EvalResult:
    """Generate ``num_samples`` completions per problem of ``dataset`` (columns ``prompt`` + reward columns) and
    score them with ``reward_funcs`` (the first one is the accuracy). ``generator``: an existing
    ``spo.rollout.Generator`` to reuse. ``progress``: a bar on stderr; None: only when stderr is a terminal."""
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
    all_prompt_ids = tokenize_prompts(tokenizer, dataset["prompt"], where="eval data set")
    warn_beyond_context(model, all_prompt_ids, max_new_tokens)
    sink = open(output_path, "w") if output_path else None
    bar = tqdm(total=len(dataset), desc="evaluating", unit="problem", disable=None if progress is None else not progress)
    try:
        for begin in range(0, len(dataset), prompts_per_batch):
            rows = dataset.select(range(begin, min(begin + prompts_per_batch, len(dataset))))
            prompt_ids = all_prompt_ids[begin:begin + len(rows)]
            batch = generator.generate(prompt_ids, params, num_return_sequences=num_samples)
            order = sorted(range(len(batch.rollouts)), key=lambda i: batch.rollouts[i].input_index)
            rollouts = [batch.rollouts[i] for i in order]
            texts = [r.text for r in rollouts]
            indices = [r.input_index for r in rollouts]
            scores = compute_rewards(
                funcs, prompts=[rows["prompt"][i] for i in indices], completions=texts,
                completion_ids=[r.completion_ids for r in rollouts],
                columns={c: [rows[c][i] for i in indices] for c in columns}, on_error="raise",
                truncated=[r.cut_off for r in rollouts],
            )
            accuracy = torch.nan_to_num(scores.per_function[:, 0], nan=0.0).tolist()
            for p in range(len(rows)):
                mine = [j for j, i in enumerate(indices) if i == p]
                per_problem.append([accuracy[j] for j in mine])
                majority.append(majority_correct([texts[j] for j in mine], [accuracy[j] for j in mine]))
            tokens += sum(len(r.completion_ids) for r in rollouts)
            if sink:
                for j, r in enumerate(rollouts):
                    record = {"problem": begin + r.input_index, "prompt": rows["prompt"][r.input_index],
                              **{c: rows[c][r.input_index] for c in columns}, "completion": texts[j],
                              "finish_reason": r.finish_reason, "num_tokens": len(r.completion_ids),
                              "rewards": dict(zip(scores.names, scores.per_function[j].tolist())),
                              "accuracy": accuracy[j]}
                    sink.write(json.dumps(record) + "\n")
            bar.update(len(rows))
            bar.set_postfix(acc=f"{sum(map(sum, per_problem)) / max(1, sum(map(len, per_problem))):.3f}")
    except BaseException:
        bar.leave = False  # an error or Ctrl-C: clear the bar, so the message that follows stands alone
        raise
    finally:
        bar.close()
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


def warn_beyond_context(model, prompt_ids: list[list[int]], max_new_tokens: int) -> int:
    """Warn (once per call) when prompts plus ``max_new_tokens`` exceed the model's context window; how many do."""
    context = model_context(model.config)
    if context is None:
        return 0
    over = [row for row, ids in enumerate(prompt_ids) if len(ids) + max_new_tokens > context]
    if over:
        longest = max(over, key=lambda row: len(prompt_ids[row]))
        logger.warning("%d of %d prompts plus max_new_tokens=%d exceed the model's context (max_position_embeddings="
                       "%d; the longest, row %d, has %d tokens): past it the model's completions may be degraded",
                       len(over), len(prompt_ids), max_new_tokens, context, longest, len(prompt_ids[longest]))
    return len(over)


def resolve_reward(name: str, where: str | None = None):
    """The reward function ``name`` (a registered name or ``module:function``), or a ConfigError naming it (and the
    config key ``where``, such as ``reward_funcs[1]``)."""
    try:
        return get_reward(name)
    except (ValueError, TypeError) as error:  # unknown name, import failure, not callable
        raise ConfigError(f"{where}: {error}" if where else str(error)) from error


def default_output(config: EvalConfig) -> Path:
    return Path(config.output or f"eval_{Path(config.dataset.replace(':', '_')).stem}_{config.split}.jsonl")


def check_output_file(output: Path, where: str = "output") -> None:
    """Fail before any work when the results file cannot be written: a directory, or a folder that cannot be made or
    written to. Leaves nothing behind."""
    if output.is_dir():
        raise ConfigError(f"{where} {output} is a directory: give a file, such as {output / 'eval.jsonl'}")
    blocking = next((p for p in output.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"{where} {output} cannot be written: {blocking} is a file, not a folder")
    existed = output.exists()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with open(output, "a"):
            pass
        if not existed:
            output.unlink()
    except OSError as error:
        detail = error.strerror or str(error)
        if error.filename and str(error.filename) != str(output):
            detail += f": {error.filename}"
        raise ConfigError(f"{where} {output} cannot be written: {detail}") from error


def prepare_eval(config: EvalConfig):
    """What ``spo eval`` checks before loading the model: the device, the output file, the adapter, the model's name,
    the reward and the data set. Returns (data set, reward name, output path)."""
    check_device(config.device)
    output = default_output(config)
    check_output_file(output)
    if config.adapter:
        check_adapter_source(config.adapter)
    check_model_source(config.model)
    reward = config.reward or DEFAULT_REWARD.get(guess_preset(config.dataset) or "", "numeric_accuracy")
    resolve_reward(reward)
    dataset = load_problems(config.dataset, config.split, limit=config.limit, seed=config.seed,
                            difficulty=config.difficulty, question_field=config.question_field,
                            answer_field=config.answer_field)
    return dataset, reward, output


def run_eval(config: EvalConfig, progress: bool = True) -> EvalResult:
    """Everything ``spo eval`` does: check the inputs and load the data, reward, model (and adapter); evaluate;
    write the JSONL."""
    dataset, reward, output = prepare_eval(config)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=config.dtype, device=config.device)
    if config.adapter:
        model = load_adapter(model, config.adapter, config.model)
        if config.merge_adapter:  # decoding then pays no adapter matmuls (nor, for MoS, the shard gather)
            model = model.merge_and_unload()
    model.eval()
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

