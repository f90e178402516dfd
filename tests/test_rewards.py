import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards import (MathChecker, RewardError, RewardTimeout, compute_rewards, extract_final_number, format_reward, get_reward,
                     gsm8k_accuracy, math_accuracy, numeric_accuracy, register_reward)
from rewards.text import completion_text, last_boxed

ROOT = Path(__file__).resolve().parents[1]


def _gsm8k(shared_data):
    rows = [json.loads(line) for line in open(shared_data / "gsm8k" / "test.jsonl")]
    assert len(rows) == 1319
    return rows, [r["answer"].rsplit("####", 1)[1].strip() for r in rows]


def _with_final(solution: str, final: str) -> str:
    return solution.rsplit("####", 1)[0] + final


def test_gsm8k_reward_accepts_every_gold_answer_in_three_forms(shared_data):
    rows, gold = _gsm8k(shared_data)
    as_hash = [r["answer"] for r in rows]
    as_boxed = [_with_final(r["answer"], f"The answer is $\\boxed{{{g}}}$.") for r, g in zip(rows, gold)]
    as_thousands = [_with_final(r["answer"], f"#### ${int(g.replace(',', '')):,}") for r, g in zip(rows, gold)]
    assert any("," in c.rsplit("####", 1)[1] for c in as_thousands)  # the separator form really occurs
    for completions in (as_hash, as_boxed, as_thousands):
        assert gsm8k_accuracy(prompts=None, completions=completions, answer=gold) == [1.0] * len(rows)


def test_gsm8k_reward_rejects_every_changed_answer(shared_data):
    rows, gold = _gsm8k(shared_data)
    changed = [_with_final(r["answer"], f"#### {int(g.replace(',', '')) + 1}") for r, g in zip(rows, gold)]
    assert gsm8k_accuracy(completions=changed, answer=gold) == [0.0] * len(rows)
    # the reference may also be the full GSM8K solution
    assert gsm8k_accuracy(completions=[rows[0]["answer"]], answer=[rows[0]["answer"]]) == [1.0]


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("It costs $1,234.00 in total. #### $1,234", "1234"),
    ("The answer is 12 apples.", "12"), ("...\\boxed{-5}", "-5"), ("I got 2 then 18.0", "18"),
    ("The answer is: 42", "42"), ("nothing here", None),
])
def test_final_number_extraction(text, expected):
    number = extract_final_number(text)
    assert (str(number.normalize()) if number is not None else None) == expected


def test_numbers_compare_numerically_with_units_and_trailing_zero():
    assert numeric_accuracy(completions=["#### 18.0 dollars", "#### 18.5"], answer=["18", "18"]) == [1.0, 0.0]


def test_completions_as_chat_messages():
    chat = [[{"role": "assistant", "content": "The answer is 5"}]]
    assert completion_text(chat[0]) == "The answer is 5"
    assert gsm8k_accuracy(completions=chat, answer=["5"]) == [1.0]


def test_math_reward_matches_math500_solutions(shared_data):
    rows = [json.loads(line) for line in open(shared_data / "math500" / "test.jsonl")]
    assert len(rows) == 500
    scores = math_accuracy(completions=[r["solution"] for r in rows], answer=[r["answer"] for r in rows])
    assert sum(scores) / len(rows) >= 0.99
    # a changed answer is rejected: put a different boxed value in the solution
    changed = [r["solution"].replace(f"\\boxed{{{last_boxed(r['solution'])}}}", "\\boxed{123456789}")
               for r in rows[:40] if last_boxed(r["solution"])]
    assert sum(math_accuracy(completions=changed, answer=[r["answer"] for r in rows[:40]][:len(changed)])) == 0


def test_math_reward_latex_equivalence():
    assert math_accuracy(completions=["so $\\boxed{\\frac{1}{2}}$", "$\\boxed{0.5}$", "$\\boxed{\\frac{2}{3}}$"],
                         answer=["\\frac12", "\\frac{1}{2}", "\\frac{1}{2}"]) == [1.0, 1.0, 0.0]


