import numpy as np
import pytest
import torch

from corrsteer_pl.selection import select_features
from corrsteer_pl.stats import CorrelationStats
from corrsteer_pl.validation import scale_features


def _stats(r_signs: list[float], n: int = 400, seed: int = 0) -> CorrelationStats:
    """Features whose activation tracks the label with the given strength (negative = anti-correlated)."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.4).double()
    cols = [torch.relu(s * y + torch.rand(n, generator=g)) for s in r_signs]
    stats = CorrelationStats(len(r_signs))
    stats.update(torch.stack(cols, 1), y)
    return stats


@pytest.fixture()
def layers():
    # layer 0: feature 2 strongest; layer 1: feature 0 strongest and stronger than any in layer 0
    return {0: _stats([0.2, -3.0, 1.0, 0.0]), 1: _stats([3.0, 0.5, -1.0], seed=1)}


def test_a_takes_the_top_feature_of_every_layer(layers):
    chosen = select_features(layers, "A").features
    assert [(f.layer, f.feature) for f in chosen] == [(0, 2), (1, 0)]


def test_s_takes_the_single_best_feature_over_all_layers(layers):
    chosen = select_features(layers, "S").features
    assert [(f.layer, f.feature) for f in chosen] == [(1, 0)]


def test_negative_correlations_are_never_candidates(layers):
    selection = select_features(layers, "A", top_k=10)
    assert all(f.r > 0 for c in selection.candidates.values() for f in c)
    assert 1 not in [f.feature for f in selection.candidates[0]]
    assert select_features({0: _stats([-1.0, -2.0])}, "A").features == []


def test_coefficient_is_the_mean_over_correct_samples_times_the_scale(layers):
    stats = layers[0]
    f = scale_features(select_features(layers, "A").features, 2.0)[0]
    assert f.coefficient == pytest.approx(2.0 * float(stats.positive_mean()[2]))
    active = select_features(layers, "A", active_only=True).features[0]
    assert active.coefficient == pytest.approx(float(stats.positive_mean(active_only=True)[2]))


def test_p_keeps_only_layers_that_beat_unsteered_on_validation(layers):
    scores = {(): 0.5, ((0, 2),): 0.45, ((1, 0),): 0.6}
    calls = []

    def evaluate(candidates):
        calls.append(sorted(candidates))
        return {name: scores[tuple((f.layer, f.feature) for f in fs)] for name, fs in candidates.items()}

    selection = select_features(layers, "P", evaluate=evaluate)
    assert [(f.layer, f.feature) for f in selection.features] == [(1, 0)]
    assert selection.validation == {"unsteered": 0.5, "layer_0": 0.45, "layer_1": 0.6}
    assert calls == [["layer_0", "layer_1", "unsteered"]], "one evaluation pass scores every candidate"


def test_p_without_a_validation_scorer_and_unknown_variants_are_refused(layers):
    with pytest.raises(ValueError, match="needs a validation scorer"):
        select_features(layers, "P")
    with pytest.raises(ValueError, match="unknown selection variant 'Z'"):
        select_features(layers, "Z")


def test_ranking_is_by_r_descending(layers):
    candidates = select_features(layers, "A", top_k=3).candidates[1]
    rs = [f.r for f in candidates]
    assert rs == sorted(rs, reverse=True) and np.all(np.array(rs) > 0)
