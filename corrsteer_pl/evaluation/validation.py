"""Choices made on the validation split: which layers CorrSteer-P keeps, and the scale.

Every candidate steering is answered through one `evaluate` function over the validation split,
sharing the prompts' caches (`PromptCaches`), so the prompts run once for the layer check and the
scale grid together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeVar

from corrsteer_pl.evaluation.conditions import Conditions, PromptCaches, SplitResult
from corrsteer_pl.selection.variants import SelectedFeature
from corrsteer_pl.steering.vectors import SteeringVectors

Evaluate = Callable[[Conditions, PromptCaches], Mapping[str, SplitResult]]
Build = Callable[[list[SelectedFeature]], SteeringVectors]
T = TypeVar("T")


def scale_features(features: list[SelectedFeature], scale: float) -> list[SelectedFeature]:
    """The features with their coefficients times `scale`: the one place a scale acts on a steering."""
    return [replace(f, coefficient=f.coefficient * scale) for f in features]


@dataclass
class Validator:
    """Scores candidate steerings on the validation split.

    `evaluate` answers {name: steering or None} over the split; `build` turns features into a steering;
    `multiple_choice` turns on the collapse guard of `pick_scale`.
    """

    evaluate: Evaluate
    build: Build
    multiple_choice: bool
    caches: PromptCaches = field(default_factory=PromptCaches)

    def results(self, candidates: Mapping[str, list[SelectedFeature]]) -> Mapping[str, SplitResult]:
        """Each candidate's answers, all in one pass over the split; an empty candidate is the unsteered model."""
        conditions = {name: self.build(features) if features else None for name, features in candidates.items()}
        return self.evaluate(conditions, self.caches)

    def results_at(self, candidates: Mapping[str, list[SelectedFeature]], scale: float) -> Mapping[str, SplitResult]:
        """Each candidate's answers with its coefficients times `scale`."""
        return self.results({name: scale_features(features, scale) for name, features in candidates.items()})

    def pick_scale(
        self, features: list[SelectedFeature], grid: list[float], max_answer_share: float, default: float
    ) -> tuple[float, dict[str, dict[str, float]]]:
        """The grid scale with the best validation accuracy whose answers did not collapse (`choose_scale`)."""
        results = self.results({f"{s:g}": scale_features(features, s) for s in grid})
        return choose_scale(results, self.multiple_choice, max_answer_share, default)


def choose_scale(
    results: Mapping[str, SplitResult], multiple_choice: bool, max_answer_share: float, default: float
) -> tuple[float, dict[str, dict[str, float]]]:
    """The best scale of {scale as "%g": its validation results}, and the grid's figures.

    On multiple-choice tasks a scale is rejected when one answer takes more than `max_answer_share` of all
    items ("always A" scores the share of gold A). Ties go to the smaller scale; `default` stands when every
    scale is rejected.
    """
    refused = {name: multiple_choice and r.top_answer_share > max_answer_share for name, r in results.items()}
    table = {
        name: {"accuracy": r.accuracy, "valid_rate": r.valid_rate, "top_answer_share": r.top_answer_share,
               "refused": refused[name]}
        for name, r in results.items()
    }  # fmt: skip
    allowed = [name for name in results if not refused[name]]
    if not allowed:
        return default, table
    best = max(allowed, key=lambda name: (results[name].accuracy, -float(name)))
    return float(best), table


def grouped(groups: Mapping[str, Mapping[str, T]]) -> dict[str, T]:
    """Several groups' candidates as one {"group|name": ...} mapping, to be answered in one pass."""
    return {f"{group}|{name}": value for group, items in groups.items() for name, value in items.items()}


def group(results: Mapping[str, T], name: str) -> dict[str, T]:
    """One group's results of a `grouped` pass, under their own names."""
    prefix = f"{name}|"
    return {key[len(prefix) :]: value for key, value in results.items() if key.startswith(prefix)}
