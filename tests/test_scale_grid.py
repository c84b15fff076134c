from collections import Counter
from types import SimpleNamespace

import pytest

from callbacks.correlation import CorrelationCallback
from corrsteer_pl.evaluation import SplitResult
from corrsteer_pl.selection import SelectedFeature, Selection
from corrsteer_pl.tasks import Example
from corrsteer_pl.tiny import random_sae, tiny_model


def _module(results: dict[str, SplitResult], choices: tuple[str, ...]):
    model = tiny_model("llama", num_layers=2)
    example = Example("q/0", "Question", "B", choices)
    datamodule = SimpleNamespace(examples=lambda split: [example])
    return SimpleNamespace(
        saes={0: random_sae(64, 16, 0)},
        lm=model,
        trainer=SimpleNamespace(datamodule=datamodule),
        evaluate_split=lambda conditions, prompt_caches=None: {name: results[name] for name in conditions},
    )


def _result(accuracy: float, answers: dict[str, int]) -> SplitResult:
    n = sum(answers.values())
    return SplitResult(correct=accuracy * n, valid=n, n=n, answers=Counter(answers))


@pytest.fixture()
def callback():
    callback = CorrelationCallback(scale_grid=[0.5, 1.0, 2.0, 4.0], max_answer_share=0.6)
    callback.selection = Selection("A", [SelectedFeature(0, 3, 0.5, 1.0, 0.2)])
    return callback


GRID = {
    "0.5": _result(0.10, {"A": 30, "B": 30, "C": 20, "D": 20}),
    "1": _result(0.17, {"A": 40, "B": 30, "C": 15, "D": 15}),
    "2": _result(0.25, {"A": 95, "B": 5}),  # collapsed: "always A" scores the share of gold A
    "4": _result(0.25, {"A": 100}),
}


def test_scale_grid_rejects_a_collapse_to_one_answer_on_multiple_choice(callback):
    scale, grid = callback._pick_scale(_module(GRID, ("A", "B", "C", "D")))
    assert scale == 1.0
    assert grid["2"]["top_answer_share"] == 0.95


def test_scale_grid_picks_best_accuracy_when_answers_are_free_form(callback):
    scale, _ = callback._pick_scale(_module(GRID, ()))
    assert scale == 2.0, "ties go to the smaller scale"


def test_without_a_grid_the_configured_scale_stands(callback):
    callback.scale_grid = None
    assert callback._pick_scale(_module(GRID, ("A", "B")))[0] == callback.scale
