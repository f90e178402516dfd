import json

import pytest

from spo.data import (DEFAULT_DIFFICULTY, LEDGER_DEFAULT_DIFFICULTY, LEDGER_INSTRUCTION, arithmetic_problems,
                      guess_preset, ledger_problems, load_problems, make_arithmetic_task, make_ledger_task, plain_text,
                      prompt_problem, tokenize_prompts)


def test_builtin_task_is_deterministic_and_splits_never_overlap():
    train = arithmetic_problems("train", 2000, seed=3)
    test = arithmetic_problems("test", 500, seed=3)
    assert train == arithmetic_problems("train", 2000, seed=3)
    assert train != arithmetic_problems("train", 2000, seed=4)
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert len({p["question"] for p in train}) == 2000
    # a different seed draws other problems but still never crosses the split
    other_test = arithmetic_problems("test", 500, seed=4)
    assert not {p["question"] for p in train} & {p["question"] for p in other_test}


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5, 6])
def test_builtin_answers_are_right(difficulty):
    import re

    for problem in arithmetic_problems("train", 50, difficulty=difficulty):
        sentences = problem["question"].split(". ")
        value = int(re.search(r"has (\d+)", sentences[0]).group(1))
        for sentence in sentences[1:-1] + [sentences[-1].split("?")[0]]:
            number = re.search(r"(\d+)", sentence)
            if "doubles" in sentence:
                value *= 2
            elif "triples" in sentence:
                value *= 3
            elif "quadruples" in sentence:
                value *= 4
            elif number and ("gives away" in sentence or "loses" in sentence):
                value -= int(number.group(1))
            elif number:
                value += int(number.group(1))
        assert str(value) == problem["answer"] and value >= 0


def test_difficulty_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="difficulty must be between 1 and 6"):
        arithmetic_problems("train", 3, difficulty=9)


def test_gsm8k_from_local_file_extracts_answer(sample_data):
    ds = load_problems(str(sample_data / "gsm8k" / "test.jsonl"), limit=5)
    assert len(ds) == 5 and ds[0]["prompt"][-1]["role"] == "user"
    raw = json.loads(open(sample_data / "gsm8k" / "test.jsonl").readline())
    assert ds[0]["answer"] == raw["answer"].rsplit("####", 1)[1].strip()
    assert raw["question"] in ds[0]["prompt"][-1]["content"] and "####" in ds[0]["prompt"][-1]["content"]


def test_folder_source_and_math_preset(sample_data):
    ds = load_problems(str(sample_data / "math500"), split="test", limit=3)
    assert ds[0]["answer"] and "\\boxed" in ds[0]["prompt"][-1]["content"]
    assert "subject" in ds.column_names  # other columns are kept for reward functions


def test_field_mapping_and_clear_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"q": "1+1?", "a": "2"}) + "\n" + json.dumps({"q": "", "a": "3"}) + "\n")
    with pytest.raises(KeyError, match="no field 'question'.*fields are \\['q', 'a'\\]"):
        load_problems(str(path))
    with pytest.raises(ValueError, match="row 1: field 'q' is empty"):
        load_problems(str(path), question_field="q", answer_field="a")
    good = load_problems(str(path), question_field="q", answer_field="a", limit=1)
    assert good[0]["answer"] == "2"
    with pytest.raises(FileNotFoundError):
        load_problems(str(tmp_path / "missing" / "x.jsonl"))
    parquet = tmp_path / "p.parquet"
    good.remove_columns("prompt").to_parquet(str(parquet))
    assert load_problems(str(parquet), question_field="q", answer_field="a")[0]["answer"] == "2"


def test_builtin_source_and_chat_prompts(embedded_tokenizer):
    ds = load_problems("builtin:arithmetic", "test", limit=4)
    assert len(ds) == 4 and ds[0]["answer"].isdigit()
    ids = tokenize_prompts(embedded_tokenizer, ds["prompt"])
    text = embedded_tokenizer.decode(ids[0])
    assert text.rstrip().endswith("<|im_start|>assistant") and ds[0]["question"] in text
    with pytest.raises(ValueError, match="row 0: field 'prompt' has .* tokens, more than max_prompt_length=5"):
        tokenize_prompts(embedded_tokenizer, ds["prompt"], max_prompt_length=5)
    assert make_arithmetic_task("test", 4)["question"] == ds["question"]
    assert DEFAULT_DIFFICULTY in range(1, 7)


def test_ledger_task_is_deterministic_and_splits_never_overlap():
    train = ledger_problems("train", 2000, seed=3)
    test = ledger_problems("test", 500, seed=3)
    assert train == ledger_problems("train", 2000, seed=3)
    assert train != ledger_problems("train", 2000, seed=4)
    assert len({p["question"] for p in train}) == 2000
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert not {p["question"] for p in train} & {p["question"] for p in ledger_problems("test", 500, seed=4)}


def ledger_totals(question: str) -> list[int]:
    """The running amount of a ledger problem, read back from its sentences: the start, then after each update."""
    import re

    sentences = question.split(". ")
    totals = [int(re.search(r"(?:has|starts with) (\d+)", sentences[0]).group(1))]
    for sentence in sentences[1:-1]:  # the last one is the question
        change = re.search(r"(\d+)", sentence)
        if "doubles" in sentence:
            totals.append(totals[-1] * 2)
        elif re.search(r"gives away|loses|gives \d+ \w+ to ", sentence):
            totals.append(totals[-1] - int(change.group(1)))
        else:
            totals.append(totals[-1] + int(change.group(1)))
    return totals


