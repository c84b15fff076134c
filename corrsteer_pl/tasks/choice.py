"""Multiple choice as the paper asks it: lettered options, a one-line instruction, and a letter scorer."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from corrsteer_pl.tasks.base import Example, Task
from corrsteer_pl.tasks.tables import Row

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


def option_texts(row: Row, field: str) -> list[str]:
    """A row's list of 2-26 options as text; anything else is an error naming the field."""
    options = row.get(field)
    if not isinstance(options, Sequence) or isinstance(options, str) or not 2 <= len(options) <= 26:
        raise row.error(field, f"must be a list of 2 to 26 options, got {options!r}")
    if any(option is None for option in options):
        raise row.error(field, "has a missing (null) option")
    return [str(option) for option in options]


def gold_letter(value: object, letters: Sequence[str], where: str, field: str = "answer") -> str:
    """The gold letter from an option index (int or digits) or a letter, case and surrounding spaces ignored.

    `where` ("file: row n") and `field` make the error name the cell: "...: field 'answer' is 'E'; expected ...".
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(letters):
        return letters[value]
    if isinstance(value, str):
        text = value.strip().upper()
        if text in letters:
            return text
        if text.isdigit() and int(text) < len(letters):
            return letters[int(text)]
    if value is None:
        raise ValueError(f"{where}: field '{field}' is missing")
    raise ValueError(
        f"{where}: field '{field}' is {value!r}; expected a letter {letters[0]}-{letters[-1]} "
        f"or an index 0-{len(letters) - 1}"
    )


class ChoiceTask(Task):
    """A task whose examples carry option letters; correct when the extracted letter equals the gold one."""

    def score(self, example: Example, generation: str) -> float:
        return float(self.extract(example, generation) == example.answer)

    def extract(self, example: Example, generation: str) -> str | None:
        return extract_choice(generation, example.choices)

    @property
    def judge_name(self) -> str:
        return "letter-match"