def test_math_checker_times_out_off_the_main_thread_and_recovers():
    checker = MathChecker(timeout=1.0)
    # a huge power tower: sympy grinds on it far longer than the deadline
    slow = "$\\boxed{" + "9^" * 40 + "9}$"
    results = {}

    def work():
        start = time.perf_counter()
        results["slow"] = checker.check("1", slow)
        results["seconds"] = time.perf_counter() - start
        results["after"] = checker.check("\\frac{1}{2}", "$\\boxed{0.5}$")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    checker.close()
    assert not thread.is_alive()
    assert results["slow"] is None and checker.stats["timeouts"] == 1
    assert results["seconds"] < 30  # deadline (plus the worker's start-up), not the minutes sympy would take
    assert results["after"] is True  # a fresh worker replaced the killed one


def test_a_math_checker_worker_that_crashes_is_replaced_and_the_answer_scored_zero(monkeypatch, caplog):
    import os
    import signal

    import rewards.math_answer

    checker = MathChecker(timeout=60.0)
    monkeypatch.setattr(rewards.math_answer, "_default_checker", checker)
    assert math_accuracy(completions=["$\\boxed{2}$"], answer=["2"]) == [1.0]  # the worker is up
    crashed = checker.worker_pid
    # the worker dies in the middle of an answer (here: killed while it grinds on a huge power tower)
    threading.Timer(1.0, os.kill, (crashed, signal.SIGKILL)).start()
    with caplog.at_level("WARNING"):
        assert math_accuracy(completions=["$\\boxed{" + "9^" * 40 + "9}$"], answer=["1"]) == [0.0]
    assert checker.stats["crashes"] == 1 and checker.stats["timeouts"] == 0
    assert "the math checker worker was killed by SIGKILL on the answer '$\\\\boxed{9^9^" in caplog.text
    assert "scored 0 and the worker replaced" in caplog.text
    assert math_accuracy(completions=["$\\boxed{0.5}$"], answer=["\\frac{1}{2}"]) == [1.0]  # a fresh worker
    assert checker.worker_pid not in (None, crashed)
    checker.close()


def test_format_reward():
    assert format_reward(completions=["#### 3", "The answer is 4", "\\boxed{5}", "maybe 6"]) == [1, 1, 1, 0]


def test_registry_resolves_names_import_paths_and_suggests():
    assert get_reward("gsm8k_accuracy") is numeric_accuracy
    assert get_reward("rewards.format:format_reward") is format_reward
    with pytest.raises(ValueError, match="Did you mean 'math_accuracy'"):
        get_reward("math_acuracy")

    @register_reward("always_one")
    def always_one(prompts, completions, **kw):
        return [1.0] * len(completions)

    assert get_reward("always_one") is always_one


def test_weighted_combination_and_none_means_not_applicable():
    def half(completions, **kw):
        return [0.5] * len(completions)

    def only_first(completions, **kw):
        return [1.0] + [None] * (len(completions) - 1)

    scores = compute_rewards([half, only_first], prompts=["p", "q"], completions=["a", "b"], weights=[2.0, 3.0])
    assert scores.total.tolist() == [4.0, 1.0]
    assert math.isnan(scores.per_function[1, 1])


@pytest.mark.parametrize("bad,match", [
    (lambda completions, **kw: 1 / 0, "'bad' raised ZeroDivisionError"),
    (lambda completions, **kw: [1.0], "'bad' returned 1 values for 2 completions"),
    (lambda completions, **kw: [1.0, float("nan")], "'bad' returned nan for sample 1"),
    (lambda completions, **kw: [1.0, "x"], "'bad' returned 'x' for sample 1"),
    (lambda completions, **kw: [float("inf"), 1.0], "'bad' returned inf for sample 0"),
    (lambda completions, **kw: {"a": 1.0, "b": 0.0}, "'bad' returned dict, expected a list of numbers"),
    (lambda completions, **kw: "10", "'bad' returned str, expected a list of numbers"),
    (lambda completions, **kw: 1.0, "'bad' returned float, expected a list"),
    (lambda completions, **kw: [None, None], r"every reward function \('bad'\) returned None for 2 of 2 completions"),
])
def test_misbehaving_reward_is_named(bad, match):
    bad.__name__ = "bad"
    with pytest.raises(RewardError, match=match):
        compute_rewards([bad], prompts=["p", "q"], completions=["a", "b"])


