"""Numeric accuracy reward: GSM8K, the built-in arithmetic task, any data set with a numeric answer."""

from __future__ import annotations

from .text import completion_text, extract_final_number, numbers_equal, reference_number


def numeric_accuracy(prompts=None, completions=None, completion_ids=None, answer=None, truncated=None,
                     **columns) -> list[float]:
    """1.0 when the completion's final number (after ``####``, in ``\\boxed{}``, after "answer is", else its last
    number) equals the reference ``answer`` column numerically: commas, ``$``, trailing ``.0`` and units do not
    matter. GSM8K references written as full solutions ("... #### 72") are accepted.

    A completion cut at the length limit (``truncated``, passed by the trainer and ``spo eval``) scores only an
    answer it states: its last number is wherever the cut fell, and paying for it teaches a policy to fill its
    length with numbers."""
    if answer is None:
        raise KeyError("needs the data set column 'answer' (the reference answer)")
    if len(answer) != len(completions):
        raise ValueError(f"got {len(completions)} completions but {len(answer)} answers")
    cut = [False] * len(completions) if truncated is None else truncated
    return [float(numbers_equal(extract_final_number(completion_text(c), fallback_last_number=not t),
                                reference_number(a)))
            for c, a, t in zip(completions, answer, cut)]
