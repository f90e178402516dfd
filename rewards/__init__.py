"""Reward functions with TRL's signature ``f(prompts, completions, completion_ids=None, **columns)``."""

from .accuracy import numeric_accuracy
from .combine import RewardError, RewardScores, RewardTimeout, compute_rewards
from .format import format_reward
from .math_answer import MathChecker, math_accuracy
from .registry import available_rewards, get_reward, register_reward, reward_name
from .text import completion_text, extract_final_number

gsm8k_accuracy = numeric_accuracy
arithmetic_accuracy = numeric_accuracy

__all__ = [
    "MathChecker", "RewardError", "RewardScores", "RewardTimeout", "arithmetic_accuracy", "available_rewards",
    "completion_text", "compute_rewards", "extract_final_number", "format_reward", "get_reward", "gsm8k_accuracy",
    "math_accuracy", "numeric_accuracy", "register_reward", "reward_name",
]
