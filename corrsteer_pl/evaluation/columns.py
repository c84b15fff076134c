"""ConditionScores: per-item scores and answer validity under each condition, gathered across ranks; the columns
of one batch's judged conditions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

if TYPE_CHECKING:
    from corrsteer_pl.evaluation.controls import ConditionSet
    from corrsteer_pl.evaluation.judge import Judged


class ConditionScores(Metric):
    """Keeps the paired per-item results (the report's bootstraps need items, not only sums)."""

    full_state_update = False
    higher_is_better = None

    def __init__(self) -> None:
        super().__init__()
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("valid", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, valid: Tensor) -> None:
        """(B, C) scores and validity of B items under C conditions (same order every call)."""
        if scores.shape != valid.shape or scores.dim() != 2:
            raise ValueError(f"scores {tuple(scores.shape)} and valid {tuple(valid.shape)} must be the same (B, C)")
        self.scores.append(scores.double())
        self.valid.append(valid.double())

    def compute(self) -> tuple[Tensor, Tensor]:
        """(N, C) scores and (N, C) bool validity of every item seen on any rank."""
        if isinstance(self.scores, list) and not self.scores:  # after a DDP sync the states are tensors
            empty = torch.zeros(0, 0, dtype=torch.float64, device=self.device)
            return empty, empty.bool()
        return dim_zero_cat(self.scores), dim_zero_cat(self.valid).bool()


def score_columns(
    judged: dict[str, Judged], conditions: ConditionSet, batch: dict[str, Any]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(B, C) scores, valid flags and (multiple choice; else None) choice-restricted scores of one batch: the
    answered conditions, then the baselines' own columns."""
    columns = list(judged.values()) + [scorer(batch) for scorer in conditions.baselines.values()]
    scores, valid = torch.stack([j.scores.cpu() for j in columns], 1), torch.stack([j.valid.cpu() for j in columns], 1)
    if any(j.choice_scores is None for j in columns):
        return scores, valid, None
    return scores, valid, torch.stack([j.choice_scores.cpu() for j in columns], 1)
