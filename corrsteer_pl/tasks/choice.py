"""Multiple choice as the paper asks it: lettered options, a one-line instruction, and a letter scorer."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from corrsteer_pl.tasks.base import Example, Task

# A letter that opens the generation and stands alone: wrapped in markup ("(C)", "**D**"), followed by
# punctuation ("B.", "B)"), or followed by the end of the text or of the line. "A cat" does not match.
_LEADING = re.compile(r"[(\[*_]*([A-Za-z])(?:[)\]*_.:,;!?]+|[ \t]*(?:\n|$))")
# "Answer: B", "answer is (D)", "The correct answer is **C**": an uppercase letter that is not a word start.
_STATED = re.compile(r"\b(?i:answer)(?:\s+(?i:is))?\s*:?\s*[(\[*_]*([A-Z])(?![A-Za-z])")


def option_letters(n: int) -> tuple[str, ...]:
    """The labels of n options: ("A", "B", ...)."""
    if not 2 <= n <= 26:
        raise ValueError(f"a multiple-choice question needs 2 to 26 options, got {n}")
    return tuple(string.ascii_uppercase[:n])


def candidates(letters: Sequence[str]) -> str:
    """The letters as the instruction lists them: "A or B", "A, B, or C", "A, B, C, or D"."""
    if len(letters) == 2:
        return f"{letters[0]} or {letters[1]}"
    return f"{', '.join(letters[:-1])}, or {letters[-1]}"


def build_prompt(question: str, options: Sequence[str]) -> str:
    """The paper's prompt: question, "A. option" lines, the instruction, "Answer:" (fields whitespace-stripped)."""
    letters = option_letters(len(options))
    lines = [
        question.strip(),
        *(f"{letter}. {option.strip()}" for letter, option in zip(letters, options, strict=True)),
        f"Choose one of the following options only: {candidates(letters)}",
        "Answer:",
    ]
    return "\n".join(lines)


def extract_choice(generation: str, letters: Sequence[str]) -> str | None:
    """The option letter a generation gives, uppercased, or None.

    Rule: after stripping whitespace, a first letter that stands alone (" b", "B.", "(C)", "**D**", "B" then a
    newline) is the answer; otherwise the first "Answer: X" / "answer is X" with an uppercase X is. A letter
    outside `letters` gives None, and so does text with neither form ("", "I think", "A cat").
    """
    text = generation.strip()
    leading = _LEADING.match(text)
    stated = leading or _STATED.search(text)
    if stated is None:
        return None
    letter = stated.group(1).upper()
    return letter if letter in letters else None


class ChoiceTask(Task):
    """A task whose examples carry option letters; correct when the extracted letter equals the gold one."""

    def score(self, example: Example, generation: str) -> float:
        return float(extract_choice(generation, example.choices) == example.answer)