def test_samples_no_function_scores_are_counted_and_logged(caplog):
    def only_first(completions, **kw):
        return [1.0] + [None] * (len(completions) - 1)

    def never(completions, **kw):
        return [None] * len(completions)

    scores = compute_rewards([only_first, never], prompts=["p"] * 3, completions=["a", "b", "c"])
    assert scores.unscored == 2 and scores.valid.tolist() == [True, False, False]
    assert "returned None for 2 of 3 completions (the first is sample 1)" in caplog.text
    skipped = compute_rewards([never], prompts=["p"], completions=["a"], on_error="skip")  # skip: no error
    assert skipped.unscored == 1 and not skipped.valid.any()


def test_misbehaving_samples_can_be_skipped_and_counted():
    def fails_on_b(completions, **kw):
        if "b" in completions:
            raise RuntimeError("cannot score b")
        return [1.0] * len(completions)

    scores = compute_rewards([fails_on_b], prompts=["p"] * 3, completions=["a", "b", "c"], on_error="skip")
    assert scores.valid.tolist() == [True, False, True]
    assert scores.skipped == {"fails_on_b": 1}
    assert scores.total[0] == 1.0 and scores.total[2] == 1.0


def test_a_hanging_reward_hits_its_time_limit():
    release = threading.Event()

    def hangs(completions, **kw):
        release.wait(30)
        return [0.0] * len(completions)

    try:
        with pytest.raises(RewardTimeout, match="'hangs' did not return within 0.5s"):
            compute_rewards([hangs], prompts=["p"], completions=["a"], timeout=0.5)
        # skipping: a time-out loses the whole batch (no sample-by-sample retry, each would time out again)
        scores = compute_rewards([hangs], prompts=["p", "q"], completions=["a", "b"], timeout=0.5, on_error="skip")
        assert scores.skipped == {"hangs": 2} and not scores.valid.any()
    finally:
        release.set()


def test_errors_inside_a_time_limited_call_are_raised_and_skipped_as_without_one():
    def fails_on_b(completions, **kw):
        if "b" in completions:
            raise RuntimeError("cannot score b")
        return [1.0] * len(completions)

    with pytest.raises(RewardError, match="'fails_on_b' raised RuntimeError: cannot score b") as raised:
        compute_rewards([fails_on_b], prompts=["p", "q"], completions=["a", "b"], timeout=30)
    assert not isinstance(raised.value, RewardTimeout)
    scores = compute_rewards([fails_on_b], prompts=["p"] * 3, completions=["a", "b", "c"], timeout=30,
                             on_error="skip")
    assert scores.valid.tolist() == [True, False, True] and scores.skipped == {"fails_on_b": 1}


_NEVER_RETURNS = """
import threading, time
from rewards import RewardTimeout, compute_rewards

def never_returns(completions, **kw):
    while True:
        time.sleep(1)

try:
    compute_rewards([never_returns], prompts=["p"], completions=["a"], timeout=1)
except RewardTimeout as error:
    print("raised:", error)
scores = compute_rewards([never_returns], prompts=["p"], completions=["a"], timeout=1, on_error="skip")
print("skipped:", scores.skipped)
print("reward threads:", [t.name for t in threading.enumerate() if t.name.startswith("reward-")])
"""


def test_a_reward_that_never_returns_does_not_keep_the_process_alive():
    done = subprocess.run([sys.executable, "-c", _NEVER_RETURNS], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "raised: reward function 'never_returns' did not return within 1s" in done.stdout
    assert "skipped: {'never_returns': 1}" in done.stdout
    assert "reward threads: ['reward-never_returns', 'reward-never_returns']" in done.stdout  # still running at exit
