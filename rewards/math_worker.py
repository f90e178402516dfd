"""The math-verify worker process: one JSON request ``[gold, prediction]`` per line on stdin, one JSON boolean per
line on stdout, after a first line ``"ready"``. It ends when stdin closes.

``rewards.math_answer`` runs this file by path, so the worker imports neither the ``rewards`` package nor torch.
"""

import json
import os
import signal
import sys
import time

# Test hook: with this variable set to "1", a prediction containing HANG never returns, one containing CRASH kills
# the worker.
# math-verify's own time limit (SIGALRM, 5 s) makes the real pathological answers we know of (power towers, huge
# factorials) return False, so tests of the deadline and the replacement need an answer that really hangs.
FAULTS_ENV = "SPO_MATH_WORKER_FAULTS"
HANG = "<math worker test: hang>"
CRASH = "<math worker test: crash>"


def verify_pair(gold: str, prediction: str) -> bool:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # Escaped dollar signs (currency) confuse the LaTeX extraction; they carry no mathematical meaning.
    gold, prediction = gold.replace("\\$", ""), prediction.replace("\\$", "")
    gold_text = gold if ("\\boxed" in gold or "$" in gold) else f"$\\boxed{{{gold}}}$"
    gold_parsed = parse(gold_text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not gold_parsed:
        return False
    predicted = parse(prediction)
    return bool(predicted) and verify(gold_parsed, predicted)


def _inject_fault(prediction: str) -> None:
    if HANG in prediction:
        while True:
            time.sleep(3600)
    if CRASH in prediction:
        os.kill(os.getpid(), signal.SIGKILL)


def serve() -> None:
    # The protocol gets its own copy of stdout; anything a library prints goes to stderr instead of into it.
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    faults = os.environ.get(FAULTS_ENV) == "1"
    verify_pair("1", "$1$")  # math-verify's first-use costs are paid before the ready signal, not by a deadline
    print(json.dumps("ready"), file=protocol, flush=True)
    for line in sys.stdin:
        gold, prediction = json.loads(line)
        if faults:
            _inject_fault(prediction)
        try:
            result = verify_pair(gold, prediction)
        except Exception:  # a malformed answer is a wrong answer
            result = False
        print(json.dumps(result), file=protocol, flush=True)


if __name__ == "__main__":
    serve()
