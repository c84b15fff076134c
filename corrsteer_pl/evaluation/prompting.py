"""Prompting as comparison rows: does a one-line instruction do what the steering does?

Each instruction is written into every test prompt (`tasks.base.instructed`: before "Answer:" on multiple choice, as
the first line otherwise) and the instructed batch is answered by a pass of its own, unsteered and with the export's
steering: rows "prompt{i}" and "prompt{i}+steered" beside the comparison's methods. Both are judged as every other
condition (`judge`, with the choice-restricted answer on multiple choice), so the table shows prompt, steering, and
both together on the same items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from corrsteer_pl.evaluation.conditions import Conditions
from corrsteer_pl.evaluation.controls import Scorer
from corrsteer_pl.evaluation.judge import Judged
from corrsteer_pl.lightning.data import check_prompt_lengths
from corrsteer_pl.steering.vectors import SteeringVectors
from corrsteer_pl.tasks.base import Example, Task, default_instructions, instructed

FLAG = "--comparison.prompts"
DEFAULT = "default"
"""The value of --comparison.prompts that selects the task's documented instructions (`Task.instructions`)."""
PLAIN, STEERED = "prompt", "prompt+steered"


def check_prompts(prompts: object) -> list[str] | str | None:
    """The option as the callback keeps it: None (off), DEFAULT, or the instructions stripped; one line naming the
    flag for anything else (a bare string, an empty or non-text instruction, the same instruction twice)."""
    if prompts is None:
        return None
    if isinstance(prompts, str):
        if prompts.strip().lower() == DEFAULT:
            return DEFAULT
        raise ValueError(
            f"{FLAG} must be a list of instructions, e.g. '[\"Answer with the letter only.\"]', or `{DEFAULT}`; "
            f"got the string {prompts!r}"
        )
    if not isinstance(prompts, Sequence):
        raise ValueError(f"{FLAG} must be a list of instructions or `{DEFAULT}`; got {prompts!r}")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{FLAG}: every instruction must be non-empty text; got {prompt!r}")
    stripped = [prompt.strip() for prompt in prompts]
    twice = next((p for i, p in enumerate(stripped) if p in stripped[:i]), None)
    if twice is not None:
        raise ValueError(f"{FLAG}: the instruction {twice!r} is given twice")
    return stripped


def resolve_prompts(option: list[str] | str | None, task: Task, multiple_choice: bool) -> list[str]:
    """The instructions to answer with: the given ones, or DEFAULT's for this task (none when off)."""
    if option is None:
        return []
    return default_instructions(task, multiple_choice) if option == DEFAULT else list(option)


def check_instructed_lengths(
    instructions: list[str], examples: list[Example], tokenizer: Any, limit: int, render: Callable[[str], str]
) -> None:
    """Refuses, before anything is answered, an instruction that makes a test prompt longer than `limit` tokens
    (--data.max_prompt_tokens, the data module's check on every split): one line naming the flag, the instruction,
    the item and the limit."""
    for i, instruction in enumerate(instructions):
        prompts = [instructed(e, instruction) for e in examples]
        try:
            check_prompt_lengths(prompts, "instructed test", tokenizer, limit, render)
        except ValueError as err:
            start = instruction if len(instruction) <= 40 else instruction[:40] + "..."
            raise ValueError(
                f"{FLAG}: instruction {i + 1} ({start!r}, {len(instruction):,} characters) makes a test prompt too "
                f"long: {err}"
            ) from None


@dataclass
class PromptRows:
    """Scorers of instructed batches: per instruction, one pass answers it unsteered and with `steering` (an empty
    steering gets no "+steered" row, which would repeat the plain one)."""

    instructions: list[str]
    steering: SteeringVectors
    collate: Callable[[list[Example], int], dict[str, Any]]
    """Examples -> a batch as the data module makes it (tokenized, chat template applied)."""
    answer: Callable[[dict[str, Any], Conditions], dict[str, Judged]]
    """A batch and conditions -> each condition's judged answers (`CorrSteerModule.score_conditions`)."""
    _last: dict[int, tuple[Any, dict[str, Judged]]] = field(default_factory=dict)

    def names(self, i: int) -> dict[str, str]:
        """Instruction i's rows: {row name: condition}."""
        rows = {f"prompt{i + 1}": PLAIN}
        return rows | ({f"prompt{i + 1}+steered": STEERED} if self.steering.layers else {})

    def scorers(self) -> dict[str, Scorer]:
        """{row name: scorer of a batch}, two rows per instruction (one without an empty steering)."""
        out: dict[str, Scorer] = {}
        for i in range(len(self.instructions)):
            for name, condition in self.names(i).items():
                out[name] = lambda batch, i=i, condition=condition: self.judged(i, condition, batch)
        return out

    def labels(self, steered: str) -> dict[str, str]:
        """{row name: table label}; `steered` is the export's label (e.g. "CorrSteer-P")."""
        out = {}
        for i, text in enumerate(self.instructions):
            quoted = '"' + text.replace("|", "\\|").replace("\n", " ") + '"'
            for name, condition in self.names(i).items():
                out[name] = f"prompt {i + 1} {quoted}" + (f" + {steered}" if condition == STEERED else "")
        return out

    def instructed_batch(self, i: int, batch: dict[str, Any]) -> dict[str, Any]:
        """`batch`'s examples with instruction i in their prompts, as a batch of their own."""
        return self.collate([instructed(e, self.instructions[i]) for e in batch["examples"]], batch.get("index", 0))

    def judged(self, i: int, condition: str, batch: dict[str, Any]) -> Judged:
        """Instruction i's answers to `batch` under `condition`; both conditions come from one pass per batch."""
        key = (tuple(e.id for e in batch["examples"]), batch.get("index"))
        last = self._last.get(i)
        if last is None or last[0] != key:
            conditions = {PLAIN: None} | ({STEERED: self.steering} if self.steering.layers else {})
            last = self._last[i] = (key, self.answer(self.instructed_batch(i, batch), conditions))
        return last[1][condition]
