"""Feature selection (CorrSteer-S / -A / -P) and coefficients from per-layer correlation statistics.

Features are ranked by any ranking of `corrsteer_pl.rankings` (Pearson r by default); every
ranking keeps only features with r > 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from corrsteer_pl.rankings import Ranking, check_ranking, score, steering_coefficient
from corrsteer_pl.stats import CorrelationStats

Variant = Literal["S", "A", "P"]
VARIANTS: tuple[Variant, ...] = ("S", "A", "P")


@dataclass(frozen=True)
class SelectedFeature:
    """One SAE feature chosen for steering, with the evidence for it."""

    layer: int
    feature: int
    r: float
    coefficient: float
    frequency: float
    score: float | None = None
    """The ranking's score it was chosen by (r for pearson); None where it was not ranked."""


@dataclass
class Selection:
    """The features to steer, plus the per-layer candidates and validation scores behind the choice."""

    variant: Variant
    features: list[SelectedFeature]
    candidates: dict[int, list[SelectedFeature]] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)  # P only: "unsteered" and "layer_{L}"
    ranking: Ranking = "pearson"


def rank_layer(
    stats: CorrelationStats,
    layer: int,
    top_k: int = 10,
    active_only: bool = False,
    ranking: Ranking = "pearson",
) -> list[SelectedFeature]:
    """The top-k features of one layer by `ranking`, best first, among those with r > 0 (negative r never steers).

    The coefficient is the mean activation over correct samples (the mean difference for caa); the run's scale
    multiplies it later, in one place (`corrsteer_pl.validation.scale_features`).
    """
    scores = score(stats, ranking)
    k = min(top_k, int((scores > -torch.inf).sum()))
    if k == 0:
        return []
    values, ids = torch.topk(scores, k)
    r = stats.pearson()[ids]
    coefficients = steering_coefficient(stats, ranking, active_only)[ids]
    frequency = stats.frequency()[ids]
    return [
        SelectedFeature(layer, int(i), float(ri), float(c), float(f), float(v))
        for i, ri, c, f, v in zip(ids, r, coefficients, frequency, values, strict=True)
    ]


def select_features(
    stats: Mapping[int, CorrelationStats],
    variant: Variant = "A",
    top_k: int = 10,
    active_only: bool = False,
    evaluate: Callable[[dict[str, list[SelectedFeature]]], dict[str, float]] | None = None,
    ranking: Ranking = "pearson",
) -> Selection:
    """Runs CorrSteer's selection, ranking features by `ranking` (see `corrsteer_pl.rankings`).

    S: the single best (layer, feature) over all layers. A: the top-1 feature of every layer.
    P: a layer's top-1 is kept only if steering it alone scores above the unsteered model under
    `evaluate`, which scores several candidate steerings at once ({name: features} -> {name:
    validation accuracy}; "unsteered" maps to []), so one pass over the split serves them all.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown selection variant '{variant}'; use one of {', '.join(VARIANTS)}")
    check_ranking(ranking)
    candidates = {layer: rank_layer(s, layer, top_k, active_only, ranking) for layer, s in sorted(stats.items())}
    best = [c[0] for c in candidates.values() if c]
    if variant == "A":
        return Selection("A", best, candidates, ranking=ranking)
    if variant == "S":
        top = sorted(best, key=lambda f: -(f.r if f.score is None else f.score))[:1]
        return Selection("S", top, candidates, ranking=ranking)
    if evaluate is None:
        raise ValueError("variant P needs a validation scorer (evaluate); use S or A without one")
    validation = evaluate({"unsteered": []} | {f"layer_{f.layer}": [f] for f in best})
    kept = [f for f in best if validation[f"layer_{f.layer}"] > validation["unsteered"]]
    return Selection("P", kept, candidates, validation, ranking)
