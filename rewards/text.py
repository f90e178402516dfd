"""Reading answers out of completions: plain strings or chat messages, final-answer markers, numbers."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
_HASH_ANSWER = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def completion_text(completion) -> str:
    """The text of a completion given as a string, a message dict, or a list of chat messages (the last
    assistant message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        assistant = [m for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        chosen = assistant[-1] if assistant else (completion[-1] if completion else "")
        return completion_text(chosen)
    raise TypeError(f"a completion must be a string or chat messages, got {type(completion).__name__}")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced, else None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1:i]
    return None


_STATED = re.compile(r"(?:####|answer\s*(?:is|:))\s*:?\s*([^\n]+?)\s*(?:\.\s|\.?$)", re.IGNORECASE | re.MULTILINE)


def stated_answer(text: str) -> str | None:
    """The answer a solution states, as text: the last ``\\boxed{}``, else what follows the last ``####`` or
    "answer is" up to the end of its sentence or line; None when it states none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _STATED.findall(text)
    if not matches:
        return None
    stated = matches[-1].strip("*$ ")
    return stated or None


def parse_number(text: str | None) -> Decimal | None:
    """A number written with optional ``$``, thousands separators, trailing ``.0`` or units ("1,200 dollars"),
    or None when there is none."""
    if text is None:
        return None
    match = _ANY_NUMBER.search(text.replace("\\!", "").replace("{,}", ","))
    if match is None:
        return None
    cleaned = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def extract_final_number(text: str, fallback_last_number: bool = True) -> Decimal | None:
    """The final numeric answer of a solution: after the last ``####``, else in the last ``\\boxed{}``, else after
    the last "answer is", else (when ``fallback_last_number``) the last number in the text."""
    for pattern in (_HASH_ANSWER, _ANSWER_IS):
        if pattern is _ANSWER_IS:
            boxed = last_boxed(text)
            if boxed is not None:
                return parse_number(boxed)
        matches = pattern.findall(text)
        if matches:
            return parse_number(matches[-1])
    if fallback_last_number:
        numbers = _ANY_NUMBER.findall(text)
        return parse_number(numbers[-1]) if numbers else None
    return None


def reference_number(answer) -> Decimal | None:
    """A reference answer as a number; GSM8K's full solutions ("... #### 72") are accepted too."""
    text = str(answer)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return parse_number(text)


def numbers_equal(a: Decimal | None, b: Decimal | None, tolerance: Decimal = Decimal("1e-6")) -> bool:
    return a is not None and b is not None and abs(a - b) <= tolerance
