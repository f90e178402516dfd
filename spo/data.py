"""Problems for training and evaluation: local files, hub data sets and built-in procedurally generated tasks,
turned into chat prompts.

Every loader returns a ``datasets.Dataset`` with at least the columns ``prompt`` (a list of chat messages, the
conversational format TRL uses) and ``answer`` (the reference answer as a string); other columns are kept so
reward functions can read them.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

ANSWER_INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as: #### <number>"
ARITHMETIC_INSTRUCTION = "Think step by step, then write the final answer as: The answer is <number>."
MATH_INSTRUCTION = "Solve the problem step by step. Put the final answer in \\boxed{}."


@dataclass(frozen=True)
class FieldMap:
    """How a source data set names its question and answer, and how to clean the answer."""

    question: str
    answer: str
    answer_after: str | None = None  # keep only the text after this marker (GSM8K's "####")
    instruction: str = ANSWER_INSTRUCTION


PRESETS: dict[str, FieldMap] = {
    "gsm8k": FieldMap("question", "answer", answer_after="####"),
    "math": FieldMap("problem", "answer", instruction=MATH_INSTRUCTION),
    "arithmetic": FieldMap("question", "answer", instruction=ARITHMETIC_INSTRUCTION),
}

BUILTIN_PREFIX = "builtin:"


def guess_preset(source: str) -> str | None:
    """The preset a source's name points at (``openai/gsm8k``, ``.../math500/...``), else None."""
    name = str(source).lower()
    if name.startswith(BUILTIN_PREFIX):
        return "arithmetic"
    if "gsm8k" in name:
        return "gsm8k"
    if "math" in name:
        return "math"
    return None


def to_messages(question: str, instruction: str | None = ANSWER_INSTRUCTION, system: str | None = None) -> list[dict]:
    """A chat prompt: optional system message, then the question followed by the answer-format instruction."""
    content = question.strip() if not instruction else f"{question.strip()}\n\n{instruction}"
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": content})
    return messages


def extract_reference(answer: Any, answer_after: str | None) -> str:
    text = str(answer)
    if answer_after and answer_after in text:
        text = text.rsplit(answer_after, 1)[1]
    return text.strip()


def _load_raw(source: str, split: str, config_name: str | None) -> Dataset:
    from datasets import load_dataset

    path = Path(source)
    if path.is_dir():
        candidates = [p for ext in ("jsonl", "json", "parquet") for p in sorted(path.glob(f"{split}*.{ext}"))]
        if not candidates:
            raise FileNotFoundError(f"no {split}.jsonl / {split}.parquet in data folder {path}")
        path = candidates[0]
    if path.is_file():
        suffix = path.suffix.lower()
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
        if kind is None:
            raise ValueError(f"unsupported data file {path}: use .jsonl, .json or .parquet")
        return load_dataset(kind, data_files=str(path), split="train")
    if os.path.sep in source and not source.count("/") == 1:
        raise FileNotFoundError(f"data path {source} does not exist")
    if config_name is None and guess_preset(source) == "gsm8k":
        config_name = "main"
    return load_dataset(source, config_name, split=split)


