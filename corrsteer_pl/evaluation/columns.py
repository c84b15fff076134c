"""ConditionScores: per-item scores and answer validity under each condition, gathered across ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


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
