"""Other tasks under the steering: each side task's test items answered by every condition, paired figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from corrsteer_pl.evaluation.columns import ConditionScores, score_columns
from corrsteer_pl.evaluation.conditions import judge_conditions
from corrsteer_pl.evaluation.control_summary import ControlSummary
from corrsteer_pl.evaluation.controls import ConditionSet
from corrsteer_pl.evaluation.paired import ConditionResult, PairedAccuracy
from corrsteer_pl.tasks.base import Example, Task
from corrsteer_pl.tasks.batching import ShardedBatches, rank_and_world


@dataclass
class SideTaskResult:
    """One side task: its accuracy unsteered and under each condition, paired on the same items."""

    task: str
    judge: str
    items: int
    unsteered: ConditionResult
    steered: PairedAccuracy
    """The steering as exported (generation positions) against unsteered."""
    steered_valid_rate: float
    choice: PairedAccuracy | None = None
    """The choice-restricted accuracy, steered against unsteered (multiple choice only)."""
    conditions: dict[str, PairedAccuracy] = field(default_factory=dict)
    """The other conditions (served, scale=...) against unsteered."""
    controls: list[ControlSummary] = field(default_factory=list)
    """The steering against each random control kind's draws on the same items."""

    def control_accuracies(self) -> list[float]:
        """Every control draw's accuracy, all kinds."""
        return [a for c in self.controls for a in c.accuracies]


@torch.inference_mode()
def side_task_result(
    model: nn.Module,
    tokenizer: Any,
    task: Task,
    examples: list[Example],
    conditions: ConditionSet,
    batch_size: int = 16,
    chat_template: bool = False,
) -> SideTaskResult:
    """`examples` of `task` answered under every condition of `conditions` (this rank's share; the scores are
    gathered over ranks) and judged by the task, as the target's test pass answers its own."""
    rank, world = rank_and_world()
    scores, choice_scores = ConditionScores(), ConditionScores()
    for batch in ShardedBatches(examples, batch_size, tokenizer, rank, world, chat_template):
        judged = judge_conditions(model, tokenizer, task, batch, conditions.named())
        if judged:
            s, v, c = score_columns(judged, conditions, batch)
            scores.update(s, v)
            if c is not None:
                choice_scores.update(c, torch.ones_like(c, dtype=torch.bool))
    all_scores, valid = scores.compute()
    column, drawn = conditions.columns(all_scores)
    is_valid, drawn_valid = conditions.columns(valid)
    base = column["unsteered"]
    choice = None
    if choice_scores.update_count:
        restricted = conditions.columns(choice_scores.compute()[0])[0]
        choice = PairedAccuracy.from_scores(restricted["unsteered"], restricted["steered"])
    return SideTaskResult(
        task=task.name,
        judge=task.judge_name,
        items=base.numel(),
        unsteered=ConditionResult.from_scores("unsteered", base, is_valid["unsteered"]),
        steered=PairedAccuracy.from_scores(base, column["steered"]),
        steered_valid_rate=float(is_valid["steered"].double().mean()) if base.numel() else 0.0,
        choice=choice,
        conditions={name: PairedAccuracy.from_scores(base, column[name]) for name in conditions.methods},
        controls=[
            ControlSummary.from_scores(kind, column["steered"], drawn[kind], drawn_valid[kind]) for kind in drawn
        ],
    )
