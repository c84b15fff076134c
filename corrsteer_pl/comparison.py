"""SteeringComparison: unsteered vs steered correctness on the same items, summed across ranks."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class SteeringComparison(Metric):
    """Accuracy with and without steering, answers changed each way, and the side-effect ratio.

    SER = worse / (worse + better) over items whose score changed (lower is better; 0 if none changed).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self) -> None:
        super().__init__()
        for name in ("n", "unsteered", "steered", "better", "worse"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, unsteered: Tensor, steered: Tensor) -> None:
        """Scores (B,) of the same items without and with steering."""
        unsteered, steered = unsteered.double(), steered.double()
        if unsteered.shape != steered.shape:
            raise ValueError(f"unsteered {tuple(unsteered.shape)} and steered {tuple(steered.shape)} scores differ")
        self.n += unsteered.numel()
        self.unsteered += unsteered.sum()
        self.steered += steered.sum()
        self.better += (steered > unsteered).sum()
        self.worse += (steered < unsteered).sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1)
        changed = self.better + self.worse
        return {
            "accuracy_unsteered": self.unsteered / n,
            "accuracy_steered": self.steered / n,
            "better": self.better,
            "worse": self.worse,
            "ser": torch.where(changed > 0, self.worse / changed.clamp_min(1), torch.zeros_like(changed)),
            "samples": self.n,
        }
