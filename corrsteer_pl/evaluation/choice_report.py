"""Format or knowledge: the choice-restricted accuracy beside the generated-answer accuracy, and which one moved.

The generated-answer accuracy counts an item right when the text the model writes gives the gold letter: a
steering that only makes the model answer with a letter at all raises it. The choice-restricted accuracy takes
the letter with the highest logit among the item's options at the first answer position (lm-eval's
multiple-choice metric, read from the same pass): every item has an answer, so format cannot move it. A gain in
the first alone is a format effect; a gain in the second is a change in which option the model ranks first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from corrsteer_pl.evaluation.report import RESAMPLES, ConditionResult, ControlSummary, EvaluationReport, PairedAccuracy


@dataclass
class ChoiceReport:
    """The choice-restricted accuracy of the report's conditions on the same items, and the reading of both."""

    steered: PairedAccuracy
    controls: list[ControlSummary] = field(default_factory=list)  # the report's random / search-matched draws
    reading: str = ""  # in words: which of the two accuracies moved

    def markdown(self, report: EvaluationReport) -> list[str]:
        """The report's section: both accuracies side by side, the paired CI, the controls and the reading."""
        c, generated = self.steered, {k.kind: k for k in report.controls}
        lines = ["", "## Format or knowledge: choice-restricted accuracy", ""]
        lines += [
            "Choice-restricted: the option letter with the highest logit at the first answer position (argmax over "
            "the item's letters, each letter's forms 'A' and ' A' summed), as lm-eval's multiple-choice metric; "
            "read from the same pass, so every item has an answer and answering in the format cannot move it.",
            "",
            "| condition | generated-answer accuracy | valid-answer rate | choice-restricted accuracy |",
            "|---|---|---|---|",
            f"| unsteered | {report.accuracy_unsteered:.4f} | {_valid(report, 'unsteered')} | {c.unsteered:.4f} |",
            f"| steered | {report.accuracy_steered:.4f} | {_valid(report, 'steered')} | {c.accuracy:.4f} |",
        ]
        lines += [
            f"| {k.kind} control (mean of {k.draws}) | "
            f"{generated[k.kind].accuracy_mean if k.kind in generated else float('nan'):.4f} | | "
            f"{k.accuracy_mean:.4f} ± {k.accuracy_std:.4f} |"
            for k in self.controls
        ]
        lines += [
            "",
            f"Choice-restricted steered - unsteered: {c.difference:+.4f}, paired bootstrap 95% CI "
            f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] ({RESAMPLES:,} resamples of items); answers changed: {c.better} "
            f"wrong -> right, {c.worse} right -> wrong; SER {c.ser:.3f}.",
        ]
        lines += [
            f"Choice-restricted, against {k.draws} {k.kind} controls: {k.difference:+.4f} (95% CI [{k.ci_low:+.4f}, "
            f"{k.ci_high:+.4f}]); rank {k.rank} of {k.draws + 1}, permutation p = {k.p_value:.3f}."
            for k in self.controls
        ]
        return lines + ["", f"**Reading:** {self.reading}"]


def _valid(report: EvaluationReport, name: str) -> str:
    return next((f"{r.valid_rate:.4f}" for r in report.conditions if r.name == name), "")


def choice_report(
    report: EvaluationReport, unsteered: Tensor, steered: Tensor, controls: Mapping[str, Tensor]
) -> ChoiceReport:
    """The choice-restricted figures of `report`'s items: per-item scores (N,) unsteered and steered, and
    kind -> (draws, N) for its controls."""
    choice = PairedAccuracy.from_scores(unsteered, steered)
    summaries = [
        ControlSummary.from_scores(kind, steered, draws, torch.ones_like(draws, dtype=torch.bool))
        for kind, draws in controls.items()
    ]
    generated = PairedAccuracy(
        report.accuracy_steered, report.accuracy_unsteered, report.difference, report.ci_low, report.ci_high,
        report.better, report.worse, report.ser,
    )  # fmt: skip
    rates = {c.name: c for c in report.conditions}
    return ChoiceReport(choice, summaries, reading(generated, choice, rates["unsteered"], rates["steered"]))


def reading(
    generated: PairedAccuracy, choice: PairedAccuracy, unsteered: ConditionResult, steered: ConditionResult
) -> str:
    """Which of the two accuracies moved beyond its paired 95% CI, in words."""
    g = f"generated-answer accuracy {_moved(generated)}"
    c = f"choice-restricted accuracy {_moved(choice)}"
    rates = (
        f"valid-answer rate {unsteered.valid_rate:.3f} -> {steered.valid_rate:.3f}, accuracy among valid "
        f"{unsteered.accuracy_valid:.3f} -> {steered.accuracy_valid:.3f}"
    )
    if generated.moved and not choice.moved:
        return (
            f"a format effect, not knowledge: the {g} ({rates}), but the {c}. The steering changed how the model "
            "answers, not which option it ranks first."
        )
    if choice.moved and not generated.moved:
        return (
            f"the {c}, but the {g} ({rates}): the steering changed which option the model ranks first without "
            "changing enough of what it writes to show in the generated answers."
        )
    if generated.moved and choice.moved and generated.moved == choice.moved:
        return (
            f"both moved: the {g} ({rates}) and the {c}. The steering changed which option the model ranks "
            "first, not only how it answers."
        )
    if generated.moved and choice.moved:
        return f"the two moved in opposite directions: the {g} ({rates}), while the {c}."
    return f"neither moved beyond its 95% CI: the {g} ({rates}), and the {c}."


def _moved(p: PairedAccuracy) -> str:
    verb = {1: "rose", -1: "fell", 0: "did not move (its CI holds 0)"}[p.moved]
    return f"{verb}: {p.unsteered:.4f} -> {p.accuracy:.4f}, {p.difference:+.4f} [{p.ci_low:+.4f}, {p.ci_high:+.4f}]"


def choice_scalars(choice: ChoiceReport, stage: str) -> dict[str, float]:
    """The choice-restricted figures as `stage/choice/name` scalars (TensorBoard)."""
    c = choice.steered
    out = {f"{stage}/choice/accuracy_unsteered": c.unsteered, f"{stage}/choice/accuracy_steered": c.accuracy}
    out |= {f"{stage}/choice/{k}": float(getattr(c, k)) for k in ("difference", "ci_low", "ci_high", "better", "worse")}
    out[f"{stage}/choice/ser"] = c.ser
    for k in choice.controls:
        prefix = f"{stage}/choice/{k.kind}"
        out |= {f"{prefix}/accuracy_mean": k.accuracy_mean, f"{prefix}/p_value": k.p_value}
    return out