def load_problems(
    source: str,
    split: str = "train",
    *,
    preset: str | None = None,
    question_field: str | None = None,
    answer_field: str | None = None,
    instruction: str | None = None,
    system_prompt: str | None = None,
    config_name: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    difficulty: int | None = None,
) -> Dataset:
    """Load problems as chat prompts with a reference answer.

    ``source`` is a local JSONL/JSON/Parquet file, a folder holding ``{split}.jsonl``, a hub name
    (``openai/gsm8k``), or a built-in task (``builtin:arithmetic``). Field names come from a preset
    (``gsm8k``, ``math``; guessed from the source's name) and can be overridden one by one.
    """
    if str(source).startswith(BUILTIN_PREFIX):
        task = str(source)[len(BUILTIN_PREFIX):]
        if task != "arithmetic":
            raise ValueError(f"unknown built-in task {task!r}; available: builtin:arithmetic")
        return make_arithmetic_task(split, n=limit or 1000, difficulty=difficulty or DEFAULT_DIFFICULTY, seed=seed,
                                    instruction=instruction, system_prompt=system_prompt)

    preset_name = preset or guess_preset(source)
    if preset_name is not None and preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; available: {', '.join(PRESETS)}")
    fields = PRESETS.get(preset_name, FieldMap("question", "answer"))
    q_field = question_field or fields.question
    a_field = answer_field or fields.answer
    instruction = fields.instruction if instruction is None else instruction

    raw = _load_raw(str(source), split, config_name)
    for field in (q_field, a_field):
        if field not in raw.column_names:
            raise KeyError(f"data set {source} ({split}) has no field {field!r}; its fields are {raw.column_names}. "
                           "Set question_field / answer_field.")
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))

    def convert(row: dict, index: int) -> dict:
        question, answer = row[q_field], row[a_field]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{source} row {index}: field {q_field!r} is empty or not text")
        if answer is None or not str(answer).strip():
            raise ValueError(f"{source} row {index}: field {a_field!r} is empty")
        return {"prompt": to_messages(question, instruction, system_prompt),
                "answer": extract_reference(answer, fields.answer_after if a_field == fields.answer else None)}

    return raw.map(convert, with_indices=True, desc="formatting prompts")


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of chat prompts (lists of messages) through the tokenizer's chat template, with the generation
    prompt appended; plain strings are tokenized as they are. Prompts longer than ``max_prompt_length`` raise."""
    ids = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            if tokenizer.chat_template is None:
                raise ValueError("the tokenizer has no chat template: give plain-text prompts, or set "
                                 "tokenizer.chat_template")
            tokens = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
        if not tokens:
            raise ValueError(f"prompt {i} is empty")
        if max_prompt_length is not None and len(tokens) > max_prompt_length:
            raise ValueError(f"prompt {i} has {len(tokens)} tokens, more than max_prompt_length={max_prompt_length}")
        ids.append(list(tokens))
    return ids


# --- The built-in arithmetic word-problem task ---------------------------------------------------------------

# Chosen so the embedded SmolLM2-135M-Instruct is neither hopeless nor saturated (see README for the figures).
DEFAULT_DIFFICULTY = 1
_NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kate", "Leo", "Mia",
          "Noah", "Olive", "Paul", "Rosa", "Sam", "Tara", "Omar"]
_ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells", "stamps", "cookies"]


def _difficulty_spec(difficulty: int) -> tuple[int, int, bool]:
    """(number of operations, largest operand, whether multiplication may appear)."""
    if not 1 <= difficulty <= 6:
        raise ValueError(f"difficulty must be between 1 and 6, got {difficulty}")
    return {1: (1, 10, False), 2: (2, 10, False), 3: (2, 20, True), 4: (3, 20, True), 5: (4, 50, True),
            6: (5, 100, True)}[difficulty]


def _one_problem(rng: random.Random, difficulty: int) -> dict:
    steps, top, allow_mul = _difficulty_spec(difficulty)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, top)
    sentences = [f"{name} has {value} {item}."]
    for _ in range(steps):
        ops = ["add", "sub"] + (["mul"] if allow_mul and value <= top else [])
        op = rng.choice(ops)
        if op == "sub" and value < 2:
            op = "add"
        if op == "add":
            n = rng.randint(1, top)
            sentences.append(rng.choice([f"Then {name} gets {n} more {item}.", f"A friend gives {name} {n} {item}."]))
            value += n
        elif op == "sub":
            n = rng.randint(1, value - 1)
            sentences.append(rng.choice([f"Then {name} gives away {n} {item}.", f"{name} loses {n} {item}."]))
            value -= n
        else:
            n = rng.randint(2, 4)
            word = {2: "doubles", 3: "triples", 4: "quadruples"}[n]
            sentences.append(f"Then {name} {word} the number of {item}.")
            value *= n
    sentences.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(sentences), "answer": str(value), "steps": steps}


def _split_of(question: str, test_fraction: float) -> str:
    """A problem's split is a function of its text, so train and test can never share a problem."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test_fraction else "train"


def arithmetic_problems(split: str, n: int, difficulty: int = DEFAULT_DIFFICULTY, seed: int = 0,
                        test_fraction: float = 0.2) -> list[dict]:
    """``n`` distinct multi-step arithmetic word problems of ``split`` ("train" or "test"), deterministic from
    ``seed``. Each is ``{"question", "answer", "steps"}``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"arithmetic/{difficulty}/{seed}/{split}")
    problems, seen = [], set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} problems at difficulty {difficulty}")
        problem = _one_problem(rng, difficulty)
        if problem["question"] in seen or _split_of(problem["question"], test_fraction) != split:
            continue
        seen.add(problem["question"])
        problems.append(problem)
    return problems


def make_arithmetic_task(split: str = "train", n: int = 1000, difficulty: int = DEFAULT_DIFFICULTY, seed: int = 0,
                         instruction: str | None = None, system_prompt: str | None = None) -> Dataset:
    """The built-in task as a Dataset with ``prompt`` (chat messages), ``answer``, ``question`` and ``steps``."""
    rows = arithmetic_problems(split, n, difficulty, seed)
    instruction = ARITHMETIC_INSTRUCTION if instruction is None else instruction
    return Dataset.from_list([{**row, "prompt": to_messages(row["question"], instruction, system_prompt)}
                              for row in rows])
