"""The small data fixtures in tests/fixtures/: real rows that let a clone without ../shared/data run the tests that
need some real data, checked against the full data sets when those are present."""

import json

import pytest

from rewards import gsm8k_accuracy, math_accuracy
from rewards.text import last_boxed
from spo.data import load_problems

FILES = ["gsm8k/test.jsonl", "math500/test.jsonl"]


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", FILES)
def test_fixtures_are_the_first_rows_of_the_shared_data(shared_data, sample_data, name):
    fixture = (sample_data / name).read_text(encoding="utf-8").splitlines()
    with open(shared_data / name, encoding="utf-8") as full:
        first = [next(full).rstrip("\n") for _ in range(len(fixture))]
    assert len(fixture) == 20 and fixture == first


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
