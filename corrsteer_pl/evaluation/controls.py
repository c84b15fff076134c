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
from corrsteer_pl.evaluation.validation import group, grouped
from corrsteer_pl.selection.variants import SelectedFeature, validated_layers, validation_trials
from corrsteer_pl.steering.vectors import LayerSteering, SteeringVectors, decoder_vector

SEARCH_CONTROLS_DIR = "search_controls"
"""Export subfolder with one steering per search-matched control draw (`0/`, `1/`, ...; an empty one steers nothing)."""


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


def search_matched_controls(
    ranked: Mapping[int, list[SelectedFeature]],
    stats: Mapping[int, CorrelationStats],
    saes: Mapping[int, SAE],
    evaluate: Callable[[dict[str, list[SelectedFeature]]], Mapping[str, Any]],
    candidates: int,
    alpha: float,
    draws: int,
    seed: int = 0,
) -> list[tuple[list[SelectedFeature], dict[str, dict[str, float]]]]:
    """CorrSteer-P's search, run on random features: per draw, the features it kept and its validation figures.

    A P steering was *searched for* on the validation items, so it had several chances to look good by luck.
    `ranked` is P's family of trials (`selection.variants.trial_family`). Each draw replaces every layer's trials
    by as many random firing features, each scaled to the norm of the trial of the same rank, and applies the same
    paired test with Holm's correction over its own trials (as many as P's) at `alpha`. Random features are not
    filtered by calibration q (almost none would pass): each draw keeps what Holm keeps. All draws' trials are
    answered in one `evaluate` pass.
    """
    drawn = search_draws(ranked, stats, saes, candidates, draws, seed)
    results = evaluate({"unsteered": []} | search_trials(drawn, candidates))
    return searched_layers(drawn, results, candidates, alpha)


def search_draws(
    ranked: Mapping[int, list[SelectedFeature]],
    stats: Mapping[int, CorrelationStats],
    saes: Mapping[int, SAE],
    candidates: int,
    draws: int,
    seed: int = 0,
) -> list[dict[int, list[SelectedFeature]]]:
    """`draws` stand-ins for P's family `ranked`: per layer as many random firing features as it has trials (up to
    `candidates`), norm-matched rank by rank (seeded); a layer without trials gets none."""
    g = torch.Generator().manual_seed(seed)
    return [_random_candidates(ranked, stats, saes, candidates, g) for _ in range(draws)]


def search_trials(drawn: list[dict[int, list[SelectedFeature]]], candidates: int) -> dict[str, list[SelectedFeature]]:
    """Every draw's P trials, named "search{draw}|layer_{L}/{feature}", to be answered in one pass."""
    return grouped({f"search{i}": validation_trials(ranked_i, candidates) for i, ranked_i in enumerate(drawn)})


def searched_layers(
    drawn: list[dict[int, list[SelectedFeature]]], results: Mapping[str, Any], candidates: int, alpha: float
) -> list[tuple[list[SelectedFeature], dict[str, dict[str, float]]]]:
    """P's paired test on each draw, from `results` holding "unsteered" and the `search_trials`."""
    out = []
    for i, ranked_i in enumerate(drawn):
        mine = {"unsteered": results["unsteered"]} | group(results, f"search{i}")
        out.append(validated_layers(ranked_i, lambda _, mine=mine: mine, candidates, alpha))
    return out


def _random_candidates(
    ranked: Mapping[int, list[SelectedFeature]],
    stats: Mapping[int, CorrelationStats],
    saes: Mapping[int, SAE],
    candidates: int,
    g: torch.Generator,
) -> dict[int, list[SelectedFeature]]:
    """Per layer, random firing features in place of its top candidates, norm-matched rank by rank."""
    out = {}
    for layer, fs in ranked.items():
        if not fs:
            out[layer] = []
            continue
        pool = _firing_pool(stats[layer], fs)
        picks = pool[torch.randperm(len(pool), generator=g)[: min(candidates, len(fs))]]
        out[layer] = []
        for f, feature in zip(fs, picks.tolist(), strict=False):
            target = decoder_vector(saes[layer], [f]).norm()
            unit = decoder_vector(saes[layer], [SelectedFeature(layer, feature, 0.0, 1.0, 0.0)]).norm()
            coefficient = float(target / unit.clamp_min(1e-12))
            r, frequency = float(stats[layer].pearson()[feature]), float(stats[layer].frequency()[feature])
            out[layer].append(SelectedFeature(layer, feature, r, coefficient, frequency))
    return out


def load_search_controls(folder: Path) -> list[SteeringVectors]:
    """The search-matched control draws of an export (none for an export without them)."""
    root = Path(folder) / SEARCH_CONTROLS_DIR
    if not root.is_dir():
        return []
    draws = sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    return [SteeringVectors.load(p) for p in draws]