@pytest.mark.parametrize("difficulty,updates", [(1, 6), (2, 7), (3, 8), (4, 8), (5, 9), (6, 10)])
def test_ledger_answers_are_right_and_never_negative(difficulty, updates):
    problems = ledger_problems("train", 100, difficulty=difficulty)
    for problem in problems:
        totals = ledger_totals(problem["question"])
        assert str(totals[-1]) == problem["answer"]
        assert len(totals) == updates + 1 == problem["steps"] + 1
        assert min(totals) > 0
    assert any("doubles" in p["question"] for p in problems) == (difficulty >= 4)


@pytest.mark.parametrize("difficulty", [3, 4])
def test_ledger_solution_carries_the_total_line_by_line(difficulty, embedded_tokenizer):
    lengths = []
    for problem in ledger_problems("test", 20, difficulty=difficulty):
        totals = ledger_totals(problem["question"])  # read back from the question, independently of the solution
        lines = problem["solution"].split("\n")
        assert lines[0] == f"Start: {totals[0]}." and lines[-1] == f"The answer is {problem['answer']}."
        events = problem["question"].split(". ")[1:-1]
        for line, event, old, new in zip(lines[1:-1], events, totals[:-1], totals[1:], strict=True):
            restated, arithmetic = line.removesuffix(".").rsplit(": ", 1)
            first, op, second, equals, result = arithmetic.split(" ")
            done = {"+": old + int(second), "-": old - int(second), "*": old * int(second)}[op]
            assert restated == event and (int(first), equals, int(result)) == (old, "=", new) and done == new
        lengths.append(len(embedded_tokenizer(problem["solution"])["input_ids"]))
    assert 150 <= sum(lengths) / len(lengths) <= 300  # the long answers issue #14 asks for


def test_ledger_errors_are_clear():
    with pytest.raises(ValueError, match="difficulty must be between 1 and 6"):
        ledger_problems("train", 3, difficulty=7)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        ledger_problems("dev", 3)
    with pytest.raises(ValueError, match="could not draw 1 distinct test ledger problems"):
        ledger_problems("test", 1, test_fraction=0.0)


def test_ledger_builtin_source():
    ds = load_problems("builtin:ledger", split="test", limit=5)
    assert len(ds) == 5 and {"prompt", "answer", "question", "steps"} <= set(ds.column_names)
    assert ds[0]["prompt"][-1]["content"] == f"{ds[0]['question']}\n\n{LEDGER_INSTRUCTION}"
    assert ds[0]["answer"].isdigit() and "The answer is <number>." in LEDGER_INSTRUCTION
    assert make_ledger_task("test", 5)["question"] == ds["question"]
    assert ds["steps"] == [8] * 5 and LEDGER_DEFAULT_DIFFICULTY == 3
    assert load_problems("builtin:ledger", "test", limit=2, difficulty=1)["steps"] == [6, 6]
    assert guess_preset("builtin:ledger") == "ledger" and guess_preset("builtin:arithmetic") == "arithmetic"


@pytest.mark.parametrize("task", ["arithmetic", "ledger"])
def test_builtin_source_errors_name_the_field(task):
    with pytest.raises(ValueError, match=f"difficulty must be between 1 and 6 for builtin:{task}, got 0"):
        load_problems(f"builtin:{task}", difficulty=0)
    with pytest.raises(ValueError, match=f"split must be 'train' or 'test' for builtin:{task}, got 'validation'"):
        load_problems(f"builtin:{task}", split="validation")
    with pytest.raises(ValueError, match="unknown built-in task 'ledgers'; available: builtin:arithmetic, "
                                         "builtin:ledger"):
        load_problems("builtin:ledgers")


@pytest.mark.parametrize("prompt,problem", [
    ("", "is empty"), ("  \n", "is empty"), ([], "is empty (no message has any text)"),
    ([{"role": "user", "content": " "}], "is empty (no message has any text)"),
    ([{"role": "user"}], "message 0 is not a chat message with a 'role' and text 'content'"),
    (None, "must be text or a list of chat messages, got NoneType"), (7, "must be text or a list of chat messages"),
    ("2+2?", None), ([{"role": "system", "content": ""}, {"role": "user", "content": "2+2?"}], None),
])
def test_prompt_problems_are_described(prompt, problem):
    found = prompt_problem(prompt)
    assert found is None if problem is None else found.startswith(problem)


def test_prompt_errors_name_the_row_or_are_recorded(embedded_tokenizer):
    prompts = ["1+1?", "", "x " * 50]
    with pytest.raises(ValueError, match="eval data set row 41: field 'prompt' is empty"):
        tokenize_prompts(embedded_tokenizer, prompts, first_row=40, where="eval data set")
    skipped = {}
    ids = tokenize_prompts(embedded_tokenizer, prompts, max_prompt_length=10, skipped=skipped)
    assert len(ids) == 1 and skipped == {1: "is empty", 2: "has 51 tokens, more than max_prompt_length=10"}


def test_chat_prompts_without_a_chat_template_are_plain_text(embedded_tokenizer, caplog):
    import copy

    tokenizer = copy.deepcopy(embedded_tokenizer)
    tokenizer.chat_template = None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 2+2? "}]
    assert plain_text(messages) == "Be brief.\n\n2+2?\n"
    ids = tokenize_prompts(tokenizer, [messages, messages])
    assert ids[0] == ids[1] == tokenizer(plain_text(messages), add_special_tokens=False)["input_ids"]
    assert caplog.text.count("has no chat template") <= 1  # warned once per tokenizer (maybe by an earlier test)
