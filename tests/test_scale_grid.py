"""The scale grid: best validation accuracy wins, but never a collapse onto one answer on multiple choice."""

from collections import Counter
from types import SimpleNamespace

import pytest

from corrsteer_pl.evaluation.conditions import SplitResult
from corrsteer_pl.selection.validation import Validator, scale_features
from corrsteer_pl.selection.variants import SelectedFeature

FEATURES = [SelectedFeature(0, 3, 0.5, 1.0, 0.2)]


def _result(accuracy: float, answers: dict[str, int]) -> SplitResult:
    n = sum(answers.values())
    return SplitResult(correct=accuracy * n, valid=n, n=n, answers=Counter(answers))


GRID = {
    "0.5": _result(0.10, {"A": 30, "B": 30, "C": 20, "D": 20}),
    "1": _result(0.17, {"A": 40, "B": 30, "C": 15, "D": 15}),
    "2": _result(0.25, {"A": 95, "B": 5}),  # collapsed: "always A" scores the share of gold A
    "4": _result(0.25, {"A": 100}),
}


def _validator(multiple_choice: bool, passes: list) -> Validator:
    def evaluate(conditions, caches):
        passes.append({name: steering.layers[0].features[0].coefficient for name, steering in conditions.items()})
        return {name: GRID[name] for name in conditions}

    def build(features):
        return SimpleNamespace(layers={0: SimpleNamespace(features=features)})

    return Validator(evaluate=evaluate, build=build, multiple_choice=multiple_choice)


def test_scale_grid_rejects_a_collapse_to_one_answer_on_multiple_choice():
    scale, grid = _validator(True, []).pick_scale(FEATURES, [0.5, 1.0, 2.0, 4.0], 0.6, default=1.0)
    assert scale == 1.0
    assert grid["2"]["top_answer_share"] == 0.95


def test_scale_grid_picks_best_accuracy_when_answers_are_free_form():
    scale, _ = _validator(False, []).pick_scale(FEATURES, [0.5, 1.0, 2.0, 4.0], 0.6, default=1.0)
    assert scale == 2.0, "ties go to the smaller scale"


def test_every_grid_scale_is_answered_in_one_pass_with_its_coefficients():
    passes = []
    _validator(True, passes).pick_scale(FEATURES, [0.5, 1.0, 2.0, 4.0], 0.6, default=1.0)
    assert passes == [{"0.5": 0.5, "1": 1.0, "2": 2.0, "4": 4.0}]


def test_when_every_scale_collapses_the_default_stands():
    scale, _ = _validator(True, []).pick_scale(FEATURES, [2.0, 4.0], 0.6, default=0.5)
    assert scale == 0.5


def test_scale_features_multiplies_only_the_coefficients():
    (f,) = scale_features(FEATURES, 3.0)
    assert (f.layer, f.feature, f.r, f.coefficient, f.frequency) == (0, 3, 0.5, pytest.approx(3.0), 0.2)
