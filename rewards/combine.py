"""Calling reward functions safely and combining them with weights, as TRL does.

Each function returns one value per completion: a float, or None when it does not apply to that sample. The
total is the weighted sum of the values that apply; a sample no function applies to has no total (NaN: it is not
trained on), with a warning as in TRL, and a batch no function applies to at all is an error. A function that
raises, returns something other than a list of numbers, the wrong number of values, or NaN/inf is an error
naming the function; with ``on_error="skip"`` the offending samples are skipped (their total is NaN) and counted
instead. A function that overruns its time limit raises ``RewardTimeout`` (or, skipping, loses its whole batch).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .registry import RewardFunc, reward_name


logger = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function misbehaved."""


class RewardTimeout(RewardError):
    """A reward function did not return within its time limit."""


@dataclass
class RewardScores:
    per_function: torch.Tensor  # [N, F], NaN where a function returned None or the sample was skipped
    total: torch.Tensor  # [N], NaN for skipped samples
    names: list[str]
    skipped: dict[str, int] = field(default_factory=dict)  # function name -> samples skipped
    unscored: int = 0  # samples every function returned None for

    @property
    def valid(self) -> torch.Tensor:
        return ~torch.isnan(self.total)


def _check_values(name: str, values, n: int) -> list[float | None]:
    if isinstance(values, (str, bytes, Mapping)):
        raise RewardError(f"reward function {name!r} returned {type(values).__name__}, expected a list of numbers")
    if not isinstance(values, (list, tuple)):
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {name!r} returned {type(values).__name__}, expected a list") from None
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} values for {n} completions")
    checked = []
    for i, value in enumerate(values):
        if value is None:
            checked.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise RewardError(f"reward function {name!r} returned {value!r} for sample {i}, not a number") from None
        if not math.isfinite(number):
            raise RewardError(f"reward function {name!r} returned {number} for sample {i}")
        checked.append(number)
    return checked


def _with_time_limit(call, seconds: float | None, name: str):
    """Run ``call`` with a deadline. A Python thread cannot be killed, so a function that overruns keeps running in
    the background while training goes on. The thread is a daemon: a ThreadPoolExecutor's workers are joined at
    interpreter exit, so a function that never returns would keep the process alive forever."""
    if seconds is None:
        return call()
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the caller's thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name=f"reward-{name}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise RewardTimeout(f"reward function {name!r} did not return within {seconds:g}s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _call(func: RewardFunc, name: str, prompts, completions, completion_ids, columns, rows,
          timeout: float | None = None) -> list[float | None]:
    pick = (lambda xs: [xs[i] for i in rows]) if rows is not None else (lambda xs: xs)
    kwargs = {key: pick(values) for key, values in columns.items()}
    try:
        values = _with_time_limit(
            lambda: func(prompts=pick(prompts), completions=pick(completions),
                         completion_ids=pick(completion_ids) if completion_ids is not None else None, **kwargs),
            timeout, name)
    except RewardError:
        raise
    except Exception as error:
        raise RewardError(f"reward function {name!r} raised {type(error).__name__}: {error}") from error
    return _check_values(name, values, len(rows) if rows is not None else len(completions))


def compute_rewards(
    funcs: list[RewardFunc],
    prompts: list,
    completions: list,
    completion_ids: list | None = None,
    columns: dict[str, list] | None = None,
    weights: list[float] | None = None,
    on_error: str = "raise",
    names: list[str] | None = None,
    timeout: float | None = None,
    truncated: list[bool] | None = None,
) -> RewardScores:
    """Score ``completions`` with every function; ``columns`` are the data set columns, one value per completion.
    ``timeout``: seconds each function may take for the batch (a function that overruns is an error).
    ``truncated``: per completion, whether it was cut at the length limit before it ended; every function gets it
    as the keyword ``truncated`` (reward functions take ``**kwargs``, as in TRL)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    n = len(completions)
    columns = columns or {}
    if truncated is not None:
        if "truncated" in columns:
            raise ValueError("the data set has a column 'truncated', a name the trainer passes to reward functions "
                             "(whether each completion was cut at the length limit): rename the column")
        columns = {**columns, "truncated": [bool(t) for t in truncated]}
    for key, values in columns.items():
        if len(values) != n:
            raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
    weights = [1.0] * len(funcs) if weights is None else list(weights)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
    names = names or [reward_name(f) for f in funcs]

    table = torch.full((n, len(funcs)), float("nan"))
    bad_rows = torch.zeros(n, dtype=torch.bool)
    skipped: dict[str, int] = {}
    for j, (func, name) in enumerate(zip(funcs, names)):
        try:
            values = _call(func, name, prompts, completions, completion_ids, columns, None, timeout)
        except RewardError as error:
            if on_error == "raise":
                raise
            values = []  # find the offending samples one by one (a time-out skips the whole batch instead)
            timed_out = isinstance(error, RewardTimeout)
            for i in range(n if not timed_out else 0):
                try:
                    values.extend(_call(func, name, prompts, completions, completion_ids, columns, [i], timeout))
                except RewardError:
                    values.append(None)
                    bad_rows[i] = True
                    skipped[name] = skipped.get(name, 0) + 1
            if timed_out:
                values = [None] * n
                bad_rows[:] = True
                skipped[name] = skipped.get(name, 0) + n
        for i, value in enumerate(values):
            if value is not None:
                table[i, j] = value

    weight = torch.tensor(weights, dtype=table.dtype)
    applies = ~torch.isnan(table)
    total = torch.where(applies, table * weight, torch.zeros_like(table)).sum(dim=1)
    unscored = ~applies.any(dim=1) & ~bad_rows
    total[unscored | bad_rows] = float("nan")
    _report_unscored(unscored, names, on_error)
    return RewardScores(per_function=table, total=total, names=names, skipped=skipped, unscored=int(unscored.sum()))


def _report_unscored(unscored: torch.Tensor, names: list[str], on_error: str) -> None:
    """Samples no reward function applies to are not trained on: a warning, or an error when that is every sample
    of the batch (the functions do not fit the data) and errors are not being skipped."""
    count, n = int(unscored.sum()), unscored.numel()
    if not count:
        return
    message = (f"every reward function ({', '.join(map(repr, names))}) returned None for {count} of {n} "
               f"completions (the first is sample {int(unscored.nonzero()[0])}); they get no reward")
    if count == n and on_error == "raise":
        raise RewardError(f"{message}. Check that the reward functions apply to this data set (its columns), "
                          "or make them return a number")
    logger.warning(message)
