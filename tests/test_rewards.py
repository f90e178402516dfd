import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rewards import (MathChecker, RewardError, RewardTimeout, compute_rewards, extract_final_number, format_reward,
                     get_reward, gsm8k_accuracy, math_accuracy, numeric_accuracy, register_reward)
from rewards import math_worker
from rewards.text import completion_text, last_boxed
from spo.tree import TreeNode, hierarchical_values, leaves

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


def test_a_cut_off_completion_is_paid_only_for_an_answer_it_states():
    """The last number of a completion cut at the length limit is wherever the cut fell: paying for it taught
    SPO-tree to fill its leaves with numbers. A stated answer still counts; a finished completion keeps the
    last-number fallback."""
    texts = ["Kate has 1 more than 2 more than 4", "Kate has 1 more. The answer is 4. Then 5 more than", "3 + 1 = 4"]
    assert numeric_accuracy(completions=texts, answer=["4"] * 3) == [1.0, 1.0, 1.0]
    assert numeric_accuracy(completions=texts, answer=["4"] * 3, truncated=[True, True, False]) == [0.0, 1.0, 1.0]
    scores = compute_rewards([numeric_accuracy], prompts=["p"] * 3, completions=texts, columns={"answer": ["4"] * 3},
                             truncated=[True, False, True])
    assert scores.total.tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="column 'truncated'"):
        compute_rewards([numeric_accuracy], prompts=["p"], completions=["4"],
                        columns={"answer": ["4"], "truncated": [False]}, truncated=[True])


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


def test_a_cut_off_math_completion_scores_only_an_answer_it_states():
    texts = ["so the total is $\\frac{1}{2}$ and then we add", "so the answer is \\frac{1}{2}. Next",
             "so we get $\\boxed{\\frac{1}{2}}$, and", "so the total is $\\frac{1}{2}$ and then we add"]
    answers = ["\\frac{1}{2}"] * 4
    # the first is paid for its last expression only when it ended on its own
    assert math_accuracy(completions=texts, answer=answers, truncated=[True, True, True, False]) == [0.0, 1.0, 1.0, 1.0]
    assert math_accuracy(completions=texts[:1], answer=answers[:1]) == [1.0]  # no truncation column: as before


def test_stated_answer_reads_boxed_hash_and_answer_is():
    from rewards.text import stated_answer

    assert stated_answer("x \\boxed{3} then The answer is 4") == "3"
    assert stated_answer("so #### 72\nmore") == "72"
    assert stated_answer("The answer is: **\\frac{3}{4}**.") == "\\frac{3}{4}"
    assert stated_answer("we have 5 and 6") is None


def test_math_checker_times_out_off_the_main_thread_and_recovers():
    checker = MathChecker(timeout=2.0, workers=1)
    # a huge power tower: math-verify's own time limit (SIGALRM, only on a main thread) stops it after 5 s
    slow = "$\\boxed{" + "9^" * 40 + "9}$"
    results = {}

    def work():
        results["warm"] = checker.check("1", "$1$")
        results["first_pid"] = checker.worker_pids
        results["slow"] = checker.check("1", slow)
        results["after"] = checker.check("\\frac{1}{2}", "$\\boxed{0.5}$")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(120)  # hang detection only
    try:
        assert not thread.is_alive()
        assert results["warm"] is True
        assert results["slow"] is None and checker.stats["timeouts"] == 1
        assert results["after"] is True  # a fresh worker replaced the killed one
        assert len(checker.worker_pids) == 1 and checker.worker_pids != results["first_pid"]
    finally:
        checker.close()


@pytest.fixture
def faulty_checker(monkeypatch):
    """Makes ``math_accuracy`` use a fresh checker whose workers honour the test answers HANG and CRASH."""
    import rewards.math_answer

    monkeypatch.setenv(math_worker.FAULTS_ENV, "1")
    checkers = []

    def make(**kwargs):
        checker = MathChecker(**kwargs)
        monkeypatch.setattr(rewards.math_answer, "_default_checker", checker)
        checkers.append(checker)
        return checker

    yield make
    for checker in checkers:
        checker.close()


def test_a_math_checker_worker_that_crashes_is_replaced_and_the_answer_scored_zero(faulty_checker, caplog):
    checker = faulty_checker(timeout=60.0, workers=1)
    assert math_accuracy(completions=["$\\boxed{2}$"], answer=["2"]) == [1.0]  # the worker is up
    crashed = checker.worker_pids
    with caplog.at_level("WARNING"):
        assert math_accuracy(completions=["$\\boxed{2}$", math_worker.CRASH, "$\\boxed{3}$"],
                             answer=["2", "2", "3"]) == [1.0, 0.0, 1.0]
    assert checker.stats["crashes"] == 1 and checker.stats["timeouts"] == 0 and checker.stats["checked"] == 3
    assert f"the math checker worker was killed by SIGKILL on the answer {math_worker.CRASH!r}" in caplog.text
    assert "scored 0 and the worker replaced" in caplog.text
    assert len(checker.worker_pids) == 1 and checker.worker_pids != crashed


