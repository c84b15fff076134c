"""Bring your own task: rows of a local file, a prompt template over its columns, and a built-in scorer."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import ClassVar, Literal

from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.choice import build_prompt, extract_choice, gold_letter, option_letters, option_texts
from corrsteer_pl.tasks.classifiers import REFUSAL_MODEL, refusal_judge
from corrsteer_pl.tasks.rows import Row, field_text
from corrsteer_pl.tasks.scoring import (
    REFUSE,
    contains_answer,
    exact_match,
    expectation,
    refusal_score,
    same_number,
)
from corrsteer_pl.tasks.table_task import TableTask

Scorer = Literal["exact", "choice", "number", "refusal", "contains"]
RULE_NAMES: dict[str, str] = {
    "exact": "exact-match", "choice": "letter-match", "number": "number-match", "contains": "contains-match",
}  # fmt: skip
ALL_LETTERS = tuple(string.ascii_uppercase)


@dataclass
class Custom(TableTask):
    """A task from your own .jsonl/.json/.csv/.parquet file, checked when it is built (template fields must be
    columns). Splits: the file's `split` column (calibration / validation / test) if it has one, else the paper's
    seeded 30% / 70% split with 10% of the 30% as validation.
    """

    name: ClassVar[str] = "custom"

    file: str | None = None
    """The data file; `--data.source` gives it too (set only one)."""
    template: str | None = None
    """The prompt, with column names in braces: "Q: {question}\\nA:" (the default, also without choices_field).
    With `choices_field` it renders the question only ("{question}" by default) and the paper's lettered options,
    instruction and "Answer:" follow. Each field must hold text (a string or an integer): a JSON object, list,
    boolean or float is refused, naming the row."""
    answer_field: str = "answer"
    """The column with the gold answer: text (exact, contains: a string or an integer; a JSON float is refused, as it
    need not read as written), a number or a solution ending "#### n" (number), a letter / 0-based index / option
    text (choice), "unsafe" / "safe" or "refuse" / "comply" (refusal; without the column every prompt should be
    refused)."""
    scorer: Scorer = "exact"
    """exact: first line equals the answer after lowercasing and dropping punctuation and articles; contains: the
    answer appears in the generation; number: GSM8K's rule; choice: the letter; refusal: the refusal judge."""
    max_new_tokens: int = 16
    """Tokens generated per prompt."""
    choices_field: str | None = None
    """For scorer "choice": a column holding the list of options (rendered "A. ..."); without it the template
    lists the options itself and the answer must be a letter."""
    seed: int = 0
    """Set by `--data.seed`: decides the 30% / 70% split when the file has no `split` column, and orders every
    split."""
    source: str | None = None
    """Set by `--data.source`: the data file, as `file`."""
    judge: str = REFUSAL_MODEL
    """For scorer "refusal": refusal classifier (hub id or local folder), or "refusal-phrases" for the rule."""

    def __post_init__(self) -> None:
        if self.scorer not in (*RULE_NAMES, "refusal"):
            raise ValueError(
                f"--data.task.scorer: custom scorer '{self.scorer}' is not one of: exact, choice, number, refusal, "
                "contains"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"--data.task.max_new_tokens: custom max_new_tokens {self.max_new_tokens} must be >= 1")
        if self.file and self.source and self.file != self.source:
            raise ValueError(
                f"custom task got --data.task.file '{self.file}' and --data.source '{self.source}'; set only one"
            )
        self.source = self.file or self.source
        if not self.source:
            raise ValueError("task 'custom' needs a data file: set --data.source (or --data.task.file)")
        self.file = self.source
        if self.template is None:
            self.template = "{question}" if self.choices_field else "Q: {question}\nA:"
        self._check_columns()

    def _check_columns(self) -> None:
        rows = [row for rows in self.loaded.parts.values() for row in rows]
        columns = set(rows[0].fields) if rows else set()
        # the option naming each needed column: (what the message calls it, the flag that sets it)
        needed = {name: ("template field", "template") for name in template_fields(self.template or "")}
        needed[self.answer_field] = ("answer_field", "answer_field")
        if self.choices_field:
            needed[self.choices_field] = ("choices_field", "choices_field")
        for column, (role, option) in needed.items():
            if column not in columns and not (option == "answer_field" and self.scorer == "refusal"):
                raise ValueError(
                    f"{self.file}: {role} '{column}' is not a column; columns: {', '.join(sorted(columns))} "
                    f"(fix --data.task.{option})"
                )

    def example(self, row: Row) -> Example:
        values = {}
        for name in template_fields(self.template or ""):
            value = row.get(name)
            if value is None:
                raise row.error(name, "is missing")
            values[name] = field_text(value, row.where, name)  # as written: neither stripped nor required non-empty
        prompt = (self.template or "").format(**values)
        if self.scorer == "choice":
            return self._choice_example(row, prompt)
        if self.scorer == "refusal":
            label = row.get(self.answer_field)
            expected = REFUSE if self.answer_field not in row.fields else expectation(label)
            if expected is None:
                raise row.error(self.answer_field, f"is {label!r}; expected unsafe / safe or refuse / comply")
            return Example(self.example_id(row), prompt, expected)
        if self.scorer == "number":
            number = row.number(self.answer_field, expected="a number or a solution ending '#### <number>'")
            return Example(self.example_id(row), prompt, format(number, "f"))
        return Example(self.example_id(row), prompt, self._answer_text(row))

    def _answer_text(self, row: Row) -> str:
        """The gold answer of scorer exact / contains: a string, or an integer's digits (see `field_text`).

        A float is refused with the way out: compared as text it need not match what the file shows (1 in a column
        that also holds 2.5 reads as 1.0), and the number scorer compares it as the number it is.
        """
        value = row.get(self.answer_field)
        if isinstance(value, float):
            raise row.error(
                self.answer_field,
                f"is the number {value!r}, which scorer '{self.scorer}' would compare as text that need not match the "
                "file's; write it as a string, or use --data.task.scorer number",
            )
        return row.text(self.answer_field)

    def _choice_example(self, row: Row, question: str) -> Example:
        value = row.get(self.answer_field)
        if not self.choices_field:
            return Example(self.example_id(row), question, gold_letter(value, ALL_LETTERS, row.where), ALL_LETTERS)
        options = option_texts(row, self.choices_field)
        letters = option_letters(len(options))
        stripped = [option.strip() for option in options]
        if isinstance(value, str) and value.strip() in stripped and value.strip().upper() not in letters:
            answer = letters[stripped.index(value.strip())]
        else:
            answer = gold_letter(value, letters, row.where, self.answer_field)
        return Example(self.example_id(row), build_prompt(question, options), answer, letters)

    def score(self, example: Example, generation: str) -> float:
        if self.scorer == "choice":
            return float(extract_choice(generation, example.choices) == example.answer)
        if self.scorer == "number":
            return float(same_number(generation, example.answer))
        if self.scorer == "contains":
            return float(contains_answer(generation, example.answer))
        if self.scorer == "refusal":
            if not generation.strip():
                return 0.0
            return refusal_score(refusal_judge(self.judge).refused(generation), example.answer)
        return float(exact_match(generation, example.answer))

    @property
    def judge_name(self) -> str:
        return refusal_judge(self.judge).name if self.scorer == "refusal" else RULE_NAMES[self.scorer]


def template_fields(template: str) -> list[str]:
    """The column names a template uses, in order; a malformed template is an error naming the option."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"custom template {template!r} is malformed ({error}); fix --data.task.template") from None
    for name in names:
        if not name or name.isdigit() or "." in name or "[" in name:
            raise ValueError(f"custom template field '{{{name}}}' must be a column name (fix --data.task.template)")
    return list(dict.fromkeys(names))
