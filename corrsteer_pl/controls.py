"""Random controls for a steering: is it the *selected* features that help, or any push of that size?

(a) random SAE features of the same layers, drawn from features that fired at the generation
positions during calibration, each layer's vector rescaled to the selected vector's norm;
(b) random Gaussian directions of the same per-layer norms. Both seeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from sae_lens import SAE
from torch import Tensor

from corrsteer_pl.selection import SelectedFeature
from corrsteer_pl.stats import CorrelationStats
from corrsteer_pl.steering import LayerSteering, SteeringVectors, decoder_vector


def random_feature_controls(
    steering: SteeringVectors,
    saes: Mapping[int, SAE],
    stats: Mapping[int, CorrelationStats],
    draws: int = 20,
    seed: int = 0,
) -> list[SteeringVectors]:
    """`draws` steerings, each with one random firing feature per steered layer, norm-matched."""
    g = torch.Generator().manual_seed(seed)
    pools = {layer: _firing_pool(stats[layer], s.features) for layer, s in steering.layers.items()}
    controls = []
    for draw in range(draws):
        layers = {}
        for layer, s in steering.layers.items():
            feature = int(pools[layer][torch.randint(len(pools[layer]), (1,), generator=g)])
            direction = decoder_vector(saes[layer], [SelectedFeature(layer, feature, 0.0, 1.0, 0.0)])
            layers[layer] = _matched(s, direction, [SelectedFeature(layer, feature, 0.0, 0.0, 0.0)])
        controls.append(replace(steering, layers=layers, info={"control": "random_feature", "draw": draw}))
    return controls


def random_direction_controls(steering: SteeringVectors, draws: int = 20, seed: int = 0) -> list[SteeringVectors]:
    """`draws` steerings along seeded Gaussian directions with the selected per-layer norms."""
    g = torch.Generator().manual_seed(seed)
    controls = []
    for draw in range(draws):
        layers = {
            layer: _matched(s, torch.randn(s.vector.shape, generator=g, dtype=torch.float64).float(), [])
            for layer, s in steering.layers.items()
        }
        controls.append(replace(steering, layers=layers, info={"control": "random_direction", "draw": draw}))
    return controls


def _firing_pool(stats: CorrelationStats, selected: list[SelectedFeature]) -> Tensor:
    """Features that fired on at least one calibration sample, minus the selected ones."""
    fired = stats.active > 0
    fired[[f.feature for f in selected]] = False
    pool = fired.nonzero().flatten().cpu()
    if pool.numel() == 0:
        raise ValueError("no other SAE feature fired during calibration: random-feature controls are impossible")
    return pool


def _matched(selected: LayerSteering, direction: Tensor, features: list[SelectedFeature]) -> LayerSteering:
    vector = direction / direction.norm().clamp_min(1e-12) * selected.vector.norm()
    return LayerSteering(selected.layer, vector, features, selected.hook_name, selected.sae_source)
