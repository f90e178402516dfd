"""Math accuracy through math-verify (LaTeX-aware equivalence), with time limits that work on any thread.

math-verify's own time limits use SIGALRM, which only works on the main thread and cannot stop a parse that is
stuck in C code. We run the checks in a separate worker process instead: each check gets a deadline, and a
worker that misses it is killed and replaced, so a pathological answer costs at most ``timeout`` seconds and
never hangs the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
from collections import Counter

from .text import completion_text

logger = logging.getLogger(__name__)

_STARTUP_SECONDS = 120.0
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _verify_pair(gold: str, prediction: str) -> bool:
    from math_verify import LatexExtractionConfig, ExprExtractionConfig, parse, verify

    # Escaped dollar signs (currency) confuse the LaTeX extraction; they carry no mathematical meaning.
    gold, prediction = gold.replace("\\$", ""), prediction.replace("\\$", "")
    gold_text = gold if ("\\boxed" in gold or "$" in gold) else f"$\\boxed{{{gold}}}$"
    gold_parsed = parse(gold_text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()])
    if not gold_parsed:
        return False
    predicted = parse(prediction)
    return bool(predicted) and verify(gold_parsed, predicted)


def serve(stdin=sys.stdin, stdout=sys.stdout) -> None:
    """The worker's loop: one JSON request ``[gold, prediction]`` per line in, one JSON boolean per line out."""
    import math_verify  # noqa: F401  (import cost paid before the ready signal)

    print(json.dumps("ready"), file=stdout, flush=True)
    for line in stdin:
        gold, prediction = json.loads(line)
        try:
            result = _verify_pair(gold, prediction)
        except Exception:  # a malformed answer is a wrong answer
            result = False
        print(json.dumps(result), file=stdout, flush=True)


class MathChecker:
    """A worker process that answers "is this prediction equivalent to that gold answer" within a deadline.

    The worker is a plain subprocess speaking JSON lines (not multiprocessing), so it needs no ``__main__``
    guard in the user's script and can be used from any thread.
    """

    def __init__(self, timeout: float = 5.0):
        self.timeout = timeout
        self.stats: Counter = Counter()
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        return self._process.stdout.readline() if ready else None

    def _start(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", "from rewards.math_answer import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))},
        )
        if self._readline(_STARTUP_SECONDS) != json.dumps("ready") + "\n":
            self._stop()
            raise RuntimeError("the math-verify worker process did not start (is math-verify installed?)")

    def _stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
        self._process = None

    @property
    def worker_pid(self) -> int | None:
        """Process id of the running worker, if one is running."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def check(self, gold: str, prediction: str) -> bool | None:
        """True/False, or None when the check ran out of time or the worker crashed on it (the worker is replaced,
        the event counted in ``stats`` and logged with its cause)."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._start()
            try:
                self._process.stdin.write(json.dumps([gold, prediction]) + "\n")
                self._process.stdin.flush()
                line = self._readline(self.timeout)
            except OSError:  # the worker died before reading the request (a broken pipe)
                line = ""
            if line:
                self.stats["checked"] += 1
                return bool(json.loads(line))
            if line is None:
                self.stats["timeouts"] += 1
                logger.warning("math check timed out after %.1fs on the answer %r; it is scored 0", self.timeout,
                               _excerpt(prediction))
            else:
                self.stats["crashes"] += 1
                logger.warning("the math checker worker %s on the answer %r; it is scored 0 and the worker "
                               "replaced", self._exit_cause(), _excerpt(prediction))
            self._stop()
            return None

    def _exit_cause(self) -> str:
        try:
            code = self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def close(self) -> None:
        with self._lock:
            self._stop()


def _excerpt(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


_default_checker: MathChecker | None = None


def default_checker() -> MathChecker:
    global _default_checker
    if _default_checker is None:
        _default_checker = MathChecker()
    return _default_checker


def math_accuracy(prompts=None, completions=None, completion_ids=None, answer=None, **columns) -> list[float]:
    """1.0 when math-verify finds the completion's answer equivalent to the reference ``answer`` (LaTeX, fractions,
    intervals, ...). A check that times out or crashes the checker scores 0.0 and is counted in
    ``default_checker().stats``."""
    if answer is None:
        raise KeyError("needs the data set column 'answer' (the reference answer)")
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    checker = default_checker()
    return [float(bool(checker.check(str(a), completion_text(c)))) for c, a in zip(completions, answer)]
