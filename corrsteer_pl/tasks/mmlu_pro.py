"""MMLU-Pro: ten-option questions with the paper's multiple-choice prompt and a one-letter answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.choice import ChoiceTask, build_prompt, gold_letter, option_letters, option_texts
from corrsteer_pl.tasks.rows import Row, read_hub
from corrsteer_pl.tasks.table_task import TableTask

HUB_ID = "rbiswasfc/MMLU-Pro"
"""The authors' choice: TIGER-Lab/MMLU-Pro's 10-option questions, split by category into train 7847 / test 2135."""


@dataclass
class MMLUPro(TableTask, ChoiceTask):
    """MMLU-Pro (options A-J), one new token; calibration and a seeded 10% validation from train, test = test."""

    name: ClassVar[str] = "mmlu_pro"
    max_new_tokens: int = 1
    """Tokens generated per answer (the paper's: 1)."""
    hub_id: ClassVar[str | None] = HUB_ID

    seed: int = 0
    """Set by `--data.seed`: orders every split and picks the train rows held out for validation."""
    source: str | None = None
    """Set by `--data.source`: None or "hub": rbiswasfc/MMLU-Pro; or a local .jsonl/.json/.parquet file with `question`,
    `options` (a list of 2-26 options) and `answer` (letter) or `answer_index` (0-based), optionally `split`."""

    def read_hub(self) -> dict[str, list[Row]]:
        return {"train": read_hub(HUB_ID, split="train"), "test": read_hub(HUB_ID, split="test")}

    def example(self, row: Row) -> Example:
        options = option_texts(row, "options")
        letters = option_letters(len(options))
        answer = gold_letter(row.get("answer", "answer_index"), letters, row.where)
        return Example(self.example_id(row), build_prompt(row.text("question"), options), answer, letters)
