"""SimpleQA: short fact-seeking questions, judged by semantic similarity to the gold answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.classifiers import STS_MODEL, answer_judge
from corrsteer_pl.tasks.rows import Row, read_hub
from corrsteer_pl.tasks.table_task import TableTask

HUB_ID = "basicv8vc/SimpleQA"
PROMPT = "Q: {question}\nA:"
"""The authors' prompt."""


@dataclass
class SimpleQA(TableTask):
    """SimpleQA's 4326 questions, 16 new tokens; correct when the answer's first line is close enough to the gold
    one (STS cross-encoder score >= `threshold`, or normalised exact match when the model cannot load).

    No test split: the paper's seeded 30% / 70% split with 10% validation (1167 / 130 / 3029).
    """

    name: ClassVar[str] = "simpleqa"
    max_new_tokens: int = 16
    """Tokens generated per answer (the paper's: 16)."""
    hub_id: ClassVar[str | None] = HUB_ID

    seed: int = 0
    """Set by `--data.seed`: decides the 30% / 70% split and the validation rows, and orders every split."""
    source: str | None = None
    """Set by `--data.source`: None or "hub": basicv8vc/SimpleQA (no offline package carries it); or a local
    .jsonl/.json/.csv/.parquet file with `problem` (or `question`) and `answer`, optionally `split`."""
    judge: str = STS_MODEL
    """STS cross-encoder (hub id or local folder, one output logit), or "exact-match" for the rule alone; falls
    back to exact match, with a warning, when the model cannot load."""
    threshold: float = 0.6
    """Similarity (sigmoid of the cross-encoder's logit) at or above which an answer counts as correct."""

    def read_hub(self) -> dict[str, list[Row]]:
        return {"all": read_hub(HUB_ID, split="test")}

    def example(self, row: Row) -> Example:
        prompt = PROMPT.format(question=row.text("problem", "question"))
        return Example(self.example_id(row), prompt, row.text("answer"))

    def score(self, example: Example, generation: str) -> float:
        return float(answer_judge(self.judge, self.threshold).matches(generation, example.answer))

    @property
    def judge_name(self) -> str:
        return answer_judge(self.judge, self.threshold).name
