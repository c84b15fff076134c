"""The task interface: examples, splits, and what every benchmark provides."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

Split = Literal["calibration", "validation", "test"]
SPLITS: tuple[Split, ...] = ("calibration", "validation", "test")

CHOICE_INSTRUCTIONS = (
    "Answer with the letter of the correct option only.",
    "Reply with a single letter and nothing else.",
)
"""Prompting baselines of a multiple-choice task (`--comparison.prompts default`): the steering's format effect
(answering with a letter at all) is what these ask for in words."""
GENERATION_INSTRUCTIONS = (
    "You are a helpful assistant. Answer the request directly and concisely.",
    "Give only the answer, with no explanation.",
)
"""Prompting baselines of a free-form task: a system-style first line."""


@dataclass(frozen=True)
class Example:
    """One task item: the prompt the model sees and what a correct answer is."""

    id: str
    """Stable and unique within the task (e.g. "mmlu/test/anatomy/12"): counts every sample once across processes."""
    prompt: str
    """Full text fed to the model (template already applied; no chat template)."""
    answer: str
    """Gold answer, e.g. "B"."""
    choices: tuple[str, ...] = ()
    """Option labels for multiple choice, e.g. ("A", "B", "C", "D"); empty for free-form tasks."""


class Task(ABC):
    """A benchmark: its splits, its prompt format, its generation length and its scorer."""

    name: ClassVar[str]
    max_new_tokens: int
    """The answer budget: tokens generated per answer, greedy (each task's own option, the paper's by default)."""
    instructions: ClassVar[tuple[str, ...]] = GENERATION_INSTRUCTIONS
    """What `--comparison.prompts default` asks for in words (multiple-choice items always get CHOICE_INSTRUCTIONS)."""
    duplicates_dropped = 0
    """Examples left out before splitting because an earlier one had the same prompt (set once splits are made)."""

    @abstractmethod
    def load_split(self, split: Split) -> list[Example]:
        """All examples of one split, in a fixed order for a given seed."""

    @abstractmethod
    def score(self, example: Example, generation: str) -> float:
        """1.0 correct / 0.0 not (or a real-valued reward); never raises on empty or garbled text."""

    def extract(self, example: Example, generation: str) -> str | None:
        """The answer the model gave, or None when it gave none (reports count valid answers from this)."""
        first_line = generation.strip().split("\n", 1)[0].strip()
        return first_line or None

    @property
    def judge_name(self) -> str:
        """What decides each score, as reports print it: a rule ("letter-match") or the judge model in use."""
        return f"{self.name}.score"

    @property
    def data_note(self) -> str:
        """Where the splits come from, as reports print it (a task that builds its own splits says how)."""
        return f"{self.name}: the source's own calibration / validation / test splits"


def instructed(example: Example, instruction: str) -> Example:
    """The example with `instruction` in its prompt: on the line before a multiple-choice prompt's closing "Answer:"
    line, else as the prompt's first line (a system-style line; inside the user turn under a chat template)."""
    lines = example.prompt.split("\n")
    if example.choices and len(lines) > 1 and lines[-1].strip().startswith("Answer"):
        return replace(example, prompt="\n".join([*lines[:-1], instruction, lines[-1]]))
    return replace(example, prompt=f"{instruction}\n\n{example.prompt}")


def default_instructions(task: Task, multiple_choice: bool) -> list[str]:
    """The documented instructions of `--comparison.prompts default` for this task."""
    return list(CHOICE_INSTRUCTIONS if multiple_choice else task.instructions)


def check_split(split: str) -> None:
    """Reject a split name that is not one of SPLITS."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
