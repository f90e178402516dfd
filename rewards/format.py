"""Format reward: did the completion state a final answer the way the prompt asked."""

from __future__ import annotations

from .text import completion_text, extract_final_number


def format_reward(prompts=None, completions=None, completion_ids=None, **columns) -> list[float]:
    """1.0 when the completion marks a final numeric answer (``####``, ``\\boxed{}`` or "the answer is"), else 0."""
    return [float(extract_final_number(completion_text(c), fallback_last_number=False) is not None)
            for c in completions]
