"""Random controls for a steering: is it the *selected* features that help, or any push of that size?

(a) random SAE features of the same layers, drawn from features that fired at the generation
positions during calibration, each layer's vector rescaled to the selected vector's norm;
(b) random Gaussian directions of the same per-layer norms. Both seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from torch import Tensor

from corrsteer_pl.calibration.stats import CorrelationStats
from corrsteer_pl.evaluation.judge import Judged
from corrsteer_pl.selection.search import firing_features
from corrsteer_pl.selection.variants import SelectedFeature
from corrsteer_pl.steering.export import SEARCH_CONTROLS_DIR
from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors, decoder_vector


def random_feature_controls(
    steering: SteeringVectors,
    saes: Mapping[int, SAE],
    stats: Mapping[int, CorrelationStats],
    draws: int = 20,
    seed: int = 0,
) -> list[SteeringVectors]:
    """`draws` steerings, each with one random firing feature per steered layer, norm-matched."""
    g = torch.Generator().manual_seed(seed)
    pools = {layer: firing_features(stats[layer], s.features) for layer, s in steering.layers.items()}
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


def _matched(selected: LayerSteering, direction: Tensor, features: list[SelectedFeature]) -> LayerSteering:
    vector = direction / direction.norm().clamp_min(1e-12) * selected.vector.norm()
    return LayerSteering(selected.layer, vector, features, selected.hook_name, selected.sae_source)


Scorer = Callable[[dict[str, Any]], Judged]
"""A batch -> its judged answers by a model other than the steered one (e.g. a fine-tuned baseline)."""


@dataclass
class ConditionSet:
    """What is answered on the same items: the unsteered model, the steered one, other methods' steerings,
    baselines answered by a pass of their own (another model, other prompt tokens), and groups of random controls."""

    steered: SteeringVectors
    controls: dict[str, list[SteeringVectors]] = field(default_factory=dict)  # kind -> draws
    methods: dict[str, SteeringVectors] = field(default_factory=dict)  # a comparison's other selections
    baselines: dict[str, Scorer] = field(default_factory=dict)  # scored by their own passes, after the steerings
    labels: dict[str, str] = field(default_factory=dict)  # a baseline's label in the table (default: its name)

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
        """Every steering condition by a unique name, in column order: unsteered, steered, each method, then each
        control draw ("kind/draw"). The baselines' columns follow these."""
        named: dict[str, SteeringVectors | None] = {"unsteered": None, "steered": self.steered} | self.methods
        for kind, draws in self.controls.items():
            named |= {f"{kind}/{i}": steering for i, steering in enumerate(draws)}
        return named

    def columns(self, per_item: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(N, C) per-item results in `named()` order, then the baselines' -> ({unsteered, steered, each method,
        each baseline}: (N,), {control kind: (draws, N)})."""
        plain = {name: per_item[:, i] for i, name in enumerate(["unsteered", "steered", *self.methods])}
        groups, start = {}, len(plain)
        for kind, draws in self.controls.items():
            groups[kind] = per_item[:, start : start + len(draws)].T
            start += len(draws)
        plain |= {name: per_item[:, start + i] for i, name in enumerate(self.baselines)}
        return plain, groups


def load_search_controls(folder: Path) -> list[SteeringVectors]:
    """The search-matched control draws of an export (none for an export without them)."""
    root = Path(folder) / SEARCH_CONTROLS_DIR
    if not root.is_dir():
        return []
    draws = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return [SteeringVectors.load(p) for p in draws]
