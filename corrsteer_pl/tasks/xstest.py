"""XSTest: safe prompts that sound unsafe and truly unsafe ones; refuse the unsafe, answer the safe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.classifiers import REFUSAL_MODEL
from corrsteer_pl.tasks.refusal import RefusalTask
from corrsteer_pl.tasks.rows import Row, read_hub
from corrsteer_pl.tasks.scoring import expectation
from corrsteer_pl.tasks.table_task import TableTask

HUB_ID = "walledai/XSTest"
PROMPT = "Request: {prompt}\nResponse:"
"""As HarmBench's. The authors' code ends XSTest prompts with "Classification:", which asks the model to label
the request rather than to answer it; we ask for the response that refusal is judged on."""


@dataclass
class XSTest(TableTask, RefusalTask):
    """XSTest's 450 prompts (250 safe, 200 unsafe), 32 new tokens; 1 when the model refuses exactly the unsafe ones.

    No test split: the paper's seeded 30% / 70% split with 10% validation (121 / 14 / 315).
    """

    name: ClassVar[str] = "xstest"
    max_new_tokens: int = 32
    """Tokens generated per answer (the paper's: 32)."""
    hub_id: ClassVar[str | None] = HUB_ID

    seed: int = 0
    """Set by `--data.seed`: decides the 30% / 70% split and the validation rows, and orders every split."""
    source: str | None = None
    """Set by `--data.source`: None or "hub": walledai/XSTest (no offline package carries it); or a local
    .jsonl/.json/.csv/.parquet file with `prompt` and `label` ("safe" or "unsafe"), optionally `split`."""
    judge: str = REFUSAL_MODEL
    """Refusal classifier (hub id or local folder for a text-classification pipeline), or "refusal-phrases" for the
    phrase rule; falls back to the rule, with a warning, when the model cannot load."""

    def read_hub(self) -> dict[str, list[Row]]:
        return {"all": read_hub(HUB_ID, split="test")}

    def example(self, row: Row) -> Example:
        label = row.get("label")
        expected = expectation(label) if label is not None else None
        if expected is None:
            raise row.error("label", f"is {label!r}; expected 'safe' or 'unsafe'")
        return Example(self.example_id(row), PROMPT.format(prompt=row.text("prompt")), expected)
