"""Multiple choice as the paper asks it: lettered options, a one-line instruction, and a letter scorer."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from corrsteer_pl.tasks.base import CHOICE_INSTRUCTIONS, Example, Task
from corrsteer_pl.tasks.rows import Row, field_text

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
    """A row's list of 2-26 options as text; anything else is an error naming the field, or the option
    ("options[1]") when it is not text (see `field_text`)."""
    options = row.get(field)
    if not isinstance(options, Sequence) or isinstance(options, str) or not 2 <= len(options) <= 26:
        raise row.error(field, f"must be a list of 2 to 26 options, got {options!r}")
    if any(option is None for option in options):
        raise row.error(field, "has a missing (null) option")
    return [field_text(option, row.where, f"{field}[{i}]") for i, option in enumerate(options)]


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

    instructions = CHOICE_INSTRUCTIONS

    def score(self, example: Example, generation: str) -> float:
        return float(self.extract(example, generation) == example.answer)

    def extract(self, example: Example, generation: str) -> str | None:
        return extract_choice(generation, example.choices)

    @property
    def judge_name(self) -> str:
        return "letter-match"


LETTER_FORMS = ("{}", " {}")
"""How an answer letter can open the answer after "Answer:": bare ("A", as after a chat template's turn start) or
after a space (" A", what a raw prompt ending in "Answer:" continues with; lm-eval's MMLU scores this form alone).
A letter's choice-restricted score is the log of the summed probability of its forms that are one token."""


def letter_token_ids(tokenizer: Any, letters: Sequence[str]) -> list[list[int]]:
    """Per letter, the ids of its `LETTER_FORMS` that the tokenizer encodes as one token.

    A letter with no one-token form, or two letters sharing an id, cannot be scored by its first-position logit:
    that is an error naming the letter.
    """
    out, seen = [], {}
    for letter in letters:
        ids = []
        for form in LETTER_FORMS:
            encoded = tokenizer.encode(form.format(letter), add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        if not ids:
            raise ValueError(
                f"choice letter {letter!r} is not one token in this tokenizer (neither {letter!r} nor ' {letter}'): "
                "the choice-restricted accuracy needs one-token letters; use --calibration.target generated"
            )
        for i in ids:
            if i in seen:
                raise ValueError(f"choice letters {seen[i]!r} and {letter!r} share token id {i} in this tokenizer")
            seen[i] = letter
        out.append(ids)
    return out


@dataclass(frozen=True)
class ChoiceTokens:
    """The letters of a batch's options and their token ids: what turns first-position logits into a choice."""

    letters: tuple[str, ...]
    ids: Tensor
    """(K, F) long: form f of letter k (a letter with fewer forms repeats its first id, masked out by `forms`)."""
    forms: Tensor
    """(K, F) bool: which entries of `ids` are real forms."""

    @classmethod
    def of(cls, tokenizer: Any, letters: Sequence[str]) -> ChoiceTokens:
        per_letter = letter_token_ids(tokenizer, letters)
        width = max(len(ids) for ids in per_letter)
        ids = torch.tensor([row + [row[0]] * (width - len(row)) for row in per_letter], dtype=torch.long)
        forms = torch.tensor([[j < len(row) for j in range(width)] for row in per_letter], dtype=torch.bool)
        return cls(tuple(letters), ids, forms)

    @classmethod
    def for_examples(cls, tokenizer: Any, examples: Sequence[Example]) -> ChoiceTokens | None:
        """The letters of any of `examples`' options, in alphabetical order; None when none has options."""
        letters = sorted({letter for example in examples for letter in example.choices})
        return cls.of(tokenizer, letters) if letters else None

    def restrict(self, logits: Tensor, vocab_ids: Tensor | None = None) -> Tensor:
        """(..., V) logits -> (..., K) float32: per letter, logsumexp over its forms' logits.

        With `vocab_ids` (M,), `logits` (..., M) holds only the logits at those token ids (every id of `ids` must
        be among them). Since all letters share one softmax normaliser, the argmax over letters is the letter with
        the most probability in either form.
        """
        index = self.ids if vocab_ids is None else self._columns(vocab_ids)
        picked = logits[..., index.to(logits.device)].float()  # (..., K, F)
        return picked.masked_fill(~self.forms.to(logits.device), float("-inf")).logsumexp(-1)

    def covered_by(self, vocab_ids: Tensor) -> bool:
        """Whether every id of these letters is among `vocab_ids`."""
        return set(self.ids.flatten().tolist()) <= set(vocab_ids.tolist())

    def _columns(self, vocab_ids: Tensor) -> Tensor:
        column = {int(t): i for i, t in enumerate(vocab_ids.tolist())}
        return torch.tensor([[column[int(t)] for t in row] for row in self.ids.tolist()], dtype=torch.long)

    def answers(self, restricted: Tensor, examples: Sequence[Example]) -> list[str]:
        """Per example, the letter with the highest restricted logit among its own options (`restricted`: (B, K))."""
        own = torch.tensor([[letter in e.choices for letter in self.letters] for e in examples], dtype=torch.bool)
        best = restricted.float().cpu().masked_fill(~own, float("-inf")).argmax(-1)
        return [self.letters[int(i)] for i in best]
