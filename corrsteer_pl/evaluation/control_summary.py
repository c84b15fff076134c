"""How a steering compares with random control draws of one kind on the same items: rank, permutation p and a
CI that resamples items and draws."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from corrsteer_pl.evaluation.paired import percentiles


def control_bootstrap_ci(
    steered: Tensor, controls: Tensor, resamples: int = 2_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """CI of mean(steered) - mean(controls) resampling items AND control draws.

    Resampling items alone would hold the random draws fixed and overstate certainty: two sets
    of random features can differ more than the item noise suggests.
    """
    steered, controls = steered.double().cpu(), controls.double().cpu()  # (n,), (draws, n)
    draws, n = controls.shape
    g = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(resamples):
        items = torch.randint(n, (n,), generator=g)
        picked = torch.randint(draws, (draws,), generator=g)
        diffs.append(steered[items].mean() - controls[picked][:, items].mean())
    return percentiles(torch.stack(diffs), level)


def control_rank(accuracy: float, controls: Tensor) -> int:
    """1 + the number of control draws (rows of `controls`, (draws, n) per-item scores) at least as accurate."""
    return 1 + int((controls.double().mean(dim=1) >= accuracy).sum())


@dataclass
class ControlSummary:
    """How the selected steering compares with `draws` random steerings of one kind."""

    kind: str
    draws: int
    accuracy_mean: float
    accuracy_std: float
    accuracy_min: float
    accuracy_max: float
    valid_rate_mean: float
    rank: int  # 1 + number of draws with accuracy >= the selected steering's
    p_value: float  # rank / (draws + 1): permutation p-value of "selection beats random"
    difference: float  # steered accuracy - mean control accuracy
    ci_low: float
    ci_high: float
    accuracies: list[float] = field(default_factory=list)  # each draw's accuracy, for the figure

    @classmethod
    def from_scores(cls, kind: str, steered: Tensor, controls: Tensor, valid: Tensor) -> ControlSummary:
        """`steered`: per-item scores (n,); `controls` / `valid`: the draws' per-item scores and flags (draws, n)."""
        steered, controls = steered.cpu(), controls.cpu()
        acc = controls.double().mean(dim=1)  # (draws,)
        steered_acc = float(steered.double().mean())
        rank = control_rank(steered_acc, controls)
        low, high = control_bootstrap_ci(steered, controls)
        return cls(
            kind=kind,
            draws=controls.shape[0],
            accuracy_mean=float(acc.mean()),
            accuracy_std=float(acc.std()) if acc.numel() > 1 else 0.0,
            accuracy_min=float(acc.min()),
            accuracy_max=float(acc.max()),
            valid_rate_mean=float(valid.double().mean()),
            rank=rank,
            p_value=rank / (controls.shape[0] + 1),
            difference=steered_acc - float(acc.mean()),
            ci_low=low,
            ci_high=high,
            accuracies=acc.tolist(),
        )
