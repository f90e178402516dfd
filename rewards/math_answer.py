"""Math accuracy through math-verify (LaTeX-aware equivalence), checked by a pool of worker processes.

math-verify's own time limits use SIGALRM, which only works on the main thread and cannot stop a parse that is
stuck in C code. We run the checks in worker processes instead (``rewards/math_worker.py``): each answer gets its
own deadline, and a worker that misses it is killed and replaced, so a pathological answer costs at most
``timeout`` seconds while the other workers go on with the rest of the batch. No lock is held while waiting on a
worker, so a call abandoned by a time limit (``compute_rewards(timeout=...)``) blocks no later call.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, deque

from .text import completion_text, stated_answer

logger = logging.getLogger(__name__)

_STARTUP_SECONDS = 120.0
_WORKER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "math_worker.py")
# Run the worker file without putting its folder first on sys.path (its modules would shadow top-level names).
_BOOT = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')"
_READY = json.dumps("ready") + "\n"


def default_pool_size() -> int:
    return min(4, os.cpu_count() or 1)


class _Worker:
    """One worker process; it checks one answer at a time. ``item`` is the index of the answer it is checking (None
    while idle), ``deadline`` when that answer, or the start-up, must be done."""

    def __init__(self):
        with _all_lock:
            if _exiting:
                raise RuntimeError("the interpreter is exiting; no new math-verify workers are started")
            self.process = subprocess.Popen([sys.executable, "-c", _BOOT, _WORKER_FILE], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
            _all_workers.add(self)
        self.ready = False
        self.item: int | None = None
        self.deadline = time.monotonic() + _STARTUP_SECONDS

    @property
    def pid(self) -> int:
        return self.process.pid

    def fileno(self) -> int:  # lets select() wait on workers directly
        return self.process.stdout.fileno()

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, item: int, gold: str, prediction: str, timeout: float) -> bool:
        """Hand it an answer; False when it died before reading it (a broken pipe)."""
        self.item, self.deadline = item, time.monotonic() + timeout
        try:
            self.process.stdin.write(json.dumps([gold, prediction]) + "\n")
            self.process.stdin.flush()
        except OSError:
            return False
        return True

    def receive(self) -> str:
        """The next line, "" once the worker has died."""
        return self.process.stdout.readline()

    def kill(self) -> None:
        """Safe from any thread: the pipes stay open for the thread that may be reading them."""
        self.process.kill()
        self.process.wait()
        with _all_lock:
            _all_workers.discard(self)

    def release(self) -> None:
        """Kill it and close its pipes; only for the thread that uses the worker, or while nobody does."""
        self.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:  # a write still buffered for a dead worker
                pass

    def exit_cause(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"


_all_workers: set[_Worker] = set()
_all_lock = threading.Lock()
_exiting = False


@atexit.register
def _kill_all_workers() -> None:
    """A worker stuck on an answer never reads the end of its input, so it would outlive us."""
    global _exiting
    with _all_lock:
        _exiting = True
        workers = list(_all_workers)
    for worker in workers:
        worker.kill()


class MathChecker:
    """A pool of up to ``workers`` processes (default ``min(4, cpu count)``, started when first needed) that answer
    "is this prediction equivalent to that gold answer", each answer within ``timeout`` seconds of a worker taking
    it. Usable from any thread; the worker processes need no ``__main__`` guard in the user's script."""

    def __init__(self, timeout: float = 5.0, workers: int | None = None):
        self.timeout = timeout
        self.size = default_pool_size() if workers is None else workers
        if self.size < 1:
            raise ValueError(f"MathChecker needs at least one worker, got workers={workers}")
        self.stats: Counter = Counter()  # checked, timeouts, crashes
        self._lock = threading.Lock()  # guards the lists below and stats; never held while waiting on a worker
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._closings = 0  # workers borrowed before a close() do not go back to the pool

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of this checker's running workers, idle or busy."""
        with self._lock:
            return sorted(w.pid for w in self._workers if w.alive())

    def check(self, gold: str, prediction: str) -> bool | None:
        return self.check_many([(gold, prediction)])[0]

    def check_many(self, pairs) -> list[bool | None]:
        """True/False for each ``(gold, prediction)``, or None when its check ran out of time or crashed the worker
        (the worker is replaced, the event counted in ``stats`` and logged with an excerpt of the answer)."""
        pairs = [(str(gold), str(prediction)) for gold, prediction in pairs]
        results: list[bool | None] = [None] * len(pairs)
        if not pairs:
            return results
        closings = self._closings
        crew = self._borrow(min(self.size, len(pairs)))
        try:
            self._run(crew, pairs, results)
        finally:
            self._return(crew, closings)
        return results

    def _run(self, crew: list[_Worker], pairs: list[tuple[str, str]], results: list) -> None:
        queue = deque(range(len(pairs)))
        while queue or any(w.item is not None for w in crew):
            for k, worker in enumerate(crew):
                if worker.ready and worker.item is None and queue:
                    if not worker.alive():  # died while idle (closed from another thread): no answer's fault
                        crew[k] = self._replace(worker)
                        continue
                    item = queue.popleft()
                    if not worker.send(item, *pairs[item], self.timeout):
                        crew[k] = self._failed(worker, pairs, results, timed_out=False)
            waiting = [w for w in crew if w.item is not None or not w.ready]
            wait = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
            answered, _, _ = select.select(waiting, [], [], wait)
            for worker in answered:
                line = worker.receive()
                if not worker.ready:
                    self._check_started(worker, line)
                elif line:
                    results[worker.item] = bool(json.loads(line))
                    worker.item = None
                    with self._lock:
                        self.stats["checked"] += 1
                else:
                    crew[crew.index(worker)] = self._failed(worker, pairs, results, timed_out=False)
            now = time.monotonic()
            for worker in waiting:
                if worker not in answered and worker.deadline <= now:
                    if not worker.ready:
                        self._check_started(worker, None)
                    crew[crew.index(worker)] = self._failed(worker, pairs, results, timed_out=True)

    def _check_started(self, worker: _Worker, line: str | None) -> None:
        """Mark ``worker`` ready on its ready signal; anything else (``None``: nothing in time) is an error."""
        if line == _READY:
            worker.ready, worker.deadline = True, float("inf")
            return
        cause = f"did not start within {_STARTUP_SECONDS:g}s" if line is None else (
            worker.exit_cause() if not line else f"sent {line.strip()[:80]!r} instead of its ready signal")
        self._discard(worker)
        raise RuntimeError(f"the math-verify worker process {cause} (is math-verify installed?)")

    def _failed(self, worker: _Worker, pairs, results, timed_out: bool) -> _Worker:
        """Log and count the answer ``worker`` failed on (it scores None), stop the worker and return its
        replacement (started now, so the pool keeps its size; nothing waits for it unless an answer needs it)."""
        prediction = pairs[worker.item][1]
        results[worker.item] = None
        with self._lock:
            self.stats["timeouts" if timed_out else "crashes"] += 1
        if timed_out:
            logger.warning("math check timed out after %.1fs on the answer %r; it is scored 0 and the worker "
                           "replaced", self.timeout, _excerpt(prediction))
        else:
            logger.warning("the math checker worker %s on the answer %r; it is scored 0 and the worker replaced",
                           worker.exit_cause(), _excerpt(prediction))
        return self._replace(worker)

    def _replace(self, worker: _Worker) -> _Worker:
        self._discard(worker)
        return self._start()

    def _start(self) -> _Worker:
        worker = _Worker()
        with self._lock:
            self._workers.add(worker)
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.release()
        with self._lock:
            self._workers.discard(worker)

    def _borrow(self, count: int) -> list[_Worker]:
        with self._lock:
            crew, self._idle = self._idle[:count], self._idle[count:]
        return crew + [self._start() for _ in range(count - len(crew))]

    def _return(self, crew: list[_Worker], closings: int) -> None:
        """Idle workers, started or still starting, go back to the pool (up to its size: concurrent calls may have
        started more) unless the checker was closed meanwhile; workers interrupted in an answer are stopped."""
        for worker in crew:
            keep = worker.item is None and worker.alive()
            with self._lock:
                keep = keep and len(self._idle) < self.size and closings == self._closings
                if keep:
                    self._idle.append(worker)
            if not keep:
                self._discard(worker)

    def close(self) -> None:
        """Stop every worker (a later check starts new ones). An answer being checked on another thread meanwhile
        scores None, as if its worker had crashed."""
        with self._lock:
            self._closings += 1
            idle, self._idle = self._idle, []
            busy = [w for w in self._workers if w not in idle]
        for worker in idle:
            self._discard(worker)
        for worker in busy:
            worker.kill()  # its own thread sees the end of its output, then releases it


