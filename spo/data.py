"""Problems for training and evaluation: local files, hub data sets and built-in procedurally generated tasks,
turned into chat prompts.

Every loader returns a ``datasets.Dataset`` with at least the columns ``prompt`` (a list of chat messages, the
conversational format TRL uses) and ``answer`` (the reference answer as a string); other columns are kept so
reward functions can read them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from .errors import ConfigError, DataError, DataFieldError, DataFileNotFoundError

logger = logging.getLogger(__name__)

ANSWER_INSTRUCTION = "Solve the problem step by step. End with the final answer on its own line as: #### <number>"
ARITHMETIC_INSTRUCTION = "Think step by step, then write the final answer as: The answer is <number>."
LEDGER_INSTRUCTION = ("Go through the changes one at a time, in order. After each change, write the new total, "
                      "for example: 12 - 5 = 7. End with: The answer is <number>.")
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
    "ledger": FieldMap("question", "answer", instruction=LEDGER_INSTRUCTION),
}

BUILTIN_PREFIX = "builtin:"
BUILTIN_DEFAULT_SIZE = 1000  # problems drawn from a built-in task when no limit is given
BUILTIN_DIFFICULTIES = range(1, 7)
DATA_FILE_KINDS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def check_limit(limit, name: str = "limit") -> None:
    """``limit`` is a positive number of problems, or None for all of them."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"{name} must be a positive number of problems, or null for all of them; got {limit!r}")


def guess_preset(source: str) -> str | None:
    """The preset a source's name points at (``openai/gsm8k``, ``.../math500/...``), else None."""
    name = str(source).lower()
    if name.startswith(BUILTIN_PREFIX):
        return "ledger" if name == f"{BUILTIN_PREFIX}ledger" else "arithmetic"
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


def looks_like_path(source: str) -> bool:
    """Whether ``source`` names a local file or folder rather than a hub data set (``owner/name``)."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or (os.sep != "/" and os.sep in source)
            or Path(source).suffix.lower() in DATA_FILE_KINDS)


def check_json_file(path: Path) -> None:
    """Fail with the file and line when a JSON Lines (or JSON) data file is empty, not JSON, cut short, or holds a
    line that is not an object, before ``datasets`` reads it."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"data file {path} is not UTF-8 text (byte {error.start})") from None
    if not text.strip():
        raise DataError(f"data file {path} is empty: no rows")
    if path.suffix.lower() == ".json" and text.lstrip()[:1] in "[{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            pass  # perhaps JSON Lines under a .json name: read it line by line below
        else:
            if isinstance(whole, list) and not whole:
                raise DataError(f"data file {path} is empty: an empty JSON list")
            return
    lines = text.split("\n")
    last = max(i for i, line in enumerate(lines) if line.strip())
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            what = "is cut short" if i == last and not text.endswith("\n") else "is not valid JSON"
            raise DataError(f"data file {path} line {i + 1} {what}: {error.msg} (column {error.colno})") from None
        if not isinstance(row, dict):
            raise DataError(f"data file {path} line {i + 1} is a JSON {type(row).__name__}, not an object of "
                            "fields such as {\"question\": ..., \"answer\": ...}")


def _load_file(path: Path) -> Dataset:
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    kind = DATA_FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unsupported data file {path}: use .jsonl, .json or .parquet")
    if kind == "json":
        check_json_file(path)
    else:
        import pyarrow
        import pyarrow.parquet

        try:
            pyarrow.parquet.ParquetFile(path)
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(f"data file {path} is not a readable Parquet file: {error}") from None
    try:
        raw = load_dataset(kind, data_files=str(path), split="train")
    except DatasetGenerationError as error:  # e.g. a field that is a number in one row and text in another
        cause = str(error.__cause__ or error).strip().splitlines()
        raise DataError(f"data file {path} could not be read: {cause[0] if cause else type(error).__name__}") from error
    if len(raw) == 0:
        raise DataError(f"data file {path} is empty: no rows")
    return raw


