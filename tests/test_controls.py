import torch

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.evaluation.controls import random_direction_controls, random_feature_controls
from corrsteer_pl.models.tiny import random_sae
from corrsteer_pl.selection.variants import SelectedFeature
from corrsteer_pl.steering.vectors import SteeringVectors


def _setup(llama):
    saes = {layer: random_sae(64, 32, layer, seed=layer) for layer in (0, 1)}
    steering = SteeringVectors.from_selection(
        [SelectedFeature(0, 3, 0.5, 2.0, 0.1), SelectedFeature(1, 7, 0.4, 5.0, 0.1)], saes, llama
    )
    stats = {}
    for layer in (0, 1):
        stats[layer] = CorrelationStats(32)
        z = torch.zeros(4, 32)
        z[:, [1, 3, 7, 9, 20]] = 1.0  # only these features ever fired
        stats[layer].update(z, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    return saes, steering, stats


def test_random_feature_controls_draw_firing_unselected_features_with_matched_norms(llama):
    saes, steering, stats = _setup(llama)
    controls = random_feature_controls(steering, saes, stats, draws=25, seed=0)
    assert len(controls) == 25
    drawn = {layer: set() for layer in (0, 1)}
    for control in controls:
        for layer, s in control.layers.items():
            (feature,) = [f.feature for f in s.features]
            drawn[layer].add(feature)
            torch.testing.assert_close(s.vector.norm(), steering.layers[layer].vector.norm())
            direction = saes[layer].W_dec[feature].detach()
            cosine = torch.nn.functional.cosine_similarity(s.vector, direction, dim=0)
            assert cosine > 0.9999, "the control steers along the drawn feature's decoder row"
    assert drawn[0] <= {1, 7, 9, 20} and drawn[1] <= {1, 3, 9, 20}, "never the selected feature, never a dead one"
    assert len(drawn[0]) > 1


def test_random_direction_controls_are_seeded_and_norm_matched(llama):
    _, steering, _ = _setup(llama)
    a, b = random_direction_controls(steering, 3, seed=1), random_direction_controls(steering, 3, seed=1)
    for x, y in zip(a, b, strict=True):
        for layer in steering.layers:
            assert torch.equal(x.layers[layer].vector, y.layers[layer].vector)
            torch.testing.assert_close(x.layers[layer].vector.norm(), steering.layers[layer].vector.norm())
    assert not torch.equal(a[0].layers[0].vector, a[1].layers[0].vector)
