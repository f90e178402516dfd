"""Reward functions by name, so recipes can say ``reward_funcs: [arithmetic_accuracy, format]``."""

from __future__ import annotations

import difflib
import importlib
from typing import Callable

from .accuracy import numeric_accuracy
from .format import format_reward
from .math_answer import math_accuracy

RewardFunc = Callable[..., list]

_REGISTRY: dict[str, RewardFunc] = {
    "gsm8k_accuracy": numeric_accuracy,
    "arithmetic_accuracy": numeric_accuracy,
    "numeric_accuracy": numeric_accuracy,
    "math_accuracy": math_accuracy,
    "format": format_reward,
}


def register_reward(name: str, func: RewardFunc | None = None):
    """Register ``func`` under ``name`` (usable as a decorator)."""
    def add(f: RewardFunc) -> RewardFunc:
        if not callable(f):
            raise TypeError(f"reward {name!r} must be callable")
        _REGISTRY[name] = f
        return f
    return add(func) if func is not None else add


def available_rewards() -> list[str]:
    return sorted(_REGISTRY)


def get_reward(name_or_func: str | RewardFunc) -> RewardFunc:
    """A reward function from a registered name, an import path ``package.module:function``, or a callable."""
    if callable(name_or_func):
        return name_or_func
    name = str(name_or_func)
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            func = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot import reward function {name!r}: {error}") from error
        if not callable(func):
            raise TypeError(f"reward {name!r} is not callable")
        return func
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown reward function {name!r}.{hint} Available: {', '.join(available_rewards())}, "
                     "or an import path 'module:function'")


def reward_name(func: RewardFunc) -> str:
    for name, registered in _REGISTRY.items():
        if registered is func:
            return name
    return getattr(func, "__name__", type(func).__name__)
