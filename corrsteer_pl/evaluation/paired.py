"""Paired statistics of two per-item score columns on the same items: each accuracy, their difference, its
bootstrap CI (items resampled, pairs kept together), the answers that changed and the side-effect ratio."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

RESAMPLES = 10_000


def percentiles(samples: Tensor, level: float) -> tuple[float, float]:
    """The central `level` percentile interval of `samples`."""
    alpha = (1 - level) / 2
    low, high = torch.quantile(samples, torch.tensor([alpha, 1 - alpha], dtype=samples.dtype))
    return float(low), float(high)


def paired_bootstrap_ci(
    unsteered: Tensor, steered: Tensor, resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile CI of mean(steered - unsteered), resampling items (pairs kept together)."""
    diff = (steered.double() - unsteered.double()).cpu()
    if diff.numel() == 0:
        return 0.0, 0.0
    g = torch.Generator().manual_seed(seed)
    means = []
    for start in range(0, resamples, 1000):  # chunks keep the (chunk, n) index matrix small
        index = torch.randint(diff.numel(), (min(1000, resamples - start), diff.numel()), generator=g)
        means.append(diff[index].mean(dim=1))
    return percentiles(torch.cat(means), level)


@dataclass
class PairedAccuracy:
    """One condition's accuracy against the unsteered model's on the same items, pairs kept together."""

    accuracy: float
    unsteered: float
    difference: float  # accuracy - unsteered
    ci_low: float  # paired bootstrap 95% CI of the difference
    ci_high: float
    better: int  # wrong -> right
    worse: int  # right -> wrong
    ser: float  # worse / (better + worse); 0 when nothing changed

    @classmethod
    def from_scores(cls, unsteered: Tensor, scores: Tensor) -> PairedAccuracy:
        """The paired figures of per-item scores (n,) of the unsteered model and of this condition."""
        unsteered, scores = unsteered.double().cpu(), scores.double().cpu()
        better, worse = int((scores > unsteered).sum()), int((scores < unsteered).sum())
        low, high = paired_bootstrap_ci(unsteered, scores)
        if scores.numel() == 0:
            return cls(0.0, 0.0, 0.0, low, high, better, worse, 0.0)
        accuracy, base, difference = float(scores.mean()), float(unsteered.mean()), float((scores - unsteered).mean())
        ser = worse / (better + worse) if better + worse else 0.0
        return cls(accuracy, base, difference, low, high, better, worse, ser)

    @property
    def moved(self) -> int:
        """+1 / -1 when the 95% CI of the difference lies above / below 0, else 0."""
        return 1 if self.ci_low > 0 else -1 if self.ci_high < 0 else 0

    def flat(self, accuracy: str, unsteered: str | None = None) -> dict[str, float]:
        """The figures as flat keys (report.json, TensorBoard): this condition's accuracy under `accuracy`, the
        unsteered one under `unsteered` (left out when None), then difference, ci_low, ci_high, better, worse, ser."""
        out = {unsteered: self.unsteered} if unsteered is not None else {}
        out[accuracy] = self.accuracy
        return out | {k: getattr(self, k) for k in ("difference", "ci_low", "ci_high", "better", "worse", "ser")}

    def as_report(self) -> dict[str, float]:
        """The figures under report.json's top-level names: accuracy_unsteered, accuracy_steered, difference, ..."""
        return self.flat("accuracy_steered", "accuracy_unsteered")


@dataclass
class ConditionResult:
    """One condition's answers: accuracy, how often the answer was valid, accuracy among valid ones."""

    name: str
    accuracy: float
    valid_rate: float
    accuracy_valid: float

    @classmethod
    def from_scores(cls, name: str, scores: Tensor, valid: Tensor) -> ConditionResult:
        """The figures of per-item scores (n,) and valid flags (n,)."""
        scores, valid = scores.double().cpu(), valid.bool().cpu()
        n, n_valid = max(scores.numel(), 1), int(valid.sum())
        return cls(
            name,
            float(scores.sum() / n),
            n_valid / n,
            float(scores[valid].sum() / n_valid) if n_valid else 0.0,
        )