def _load_raw(source: str, split: str, config_name: str | None) -> Dataset:
    from datasets import load_dataset

    path = Path(source).expanduser()
    if path.is_dir():
        candidates = [p for ext in ("jsonl", "json", "parquet") for p in sorted(path.glob(f"{split}*.{ext}"))]
        if not candidates:
            raise DataFileNotFoundError(f"no {split}.jsonl / {split}.json / {split}.parquet in data folder {path}")
        path = candidates[0]
    if path.is_file():
        return _load_file(path)
    if looks_like_path(source):
        what = "data file" if path.suffix.lower() in DATA_FILE_KINDS else "data path"
        where = "" if path.is_absolute() else f" (in {Path.cwd()})"
        raise DataFileNotFoundError(f"{what} {source} does not exist{where}")
    if config_name is None and guess_preset(source) == "gsm8k":
        config_name = "main"
    from datasets.exceptions import DatasetNotFoundError

    try:
        return load_dataset(source, config_name, split=split)
    except DatasetNotFoundError as error:
        raise DataFileNotFoundError(f"data set {source!r} is neither a local file or folder nor a data set on the "
                                    f"Hub: {error}") from error
    except ConnectionError as error:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise DataError(f"data set {source!r} is not a local file or folder, and the Hub is offline and not in "
                            "the cache: HF_HUB_OFFLINE is set (download it once online, or give a local file)"
                            ) from error
        raise DataError(f"data set {source!r} is not a local file or folder, and the Hub cannot be reached: "
                        f"{error}") from error


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
    (``openai/gsm8k``), or a built-in task (``builtin:arithmetic``, ``builtin:ledger``). Field names come from a preset
    (``gsm8k``, ``math``; guessed from the source's name) and can be overridden one by one.
    """
    check_limit(limit)
    if str(source).startswith(BUILTIN_PREFIX):
        task = str(source)[len(BUILTIN_PREFIX):]
        if task not in BUILTIN_TASKS:
            available = ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_TASKS)
            raise DataError(f"unknown built-in task {task!r}; available: {available}")
        if split not in ("train", "test"):
            raise ConfigError(f"split must be 'train' or 'test' for {source}, got {split!r}")
        if difficulty is not None and (isinstance(difficulty, bool) or difficulty not in BUILTIN_DIFFICULTIES):
            raise ConfigError(f"difficulty must be between 1 and 6 for {source}, got {difficulty!r}")
        make_task, default_difficulty = BUILTIN_TASKS[task]
        return make_task(split, n=BUILTIN_DEFAULT_SIZE if limit is None else limit,
                         difficulty=default_difficulty if difficulty is None else difficulty,
                         seed=seed, instruction=instruction, system_prompt=system_prompt)

    preset_name = preset or guess_preset(source)
    if preset_name is not None and preset_name not in PRESETS:
        raise ConfigError(f"unknown preset {preset_name!r}; available: {', '.join(PRESETS)}")
    fields = PRESETS.get(preset_name, FieldMap("question", "answer"))
    q_field = question_field or fields.question
    a_field = answer_field or fields.answer
    instruction = fields.instruction if instruction is None else instruction

    raw = _load_raw(str(source), split, config_name)
    for field in (q_field, a_field):
        if field not in raw.column_names:
            raise DataFieldError(f"data set {source} ({split}) has no field {field!r}; its fields are {raw.column_names}. "
                           "Set question_field / answer_field.")
    if limit is not None:
        raw = raw.select(range(min(limit, len(raw))))

    def convert(row: dict, index: int) -> dict:
        question, answer = row[q_field], row[a_field]
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{source} row {index}: field {q_field!r} is empty or not text")
        if answer is None or not str(answer).strip():
            raise DataError(f"{source} row {index}: field {a_field!r} is empty")
        return {"prompt": to_messages(question, instruction, system_prompt),
                "answer": extract_reference(answer, fields.answer_after if a_field == fields.answer else None)}

    return raw.map(convert, with_indices=True, desc="formatting prompts")


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def plain_text(messages: list[dict]) -> str:
    """Chat messages as plain text, for a tokenizer without a chat template: their contents, a blank line apart."""
    return "\n\n".join(m["content"].strip() for m in messages if m["content"].strip()) + "\n"


def prompt_problem(prompt) -> str | None:
    """What is wrong with a prompt (text, or a list of chat messages), as the end of a sentence about it; None when
    nothing is."""
    if isinstance(prompt, str):
        return None if prompt.strip() else "is empty"
    if not isinstance(prompt, (list, tuple)):
        return f"must be text or a list of chat messages, got {type(prompt).__name__}"
    for j, message in enumerate(prompt):
        if not isinstance(message, dict) or "role" not in message or not isinstance(message.get("content"), str):
            return f"message {j} is not a chat message with a 'role' and text 'content'"
    return None if any(m["content"].strip() for m in prompt) else "is empty (no message has any text)"


def tokenize_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of one prompt: a chat prompt through the tokenizer's chat template with the generation prompt
    appended, plain text as it is. A tokenizer without a chat template gets a chat prompt's plain text (as TRL
    gives plain-text prompts to the model), with a warning the first time."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        _warn_once(f"tokenizer {tokenizer_name(tokenizer)} has no chat template: chat prompts are given to the "
                   "model as the plain text of their messages. Set tokenizer.chat_template (or give plain-text "
                   "prompts) to choose the format.")
        return list(tokenizer(plain_text(prompt), add_special_tokens=False)["input_ids"])
    return list(tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


def tokenize_prompts(tokenizer, prompts: list, max_prompt_length: int | None = None, *, first_row: int = 0,
                     where: str = "", limit_name: str | None = None,
                     skipped: dict[int, str] | None = None) -> list[list[int]]:
    """Token ids of prompts (see :func:`tokenize_prompt`). A prompt that is empty, malformed or longer than
    ``max_prompt_length`` tokens raises a DataError (a ValueError) naming its row (counted from ``first_row``, in the data set
    ``where``) and field; when a dict ``skipped`` is given, such rows are left out and recorded there instead
    (row -> reason). ``limit_name`` says where the length limit comes from in the message."""
    ids = []
    limit_name = limit_name or f"max_prompt_length={max_prompt_length}"
    for row, prompt in enumerate(prompts, start=first_row):
        problem = prompt_problem(prompt)
        if problem is None:
            tokens = tokenize_prompt(tokenizer, prompt)
            if not tokens:
                problem = "is empty after tokenization"
            elif max_prompt_length is not None and len(tokens) > max_prompt_length:
                problem = f"has {len(tokens)} tokens, more than {limit_name}"
        if problem is None:
            ids.append(tokens)
        elif skipped is None:
            raise DataError(f"{where + ' ' if where else ''}row {row}: field 'prompt' {problem}")
        else:
            skipped[row] = problem
    return ids


def tokenize_dataset(tokenizer, dataset: Dataset, max_prompt_length: int | None, on_error: str = "raise",
                     where: str = "train_dataset", limit_name: str | None = None
                     ) -> tuple[Dataset, list[list[int]], dict[int, str]]:
    """The rows of ``dataset`` to train on, their prompts' token ids, and the rows left out (row -> reason).
    ``on_error="raise"``: an unusable prompt is an error naming its row; ``"skip"``: its row is left out, counted
    and logged."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    skipped: dict[int, str] | None = {} if on_error == "skip" else None
    ids = tokenize_prompts(tokenizer, dataset["prompt"], max_prompt_length, where=where, limit_name=limit_name,
                           skipped=skipped)
    if not skipped:
        return dataset, ids, {}
    examples = "; ".join(f"row {row}: field 'prompt' {why}" for row, why in list(skipped.items())[:3])
    if len(skipped) == len(dataset):
        raise DataError(f"every row of {where} has an unusable prompt ({examples})")
    logger.warning("%s: skipped %d of %d rows with an unusable prompt (%s%s)", where, len(skipped), len(dataset),
                   examples, "; ..." if len(skipped) > 3 else "")
    kept = [row for row in range(len(dataset)) if row not in skipped]
    return dataset.select(kept), ids, skipped


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


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


def _draw_problems(task: str, one_problem, split: str, n: int, difficulty: int, seed: int,
                   test_fraction: float) -> list[dict]:
    """``n`` distinct problems of ``split`` drawn with ``one_problem(rng, difficulty)``, deterministic from
    ``seed``."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{task}/{difficulty}/{seed}/{split}")
    problems, seen = [], set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 200 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} {task} problems at difficulty {difficulty}")
        problem = one_problem(rng, difficulty)
        if problem["question"] in seen or _split_of(problem["question"], test_fraction) != split:
            continue
        seen.add(problem["question"])
        problems.append(problem)
    return problems


def arithmetic_problems(split: str, n: int, difficulty: int = DEFAULT_DIFFICULTY, seed: int = 0,
                        test_fraction: float = 0.2) -> list[dict]:
    """``n`` distinct multi-step arithmetic word problems of ``split`` ("train" or "test"), deterministic from
    ``seed``. Each is ``{"question", "answer", "steps"}``."""
    return _draw_problems("arithmetic", _one_problem, split, n, difficulty, seed, test_fraction)


def _task_dataset(rows: list[dict], instruction: str, system_prompt: str | None) -> Dataset:
    return Dataset.from_list([{**row, "prompt": to_messages(row["question"], instruction, system_prompt)}
                              for row in rows])


def make_arithmetic_task(split: str = "train", n: int = 1000, difficulty: int = DEFAULT_DIFFICULTY, seed: int = 0,
                         instruction: str | None = None, system_prompt: str | None = None) -> Dataset:
    """The built-in task as a Dataset with ``prompt`` (chat messages), ``answer``, ``question`` and ``steps``."""
    return _task_dataset(arithmetic_problems(split, n, difficulty, seed),
                         ARITHMETIC_INSTRUCTION if instruction is None else instruction, system_prompt)


# --- The built-in ledger task: a running amount updated step by step -------------------------------------------

# The aim was 5-30% greedy accuracy and at least 40% pass@8 for the untrained embedded SmolLM2-135M-Instruct. It
# scores 0-2% greedy in every layout tried; after a short supervised warm-up on the worked solutions
# (benchmarks/ledger_warmup.py) it is inside the window (README, "The built-in task").
LEDGER_DEFAULT_DIFFICULTY = 3
_WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth"]
# Times are words, not numerals, so the only numbers in a question are the amounts.
_LEDGER_SCHEDULES = [
    [f"On {day}" for day in _WEEKDAYS],
    [f"On the {ordinal} day" for ordinal in _ORDINALS],
    [f"On {day} {part}" for day in _WEEKDAYS for part in ("morning", "evening")],
]


def _ledger_spec(difficulty: int) -> tuple[int, int, bool]:
    """(number of updates, largest change, whether the amount may double)."""
    if not 1 <= difficulty <= 6:
        raise ValueError(f"difficulty must be between 1 and 6, got {difficulty}")
    return {1: (6, 5, False), 2: (7, 9, False), 3: (8, 9, False), 4: (8, 9, True), 5: (9, 15, True),
            6: (10, 20, True)}[difficulty]


def _ledger_update(rng: random.Random, value: int, top: int, may_double: bool) -> tuple[str, int]:
    """One update of the running amount: ("add" | "sub" | "double", change)."""
    if may_double and value <= 2 * top and rng.random() < 0.15:
        return "double", value
    if value >= 3 and rng.random() < 0.5:
        return "sub", rng.randint(2, min(top, value - 1))  # never down to zero, let alone below
    return "add", rng.randint(2, top)


def _ledger_sentence(rng: random.Random, op: str, change: int, name: str, item: str) -> str:
    friend = rng.choice([other for other in _NAMES if other != name])
    return rng.choice({
        "add": [f"{name} gets {change} more {item}", f"{name} finds {change} {item}",
                f"{friend} gives {name} {change} {item}"],
        "sub": [f"{name} gives away {change} {item}", f"{name} loses {change} {item}",
                f"{name} gives {change} {item} to {friend}"],
        "double": [f"{name} doubles the number of {item}"],
    }[op])


def _one_ledger_problem(rng: random.Random, difficulty: int) -> dict:
    updates, top, allow_double = _ledger_spec(difficulty)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    times = rng.choice([schedule for schedule in _LEDGER_SCHEDULES if len(schedule) >= updates])
    value = rng.randint(5, 10 + top)
    sentences = [rng.choice([f"{name} has {value} {item}.", f"{name} starts with {value} {item}."])]
    solution = [f"Start: {value}."]
    doubled = False
    for when in times[:updates]:
        op, change = _ledger_update(rng, value, top, allow_double and not doubled)
        event = f"{when}, {_ledger_sentence(rng, op, change, name, item)}"
        step = {"add": f"{value} + {change}", "sub": f"{value} - {change}", "double": f"{value} * 2"}[op]
        value += -change if op == "sub" else change
        sentences.append(f"{event}.")
        solution.append(f"{event}: {step} = {value}.")
        doubled = doubled or op == "double"
    sentences.append(rng.choice([f"How many {item} does {name} have at the end?",
                                 f"How many {item} does {name} have now?"]))
    solution.append(f"The answer is {value}.")
    return {"question": " ".join(sentences), "answer": str(value), "steps": updates,
            "solution": "\n".join(solution)}


def ledger_problems(split: str, n: int, difficulty: int = LEDGER_DEFAULT_DIFFICULTY, seed: int = 0,
                    test_fraction: float = 0.2) -> list[dict]:
    """``n`` distinct ledger problems of ``split`` ("train" or "test"), deterministic from ``seed``: a starting
    amount, then one small update after another, asking for the final amount. Each is ``{"question", "answer",
    "steps", "solution"}`` (``steps``: the number of updates; ``solution``: the worked answer, each update restated
    on its own line with the new total, as the instruction asks)."""
    return _draw_problems("ledger", _one_ledger_problem, split, n, difficulty, seed, test_fraction)


def make_ledger_task(split: str = "train", n: int = 1000, difficulty: int = LEDGER_DEFAULT_DIFFICULTY, seed: int = 0,
                     instruction: str | None = None, system_prompt: str | None = None) -> Dataset:
    """The ledger task as a Dataset with ``prompt`` (chat messages), ``answer``, ``question``, ``steps`` and
    ``solution``."""
    return _task_dataset(ledger_problems(split, n, difficulty, seed),
                         LEDGER_INSTRUCTION if instruction is None else instruction, system_prompt)


# Each built-in task (``builtin:<name>``): its Dataset maker and default difficulty.
BUILTIN_TASKS = {
    "arithmetic": (make_arithmetic_task, DEFAULT_DIFFICULTY),
    "ledger": (make_ledger_task, LEDGER_DEFAULT_DIFFICULTY),
}
