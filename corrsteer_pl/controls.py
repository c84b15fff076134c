"""Random controls for a steering: is it the *selected* features that help, or any push of that size?

(a) random SAE features of the same layers, drawn from features that fired at the generation
positions during calibration, each layer's vector rescaled to the selected vector's norm;
(b) random Gaussian directions of the same per-layer norms. Both seeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

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


@dataclass
class ConditionSet:
    """Steerings answered on the same items: the unsteered model, the steered one, and groups of controls."""

    steered: SteeringVectors
    controls: dict[str, list[SteeringVectors]] = field(default_factory=dict)  # kind -> draws

    @classmethod
    def with_random_controls(
        cls, steering: SteeringVectors, saes: Mapping[int, SAE], stats: Mapping[int, CorrelationStats], draws: int,
        seed: int,
    ) -> ConditionSet:  # fmt: skip
        """The steering with `draws` random-feature and random-direction controls (none for an empty steering)."""
        if draws == 0 or not steering.layers:
            return cls(steering)
        return cls(
            steering,
            {
                "random_feature": random_feature_controls(steering, saes, stats, draws, seed),
                "random_direction": random_direction_controls(steering, draws, seed),
            },
        )

    def named(self) -> dict[str, SteeringVectors | None]:
        """Every condition by a unique name, in column order: unsteered, steered, then each control draw."""
        named: dict[str, SteeringVectors | None] = {"unsteered": None, "steered": self.steered}
        for kind, draws in self.controls.items():
            named |= {f"{kind}/{i}": steering for i, steering in enumerate(draws)}
        return named

    def columns(self, per_item: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(N, C) per-item results in `named()` order -> ({unsteered, steered}: (N,), {kind: (draws, N)})."""
        plain = {"unsteered": per_item[:, 0], "steered": per_item[:, 1]}
        groups, start = {}, 2
        for kind, draws in self.controls.items():
            groups[kind] = per_item[:, start : start + len(draws)].T
            start += len(draws)
        return plain, groups
