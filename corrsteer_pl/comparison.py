"""SteeringComparison: per-item scores without and with steering, gathered across ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class SteeringComparison(Metric):
    """Keeps the paired per-item scores (the report's bootstrap needs the items, not only sums)."""

    full_state_update = False
    higher_is_better = None

    def __init__(self) -> None:
        super().__init__()
        self.add_state("unsteered", default=[], dist_reduce_fx="cat")
        self.add_state("steered", default=[], dist_reduce_fx="cat")

    def update(self, unsteered: Tensor, steered: Tensor) -> None:
        """Scores (B,) of the same items without and with steering."""
        if unsteered.shape != steered.shape:
            raise ValueError(f"unsteered {tuple(unsteered.shape)} and steered {tuple(steered.shape)} scores differ")
        self.unsteered.append(unsteered.double())
        self.steered.append(steered.double())

    def compute(self) -> tuple[Tensor, Tensor]:
        """(unsteered, steered) scores of every item seen on any rank."""
        if not self.unsteered:
            empty = torch.zeros(0, dtype=torch.float64, device=self.device)
            return empty, empty
        return dim_zero_cat(self.unsteered), dim_zero_cat(self.steered)