def _tree_6_6_6(final_answers):
    """A 6-6-6 SPO tree of one prompt whose 216 leaves end with ``final_answers`` (depth-first order)."""
    root, answers = TreeNode(prompt_index=0, depth=0), iter(final_answers)
    for a in range(6):
        first = TreeNode(prompt_index=0, depth=1, text=f"First, step {a}. ", parent=root)
        root.children.append(first)
        for b in range(6):
            second = TreeNode(prompt_index=0, depth=2, text=f"Then step {b}. ", parent=first)
            first.children.append(second)
            for _ in range(6):
                second.children.append(TreeNode(prompt_index=0, depth=3, text=next(answers), parent=second,
                                                finished=True))
    return root


def test_a_hung_math_worker_costs_one_leaf_of_a_6_6_6_tree(faulty_checker, caplog):
    checker = faulty_checker(timeout=5.0, workers=3)
    math_accuracy(completions=["$1$"] * 3, answer=["1"] * 3)  # start the whole pool
    before = set(checker.worker_pids)
    forms = ["$\\boxed{\\frac{1}{2}}$", "$\\boxed{0.5}$", "$\\boxed{\\frac{2}{3}}$", "$\\boxed{2}$"]
    finals = [forms[i % 4] for i in range(216)]
    finals[100] = f"so the answer is {math_worker.HANG}"
    expected = [1.0 if i % 4 < 2 and i != 100 else 0.0 for i in range(216)]
    root = _tree_6_6_6(finals)
    leafs = leaves(root)
    assert len(leafs) == 216

    with caplog.at_level("WARNING"):
        # the outer time limit only detects a hang: the pool's own deadline must end the hung check
        scores = compute_rewards([math_accuracy], prompts=["p"] * 216, completions=[l.path_text() for l in leafs],
                                 columns={"answer": ["\\frac{1}{2}"] * 216}, timeout=300)
    assert scores.total.tolist() == expected
    assert checker.stats["timeouts"] == 1 and checker.stats["crashes"] == 0 and checker.stats["checked"] == 3 + 215
    assert "math check timed out after 5.0s on the answer 'First, step 2. Then step 4. so the answer is" in caplog.text
    after = set(checker.worker_pids)
    assert len(after) == 3 and len(before & after) == 2  # exactly the hung worker was replaced
    for leaf, reward in zip(leafs, scores.total.tolist()):
        leaf.reward = reward
    assert hierarchical_values(root) == pytest.approx(sum(expected) / 216)


def test_a_call_abandoned_by_its_time_limit_blocks_no_later_math_check(faulty_checker):
    checker = faulty_checker(timeout=600.0, workers=1)
    with pytest.raises(RewardTimeout, match="'math_accuracy' did not return within 1s"):
        compute_rewards([math_accuracy], prompts=["p"], completions=[math_worker.HANG], columns={"answer": ["1"]},
                        timeout=1)
    hung = checker.worker_pids  # still checking the abandoned answer, for up to 600 s
    results = {}
    later = threading.Thread(target=lambda: results.update(
        scores=math_accuracy(completions=["$\\boxed{0.5}$", "$\\boxed{3}$"], answer=["\\frac12", "3"])))
    later.start()
    later.join(120)  # hang detection only: waiting on the abandoned call would take 600 s
    assert not later.is_alive() and results["scores"] == [1.0, 1.0]
    assert len(hung) == 1 and hung[0] in checker.worker_pids  # the later call used a worker of its own


def test_math_checker_pool_size():
    from rewards.math_answer import default_checker, default_pool_size, set_default_checker

    assert default_pool_size() == min(4, os.cpu_count())
    checker = MathChecker(workers=3)
    previous = set_default_checker(checker)
    try:
        assert default_checker() is checker
        assert math_accuracy(completions=[f"$\\boxed{{{i % 5}}}$" for i in range(10)],
                             answer=[str(i) for i in range(10)]) == [float(i < 5) for i in range(10)]
        assert checker.stats["checked"] == 10 and len(checker.worker_pids) == 3
    finally:
        assert set_default_checker(previous) is checker
        checker.close()
    assert checker.worker_pids == []
    with pytest.raises(ValueError, match="at least one worker"):
        MathChecker(workers=0)


_HUNG_MATH_WORKER_AT_EXIT = """
from rewards import RewardTimeout, compute_rewards, math_accuracy
from rewards.math_answer import MathChecker, default_checker, set_default_checker
from rewards.math_worker import HANG

set_default_checker(MathChecker(timeout=600.0, workers=1))
try:
    compute_rewards([math_accuracy], prompts=["p"], completions=[HANG], columns={"answer": ["1"]}, timeout=2)
except RewardTimeout:
    print("pids:", *default_checker().worker_pids)
"""


def test_a_hung_math_worker_does_not_outlive_the_process():
    env = {**os.environ, "PYTHONPATH": str(ROOT), math_worker.FAULTS_ENV: "1"}
    done = subprocess.run([sys.executable, "-c", _HUNG_MATH_WORKER_AT_EXIT], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    pids = [int(p) for p in done.stdout.split("pids:")[1].split()]
    assert len(pids) == 1

    def running(pid):
        try:
            return not open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z"
        except FileNotFoundError:
            return False

    for _ in range(100):  # killed at exit; allow a moment to be reaped
        if not running(pids[0]):
            break
        time.sleep(0.1)
    assert not running(pids[0])


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
