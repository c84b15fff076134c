"""The evaluation report: unsteered vs steered on the same items, with a paired bootstrap CI."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def paired_bootstrap_ci(
    unsteered: Tensor, steered: Tensor, resamples: int = 10_000, level: float = 0.95, seed: int = 0
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
    alpha = (1 - level) / 2
    low, high = torch.quantile(torch.cat(means), torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(low), float(high)


@dataclass
class EvaluationReport:
    """What `train.py test` found: accuracies, their paired difference, and what changed."""

    task: str
    split: str
    judge: str
    samples: int
    accuracy_unsteered: float
    accuracy_steered: float
    difference: float
    ci_low: float
    ci_high: float
    better: int  # wrong -> right
    worse: int  # right -> wrong
    ser: float  # worse / (worse + better); 0 when nothing changed
    features: list[dict[str, Any]] = field(default_factory=list)
    steering: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_scores(
        cls, unsteered: Tensor, steered: Tensor, task: str, split: str, judge: str, **extra: Any
    ) -> EvaluationReport:
        unsteered, steered = unsteered.double().cpu(), steered.double().cpu()
        better, worse = int((steered > unsteered).sum()), int((steered < unsteered).sum())
        low, high = paired_bootstrap_ci(unsteered, steered)
        n = max(unsteered.numel(), 1)
        return cls(
            task=task,
            split=split,
            judge=judge,
            samples=unsteered.numel(),
            accuracy_unsteered=float(unsteered.sum() / n),
            accuracy_steered=float(steered.sum() / n),
            difference=float((steered - unsteered).sum() / n),
            ci_low=low,
            ci_high=high,
            better=better,
            worse=worse,
            ser=worse / (better + worse) if better + worse else 0.0,
            **extra,
        )

    def to_markdown(self) -> str:
        lines = [
            f"# CorrSteer evaluation: {self.task} ({self.split} split, {self.samples} items)",
            "",
            f"Judge: {self.judge}",
            "",
            "| condition | accuracy |",
            "|---|---|",
            f"| unsteered | {self.accuracy_unsteered:.4f} |",
            f"| steered | {self.accuracy_steered:.4f} |",
            "",
            f"Difference (steered - unsteered): {self.difference:+.4f}, paired bootstrap 95% CI "
            f"[{self.ci_low:+.4f}, {self.ci_high:+.4f}] (10,000 resamples of items).",
            "",
            f"Answers changed: {self.better} wrong -> right, {self.worse} right -> wrong; "
            f"side-effect ratio (SER) {self.ser:.3f}.",
            "",
            "| layer | feature | r | coefficient | activation frequency |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {f['layer']} | {f['feature']} | {f['r']:.4f} | {f['coefficient']:.4f} | {f['frequency']:.4f} |"
            for f in self.features
        ]
        return "\n".join(lines) + "\n"

    def save(self, folder: str | Path, stem: str = "report") -> None:
        """Writes `<stem>.json` and `<stem>.md`."""
        folder = Path(folder)
        (folder / f"{stem}.json").write_text(json.dumps(asdict(self), indent=2))
        (folder / f"{stem}.md").write_text(self.to_markdown())
