"""The small data fixtures in tests/fixtures/: rows written for this project in the format of GSM8K and MATH-500, so
that a clone without ../shared/data can run the tests that need some data, checked against the format of the full
data sets when those are present."""

import json
import re

import pytest

from rewards import gsm8k_accuracy, math_accuracy
from rewards.text import last_boxed
from spo.data import load_problems

FILES = ["gsm8k/test.jsonl", "math500/test.jsonl"]
MATH_SUBJECTS = {"Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra", "Number Theory",
                 "Prealgebra", "Precalculus"}


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _gsm8k_features(row) -> dict[str, bool]:
    answer = row["answer"]
    final = answer.rsplit("#### ", 1)[-1]
    return {
        "one '#### ' in the answer": answer.count("####") == 1 and "\n#### " in answer,
        "final answer a plain number": re.fullmatch(r"-?\d{1,3}(,\d{3})*|-?\d+", final) is not None,
        "reasoning before the final answer": bool(answer.rsplit("####", 1)[0].strip()),
    }


def _math_features(row) -> dict[str, bool]:
    return {
        "answer is the last \\boxed{} of the solution": last_boxed(row["solution"]) == row["answer"],
        "answer not empty": bool(row["answer"].strip()),
        "subject is a MATH subject": row["subject"] in MATH_SUBJECTS,
        "level is an int from 1 to 5": type(row["level"]) is int and 1 <= row["level"] <= 5,
        "unique_id is test/<subject>/<n>.json": re.fullmatch(r"test/[a-z_]+/\d+\.json", row["unique_id"]) is not None,
        "problem and solution are text": bool(row["problem"].strip()) and bool(row["solution"].strip()),
    }


FEATURES = {"gsm8k/test.jsonl": _gsm8k_features, "math500/test.jsonl": _math_features}


@pytest.mark.parametrize("name", FILES)
def test_fixtures_have_the_format_of_the_shared_data(shared_data, sample_data, name):
    fixture, full = _rows(sample_data / name), _rows(shared_data / name)
    assert len(fixture) == 20
    assert {tuple(row) for row in fixture} == {tuple(row) for row in full}  # same field names, in the same order
    features = FEATURES[name]
    # every feature holds for every row of the real file, so it must hold for every fixture row as well
    for label in features(full[0]):
        assert all(features(row)[label] for row in full), f"the real {name} lost the feature: {label}"
        assert all(features(row)[label] for row in fixture), f"a fixture row of {name} lacks: {label}"
    if name.startswith("gsm8k"):  # calculator annotations: in almost every real row, in every fixture row
        annotated = [re.search(r"<<[^<>=]+=[^<>]+>>", row["answer"]) is not None for row in full]
        assert sum(annotated) > 0.9 * len(full)
        assert all(re.search(r"<<[^<>=]+=[^<>]+>>", row["answer"]) for row in fixture)


def test_fixture_rows_are_not_copied_from_the_shared_data(shared_data, sample_data):
    for name, key in [("gsm8k/test.jsonl", "question"), ("math500/test.jsonl", "problem")]:
        real = {row[key] for row in _rows(shared_data / name)}
        assert not real & {row[key] for row in _rows(sample_data / name)}


def test_gsm8k_calculator_annotations_are_right(sample_data):
    for row in _rows(sample_data / "gsm8k" / "test.jsonl"):
        results = []
        for expression, value, shown in re.findall(r"<<([^<>=]+)=([^<>]+)>>(-?[\d,]+)", row["answer"]):
            assert re.fullmatch(r"[\d+\-*/(). ]+", expression)
            assert abs(eval(expression) - float(value)) < 1e-9 and float(shown.replace(",", "")) == float(value)
            results.append(float(value))
        assert results and float(row["answer"].rsplit("#### ", 1)[1].replace(",", "")) == results[-1]


def test_fixtures_are_small_and_load(sample_data):
    assert sum((sample_data / name).stat().st_size for name in FILES) < 40_000
    gsm8k = load_problems(str(sample_data / "gsm8k" / "test.jsonl"))
    math500 = load_problems(str(sample_data / "math500"), split="test", preset="math")
    assert len(gsm8k) == len(math500) == 20
    assert all(a and "####" not in a for a in gsm8k["answer"]) and all(math500["answer"])


def test_rewards_score_the_fixture_solutions(sample_data):
    gsm8k = _rows(sample_data / "gsm8k" / "test.jsonl")
    gold = [r["answer"].rsplit("####", 1)[1].strip() for r in gsm8k]
    assert gsm8k_accuracy(completions=[r["answer"] for r in gsm8k], answer=gold) == [1.0] * len(gsm8k)
    changed = [r["answer"].rsplit("####", 1)[0] + f"#### {int(g.replace(',', '')) + 1}" for r, g in zip(gsm8k, gold)]
    assert gsm8k_accuracy(completions=changed, answer=gold) == [0.0] * len(gsm8k)

    math500 = _rows(sample_data / "math500" / "test.jsonl")
    assert math_accuracy(completions=[r["solution"] for r in math500],
                         answer=[r["answer"] for r in math500]) == [1.0] * len(math500)
    wrong = [r["solution"].replace(f"\\boxed{{{last_boxed(r['solution'])}}}", "\\boxed{123456789}") for r in math500]
    assert sum(math_accuracy(completions=wrong, answer=[r["answer"] for r in math500])) == 0
