"""A made-up task for tests with tiny random models."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from corrsteer_pl.tasks.base import Example, Split, Task, check_split

VOCABULARY = (
    "red", "blue", "green", "seven", "apple", "river", "stone", "cloud",
    "north", "paper", "music", "tiger", "lamp", "sugar", "wind", "glass",
)  # fmt: skip
LABELS = ("even", "odd")


@dataclass
class Synthetic(Task):
    """Seeded word-sequence prompts labelled "even" or "odd"; scored by the parity of the answer's characters.

    A generation is correct when the sum of the character codes of its first word has the labelled parity, so
    a random model is right about half the time: its success labels vary and correlations have something to find.
    """

    name: ClassVar[str] = "synthetic"

    seed: int = 0
    """Set by `--data.seed`: decides the prompts and labels."""
    size: int = 96
    """Examples over all splits: 60% calibration, 20% validation, the rest test."""
    max_new_tokens: int = 4
    """Tokens generated per prompt."""
    source: str | None = None
    """Set by `--data.source`, which must stay unset: this task has no data source."""

    def __post_init__(self) -> None:
        if self.size < 5:
            raise ValueError(
                f"synthetic size {self.size} is too small; set --data.task.size >= 5 so every split gets examples"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"--data.task.max_new_tokens: synthetic max_new_tokens {self.max_new_tokens} must be >= 1")
        if self.source is not None:
            raise ValueError(f"the synthetic task has no data source, got '{self.source}'; unset --data.source")

    def load_split(self, split: Split) -> list[Example]:
        check_split(split)
        rng = random.Random(self.seed)
        examples = []
        for i in range(self.size):
            words = rng.choices(VOCABULARY, k=rng.randint(3, 6))
            examples.append(Example(id=f"synthetic/{i}", prompt=" ".join(words), answer=rng.choice(LABELS)))
        n_cal, n_val = round(0.6 * self.size), round(0.2 * self.size)
        bounds = {"calibration": (0, n_cal), "validation": (n_cal, n_cal + n_val), "test": (n_cal + n_val, self.size)}
        start, stop = bounds[split]
        return examples[start:stop]

    def score(self, example: Example, generation: str) -> float:
        words = generation.split()
        if not words:
            return 0.0
        parity = LABELS[sum(map(ord, words[0])) % 2]
        return float(parity == example.answer)

    @property
    def judge_name(self) -> str:
        return "first-word-parity"