def _excerpt(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


_default_checker: MathChecker | None = None
_default_lock = threading.Lock()


def default_checker() -> MathChecker:
    """The checker ``math_accuracy`` uses: 5 s per answer, ``default_pool_size()`` workers."""
    global _default_checker
    with _default_lock:
        if _default_checker is None:
            _default_checker = MathChecker()
        return _default_checker


def set_default_checker(checker: MathChecker) -> MathChecker | None:
    """Make ``math_accuracy`` use ``checker`` (another deadline or pool size); returns the previous one, which the
    caller may close."""
    global _default_checker
    with _default_lock:
        previous, _default_checker = _default_checker, checker
    return previous


def math_accuracy(prompts=None, completions=None, completion_ids=None, answer=None, truncated=None,
                  **columns) -> list[float]:
    """1.0 when math-verify finds the completion's answer equivalent to the reference ``answer`` (LaTeX, fractions,
    intervals, ...). An answer whose check times out or crashes its worker scores 0.0 (with a warning naming it,
    counted in ``default_checker().stats``); the rest of the batch is still checked.

    A completion cut at the length limit (``truncated``) scores only an answer it states (``\\boxed{}``, ``####``,
    "answer is"): math-verify would otherwise take the last expression, which is wherever the cut fell."""
    if answer is None:
        raise KeyError("needs the data set column 'answer' (the reference answer)")
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    cut = [False] * len(completions) if truncated is None else truncated
    predictions = [completion_text(c) for c in completions]
    predictions = [_stated_only(p) if t else p for p, t in zip(predictions, cut)]
    checked = [i for i, p in enumerate(predictions) if p is not None]
    results = default_checker().check_many([(str(answer[i]), predictions[i]) for i in checked])
    scores = [0.0] * len(completions)
    for i, result in zip(checked, results):
        scores[i] = float(bool(result))
    return scores


def _stated_only(text: str) -> str | None:
    stated = stated_answer(text)
    return None if stated is None else f"$\\boxed{{{stated}}}$"
