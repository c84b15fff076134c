"""The fine-tuning baseline's results: one model's per-item scores on a split, and the base-vs-fine-tuned report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from corrsteer_pl.evaluation.choice_report import ChoiceReport
from corrsteer_pl.evaluation.markdown import choice_lines, difference_lines
from corrsteer_pl.evaluation.report import EvaluationReport
from corrsteer_pl.tasks import Task


@dataclass
class ItemScores:
    """One model's answers on a split, item by item: what a comparison table pairs with other methods by id."""

    ids: list[str]
    scores: Tensor  # (N,) float64
    valid: Tensor  # (N,) bool
    answers: list[str | None]

    def aligned(self, ids: list[str]) -> ItemScores:
        """The same results in the order of `ids` (e.g. another method's items); every id must be present."""
        where = {item: i for i, item in enumerate(self.ids)}
        missing = [item for item in ids if item not in where]
        if missing or len(ids) != len(self.ids):
            raise ValueError(f"the items differ: {len(missing)} of {len(ids)} ids not scored here (e.g. {missing[:3]})")
        index = [where[item] for item in ids]
        return ItemScores(list(ids), self.scores[index], self.valid[index], [self.answers[i] for i in index])

    @property
    def accuracy(self) -> float:
        """Mean score."""
        return float(self.scores.mean()) if self.scores.numel() else 0.0


def describe(info: dict[str, Any]) -> str:
    """What was trained, in words, from a run's settings (`FineTuneModule.info`; LoRA when `method` is absent)."""
    if info.get("method", "lora") == "full":
        count = info.get("trainable_parameters")
        weights = f"all {count:,} weights" if count else "all weights"
        return f"Full fine-tuning (AdamW on {weights} of the model)"
    lora = info["lora"]
    return f"LoRA adapters (r {lora['r']}, alpha {lora['alpha']}, on {', '.join(lora['target_modules'])})"


def finetune_markdown(report: EvaluationReport) -> str:
    """The fine-tuning report as Markdown (unsteered = the base model, steered = the fine-tuned one; `steering`
    holds the run's settings): base vs fine-tuned, their paired difference, the answers that changed, SER, and
    (multiple choice) the choice-restricted accuracy."""
    info = report.steering
    base, tuned = report.conditions
    lines = [
        f"# Fine-tuning baseline: {report.task} ({report.split} split, {report.samples} items)",
        "",
        f"{describe(info)} trained on the calibration split's gold answers; checkpoint {info['checkpoint']} "
        f"(step {info['step']}, validation accuracy {info['val_accuracy']:.4f}), picked by validation accuracy.",
        "",
        f"Judge: {report.judge}",
        "",
        *([f"Data: {report.data}", ""] if report.data else []),
        "| model | accuracy | valid-answer rate | accuracy among valid |",
        "|---|---|---|---|",
        f"| base (unsteered) | {base.accuracy:.4f} | {base.valid_rate:.4f} | {base.accuracy_valid:.4f} |",
        f"| fine-tuned (steered) | {tuned.accuracy:.4f} | {tuned.valid_rate:.4f} | {tuned.accuracy_valid:.4f} |",
        *difference_lines(report.paired, "Fine-tuned - base"),
    ]
    lines += choice_lines(report.choice, report) if report.choice is not None else []
    return "\n".join(lines) + "\n"


def finetune_report(
    base: tuple[Tensor, ...], tuned: tuple[Tensor, ...], task: Task, split: str, data: str, info: dict[str, Any]
) -> EvaluationReport:
    """The report from paired per-item (scores, valid[, choice-restricted scores]) of the base and the fine-tuned
    model on the same items (`finetune_markdown` renders it); the choice-restricted figures when both carry their
    third member."""
    report = EvaluationReport.from_scores(
        base[0],
        tuned[0],
        task=task.name,
        split=split,
        judge=task.judge_name,
        valid={"unsteered": base[1], "steered": tuned[1]},
        steering=info,
        data=data,
    )
    if len(base) > 2 and len(tuned) > 2:
        report.choice = ChoiceReport.from_scores(base[2], tuned[2], {}, report.paired, report.conditions)
    return report
