import numpy as np
import pytest
import torch

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.evaluation.conditions import SplitResult
from corrsteer_pl.selection.validation import scale_features
from corrsteer_pl.selection.variants import select_features


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


def _items(correct: list[int]) -> SplitResult:
    result = SplitResult()
    result.add(
        torch.tensor(correct, dtype=torch.float64), torch.ones(len(correct), dtype=torch.bool), ["A"] * len(correct)
    )
    return result


UNSTEERED = [0] * 20 + [1] * 20


def _evaluator(per_candidate: dict[tuple[int, int], list[int]], calls: list):
    def evaluate(candidates):
        calls.append(sorted(candidates))
        return {
            name: _items(per_candidate[(fs[0].layer, fs[0].feature)] if fs else UNSTEERED)
            for name, fs in candidates.items()
        }

    return evaluate


def test_p_keeps_a_layer_only_when_its_candidate_wins_the_paired_test_in_one_pass(layers):
    top = {layer: [f.feature for f in fs] for layer, fs in select_features(layers, "A", top_k=2).candidates.items()}
    gains = {(0, f): [0] * 19 + [1] * 21 for f in top[0]}  # one item better: p = 0.5
    gains |= {(1, f): [1] * 12 + [0] * 8 + [1] * 20 for f in top[1]}  # 12 better, 0 worse
    calls = []
    selection = select_features(layers, "P", top_k=2, evaluate=_evaluator(gains, calls), candidates=2, alpha=0.05)
    assert [f.layer for f in selection.features] == [1]
    assert len(calls) == 1 and len(calls[0]) == 1 + len(top[0]) + len(top[1]), "one pass scores every candidate"
    kept = selection.validation[f"layer_1/{selection.features[0].feature}"]
    assert (kept["better"], kept["worse"], kept["kept"]) == (12, 0, True) and kept["p_value"] < 0.001
    assert all(
        not v["kept"] and v["p_value"] == 0.5 for k, v in selection.validation.items() if k.startswith("layer_0")
    )


def test_one_item_of_difference_never_keeps_a_layer(layers):
    one_better = {(layer, f.feature): [0] * 19 + [1] * 21 for layer, fs in layers.items() for f in rank(layers, layer)}
    selection = select_features(layers, "P", evaluate=_evaluator(one_better, []), candidates=1, alpha=0.5)
    assert selection.features == []


def test_p_picks_the_most_accurate_of_its_candidates(layers):
    first, second = rank(layers, 1)[:2]
    gains = {(0, f.feature): UNSTEERED for f in rank(layers, 0)}
    gains |= {(1, first.feature): [1] * 10 + [0] * 10 + [1] * 20, (1, second.feature): [1] * 15 + [0] * 5 + [1] * 20}
    selection = select_features(layers, "P", top_k=2, evaluate=_evaluator(gains, []), candidates=2)
    assert [(f.layer, f.feature) for f in selection.features] == [(1, second.feature)]


def rank(layers, layer):
    return select_features(layers, "A", top_k=10).candidates[layer]


def test_p_without_a_validation_scorer_and_unknown_variants_are_refused(layers):
    with pytest.raises(ValueError, match="needs a validation scorer"):
        select_features(layers, "P")
    with pytest.raises(ValueError, match="unknown selection variant 'Z'"):
        select_features(layers, "Z")


def test_ranking_is_by_r_descending(layers):
    candidates = select_features(layers, "A", top_k=3).candidates[1]
    rs = [f.r for f in candidates]
    assert rs == sorted(rs, reverse=True) and np.all(np.array(rs) > 0)


def _strong_layers(n_layers: int = 4) -> dict[int, CorrelationStats]:
    """Layers whose three top features all correlate clearly with the label (q far below 0.05)."""
    return {layer: _stats([3.0, 2.5, 2.0, -1.0], seed=layer) for layer in range(n_layers)}


def test_p_corrects_every_trial_of_every_layer_as_one_family_with_holm():
    layers = _strong_layers()
    ranked = select_features(layers, "A", top_k=3).candidates
    assert all(f.q_value < 1e-6 for fs in ranked.values() for f in fs), "every candidate is eligible"
    gains = {(layer, f.feature): UNSTEERED for layer, fs in ranked.items() for f in fs}
    lucky, strong = (0, ranked[0][0].feature), (3, ranked[3][1].feature)
    gains[lucky] = [1] * 5 + [0] * 15 + [1] * 20  # 5 better, 0 worse: p = 1/32 < 0.05 on its own
    gains[strong] = [1] * 12 + [0] * 8 + [1] * 20  # 12 better: p = 2^-12
    calls = []
    selection = select_features(layers, "P", top_k=3, evaluate=_evaluator(gains, calls), candidates=3)
    assert len(calls) == 1 and len(calls[0]) == 1 + 12, "one pass: unsteered and 4 layers x 3 trials"
    assert [(f.layer, f.feature) for f in selection.features] == [strong]
    v = selection.validation[f"layer_0/{lucky[1]}"]
    assert v["p_value"] == 1 / 32 and v["p_holm"] == pytest.approx(11 / 32) and not v["kept"]  # second smallest: x 11
    assert selection.validation[f"layer_3/{strong[1]}"]["p_holm"] == pytest.approx(12 * 2**-12)


def test_p_tries_only_candidates_with_calibration_q_below_alpha_unless_told_otherwise():
    layers = {0: _stats([3.0, 0.0, 0.0, 0.0], seed=0), 1: _stats([0.0, 0.0, 0.0], seed=1)}
    ranked = select_features(layers, "A", top_k=3, require_significance=False).candidates
    noise = [f for fs in ranked.values() for f in fs if f.feature != 0 or f.layer != 0]
    assert noise and all(f.q_value >= 0.05 for f in noise) and ranked[0][0].q_value < 1e-6
    everything = {(layer, f.feature): UNSTEERED for layer, fs in ranked.items() for f in fs}
    calls = []
    select_features(layers, "P", top_k=3, evaluate=_evaluator(everything, calls), candidates=3)
    assert calls == [["layer_0/0", "unsteered"]]
    calls = []
    select_features(
        layers, "P", top_k=3, evaluate=_evaluator(everything, calls), candidates=3, require_significance=False
    )
    assert len(calls[0]) == 1 + sum(min(3, len(fs)) for fs in ranked.values())


def test_p_with_no_eligible_candidate_answers_nothing_and_keeps_nothing():
    layers = {0: _stats([0.0, 0.0, 0.0], seed=2)}
    calls = []
    selection = select_features(layers, "P", evaluate=_evaluator({}, calls), candidates=3)
    assert calls == [] and selection.features == [] and selection.validation == {}


def test_s_exports_nothing_when_its_feature_is_not_significant_and_the_choice_is_kept_as_withheld():
    layers = {0: _stats([0.0, 0.0, 0.0], seed=2)}
    selection = select_features(layers, "S")
    assert selection.features == [] and len(selection.withheld) == 1 and selection.withheld[0].q_value >= 0.05
    assert select_features(layers, "S", require_significance=False).features == selection.withheld
